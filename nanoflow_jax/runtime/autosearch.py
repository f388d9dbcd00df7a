"""The two-stage auto-search of NanoFlow.

Stage 1 (`profile`, on the GPU): time each nano-op kernel over token counts and SM shares; the table
is stored in the repository (runtime/profiles/<model>_<device>.json).
Stage 2 (`search`, anywhere): for each nano-batch split of the dense batch, a MILP (scipy.optimize.milp,
HiGHS) picks every nano-op's SM share and, for each pair of nano-ops on different streams that the
dependencies leave unordered, whether one runs before the other or both run at once with shares summing
to at most the SM count; it minimizes one layer's makespan. The op order and dependencies come from the
two-nano-batch template (plan.two_nano_batches) in both of its orders: which nano-batch's attention
runs on a share beside the other's GEMMs. Interference between concurrent kernels is charged from
stage 1's pair measurement where one was made. Under tensor parallelism each nano-batch's o may take the
all-gather form, and only collectives run beside other work (the executor has no streams under TP yet).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import os

import numpy as np

from nanoflow_jax.runtime.plan import RESOURCE, PipelineConfig, ops_for, single, two_nano_batches

log = logging.getLogger(__name__)

PROFILE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def device_kind_name(device) -> str:
  """A short device-kind key for tables and shipped configs: "h200", "h100", ..., "cpu"."""
  if device.platform == "cpu":
    return "cpu"
  return gpu_kind_key(getattr(device, "device_kind", "cpu"))


def gpu_kind_key(kind: str) -> str:
  """The key of a GPU's name, as JAX's device_kind or nvidia-smi give it ("NVIDIA H200" -> "h200")."""
  kind = kind.lower()
  for k in ("h200", "h100", "a100", "b200"):
    if k in kind:
      return k
  return kind.replace(" ", "-")


# Kernel variants profiled and searched apart: "" (bf16 weights and KV cache) and "fp8" (e4m3 weights and
# activations through gemm_fp8 on SM shares, fp8 KV cache): their kernels' times, and so the best split, differ.
VARIANTS = ("", "fp8")


def weights_variant(quantized: bool) -> str:
  """The variant a model runs: "fp8" for fp8 weights, "" otherwise."""
  return "fp8" if quantized else ""


def config_name(model: str, device_kind: str, tp: int = 1, variant: str = "") -> str:
  """How profiles and shipped configs are named: model_device, with _tpN under tensor parallelism and
  _<variant> for a kernel variant (fp8)."""
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  return f"{model}_{device_kind}" + (f"_tp{tp}" if tp > 1 else "") + (f"_{variant}" if variant else "")


def shipped_config(model_name: str, device, dense_batch: int, tp: int = 1, variant: str = "") -> PipelineConfig | None:
  return shipped_config_for_kind(model_name, device_kind_name(device), dense_batch, tp, variant)


def shipped_config_for_kind(model_name: str, kind: str, dense_batch: int, tp: int = 1,
                            variant: str = "") -> PipelineConfig | None:
  """The shipped config for this model, device kind, TP degree and kernel variant; a variant without one of
  its own takes the plain one (said in the log: it was searched with the other kernels' times)."""
  path = os.path.join(SHIPPED_DIR, config_name(model_name, kind, tp, variant) + ".json")
  if not os.path.exists(path) and variant:
    plain = os.path.join(SHIPPED_DIR, config_name(model_name, kind, tp) + ".json")
    if os.path.exists(plain):
      log.info("no %s pipeline config for %s on %s; using the bf16 one (searched with bf16 kernels' times)",
               variant, model_name, kind)
    path = plain
  if not os.path.exists(path):
    return None
  cfg = PipelineConfig.load(path)
  return cfg if cfg.dense_batch == dense_batch else None


def nanoflow_splits(model: str, dense_batch: int | None, tp: int, pipeline_config: str | None,
                    gpu_name: str | None, quantization: str | None = None) -> bool:
  """Whether mode nanoflow would run more than one nano-batch, decided before JAX's backend starts (the
  XLA flags that let streams overlap must be set before it, and cost a single-batch step ~10% on small
  steps: docs/history/perf-notes.md, session 10). The engine's own choice, read early: `pipeline_config` "generic"
  or a file, else the shipped config for this GPU (`gpu_name`, nvidia-smi's) and dense batch (None: the
  GPU default, 2048), else the generic split. True wherever it cannot tell (no GPU name, an unknown model).
  `quantization`: the engine's quantization argument ("fp8", "none" or None: the checkpoint's own)."""
  from nanoflow_jax import checkpoint
  from nanoflow_jax.runtime.plan import GENERIC_CONFIG
  if pipeline_config == GENERIC_CONFIG:
    return True
  if pipeline_config:
    return len(PipelineConfig.load(pipeline_config).nano_batches) > 1
  if not gpu_name:
    return True
  try:
    cfg = checkpoint.resolve_config(model)
  except Exception:   # a model the engine will refuse with its own message; the flags do not matter then
    return True
  quantized = quantization == "fp8" or (quantization in (None, "") and cfg.quantization is not None)
  shipped = shipped_config_for_kind(cfg.name, gpu_kind_key(gpu_name), dense_batch or 2048, tp,
                                    weights_variant(quantized))
  if shipped is not None and len(shipped.nano_batches) == 1:
    log.info("mode=nanoflow: the shipped config %s for %s is the whole batch; the stream flags stay off",
             shipped.name, gpu_name)
    return False
  return True


@dataclasses.dataclass
class Profile:
  """times[op][share] = list of (tokens, ms); ops: the GEMMs, rope_append, decode_attention and
  prefill_attention (per decode token at `context`, per prefill token of a prompt of that length), and
  under tensor parallelism (`tp` > 1; the other ops then at one device's shard shapes) allreduce: the
  all-reduce of a [tokens, hidden] partial sum across the `tp` devices.
  interference[gemm share] = how much longer a GEMM on that share and decode attention on the rest of the
  SMs take when they run at the same time than the longer of the two alone (1.0: no interference).
  beside_attention: the changes to the decode attention's configuration it was profiled with on shares
  below the whole GPU (and pairs); the configs searched from it carry them (PipelineConfig).
  variant: the kernels profiled ("" bf16; "fp8": fp8 GEMMs with their activation quantization, fp8 KV cache).
  power_w[op] = the board's median power (W) while that op was profiled on the whole GPU, and
  power_w["pair:<gemm share>"] while a pair ran (empty without nvidia-smi)."""
  model: str
  device: str
  num_sms: int
  context: int
  times: dict[str, dict[str, list[list[float]]]]
  interference: dict[str, float] = dataclasses.field(default_factory=dict)
  tp: int = 1
  beside_attention: dict[str, int] = dataclasses.field(default_factory=dict)
  variant: str = ""
  power_w: dict[str, float] = dataclasses.field(default_factory=dict)

  def slowdown(self, gemm_share: int) -> float:
    """The measured pair factor at the nearest profiled GEMM share (1.0 where none was measured)."""
    if not self.interference:
      return 1.0
    near = min(self.interference, key=lambda s: abs(int(s) - gemm_share))
    return float(self.interference[near])

  def time(self, op: str, tokens: int, share: int) -> float:
    if tokens <= 0:
      return 0.0
    table = self.times[op]
    shares = sorted(int(s) for s in table)
    s = min((x for x in shares if x >= share), default=shares[-1])
    pts = sorted(table[str(s)])
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if tokens >= xs[-1]:
      return ys[-1] * tokens / xs[-1]
    return float(np.interp(tokens, [0] + xs, [0] + ys))

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1)

  @classmethod
  def load(cls, path: str) -> "Profile":
    with open(path) as f:
      return cls(**json.load(f))


def profile_path(model: str, device_kind: str, tp: int = 1, variant: str = "") -> str:
  return os.path.join(PROFILE_DIR, config_name(model, device_kind, tp, variant) + ".json")


def op_time(prof: Profile, op: str, rows: int, decode_rows: int, share: int) -> float:
  if op in ("attn_allgather", "o_allgather"):
    # [rows, hidden] gathered (LLaMA-family shapes: heads x head_dim = hidden). Without a measured table,
    # half an all-reduce: a ring all-reduce is a reduce-scatter and an all-gather of the same bytes.
    if "allgather" in prof.times:
      return prof.time("allgather", rows, share)
    return 0.5 * prof.time("allreduce", rows, share)
  if RESOURCE[op] == "network":
    return prof.time("allreduce", rows, share)
  if op == "attention":
    return (prof.time("decode_attention", decode_rows, share)
            + prof.time("prefill_attention", rows - decode_rows, share))
  return prof.time(op, rows, share)


def _solve(cfg: PipelineConfig, prof: Profile, decode_rows: list[int], shares: list[int]):
  """MILP over one layer for a fixed split; returns (makespan ms, chosen share per op, start times)."""
  from scipy.optimize import Bounds, LinearConstraint, milp
  ops = cfg.ops
  n, ns = len(ops), len(shares)
  dur = np.array([[op_time(prof, o.op, cfg.nano_batches[o.nano_batch], decode_rows[o.nano_batch], s)
                   for s in shares] for o in ops])
  # A network nano-op keeps the SM share its template gives it (what its collective kernels occupy):
  # every other share is ruled out below.
  fixed = {i: int(np.argmin([abs(s - o.sm_share) for s in shares])) for i, o in enumerate(ops)
           if RESOURCE[o.op] == "network"}
  big = float(dur.max(axis=1).sum()) * 2 + 1
  anc = cfg._ancestors()
  ids = [o.id for o in ops]
  pairs = [(i, j) for i in range(n) for j in range(i + 1, n)
           if ops[i].stream != ops[j].stream and ids[i] not in anc[ids[j]] and ids[j] not in anc[ids[i]]]
  # Interference (stage 1's pair measurement): an op that may run beside one of the other class (GEMM vs
  # attention) is charged the pair factor at the GEMM share it would leave or take. Conservative: it
  # assumes the overlap happens, which is what the search is after.
  is_attn = [o.op == "attention" for o in ops]
  is_gemm = [RESOURCE[o.op] == "compute" for o in ops]
  beside = {i for p in pairs for i in p
            if (is_attn[p[0]] and is_gemm[p[1]]) or (is_gemm[p[0]] and is_attn[p[1]])}
  for i in beside:
    for k, sh in enumerate(shares):
      dur[i, k] *= prof.slowdown(prof.num_sms - sh if is_attn[i] else sh)
  # variables: x[i,s] (binary), t[i] (start), C (makespan), then per pair b1, b2, b3 (binary)
  nx, nt = n * ns, n
  nv = nx + nt + 1 + 3 * len(pairs)
  X = lambda i, s: i * ns + s
  T = lambda i: nx + i
  C = nx + nt
  B = lambda p, k: nx + nt + 1 + 3 * p + k
  rows, lo, hi = [], [], []

  def add(coefs: dict[int, float], low: float, high: float):
    r = np.zeros(nv)
    for k, v in coefs.items():
      r[k] += v
    rows.append(r), lo.append(low), hi.append(high)

  for i in range(n):
    add({X(i, s): 1 for s in range(ns)}, 1, 1)
    if i in fixed:
      add({X(i, fixed[i]): 1}, 1, 1)
    add({C: 1, T(i): -1, **{X(i, s): -dur[i, s] for s in range(ns)}}, 0, np.inf)   # C >= t_i + d_i
  order = {d: k for k, d in enumerate(ids)}
  for j, o in enumerate(ops):
    deps = {order[d] for d in o.deps if not d.startswith("prev:")}
    deps |= {i for i in range(j) if ops[i].stream == o.stream}  # a stream runs its ops in list order
    for i in deps:
      add({T(j): 1, T(i): -1, **{X(i, s): -dur[i, s] for s in range(ns)}}, 0, np.inf)  # t_j >= t_i + d_i
  # Under TP the executor runs without stream annotation (not wired inside shard_map): only the collectives,
  # asynchronous in XLA, can run beside other work; two compute or memory ops run one after the other.
  no_overlap = {p for p, (i, j) in enumerate(pairs)
                if cfg.tp > 1 and RESOURCE[ops[i].op] != "network" and RESOURCE[ops[j].op] != "network"}
  for p, (i, j) in enumerate(pairs):
    add({B(p, 0): 1, B(p, 1): 1, B(p, 2): 1}, 1, 1)
    if p in no_overlap:
      add({B(p, 2): 1}, 0, 0)
    add({T(j): 1, T(i): -1, **{X(i, s): -dur[i, s] for s in range(ns)}, B(p, 0): -big}, -big, np.inf)
    add({T(i): 1, T(j): -1, **{X(j, s): -dur[j, s] for s in range(ns)}, B(p, 1): -big}, -big, np.inf)
    share = lambda k, s: ops[k].sm_share if k in fixed else shares[s]
    add({**{X(i, s): share(i, s) for s in range(ns)}, **{X(j, s): share(j, s) for s in range(ns)},
         B(p, 2): big}, -np.inf, cfg.num_sms + big)                                        # shares fit
  c = np.zeros(nv)
  c[C] = 1
  integrality = np.zeros(nv)
  integrality[:nx] = 1
  integrality[nx + nt + 1:] = 1
  ub = np.full(nv, np.inf)
  ub[:nx] = 1
  ub[nx + nt + 1:] = 1
  res = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=integrality,
             bounds=Bounds(np.zeros(nv), ub), options={"time_limit": 60})
  if res.x is None:
    raise RuntimeError(f"MILP found no schedule: {res.message}")
  x = res.x[:nx].reshape(n, ns)
  chosen = [ops[i].sm_share if i in fixed else shares[int(np.argmax(x[i]))] for i in range(n)]
  starts = res.x[nx:nx + nt]
  durs = [float(dur[i, int(np.argmax(x[i]))]) for i in range(n)]
  # Pairs the solver put one after the other become dependencies, so the config says what was solved.
  orders = []
  for p, (i, j) in enumerate(pairs):
    b = [res.x[B(p, k)] for k in range(3)]
    if b[0] > 0.5:
      orders.append((ids[j], ids[i]))
    elif b[1] > 0.5:
      orders.append((ids[i], ids[j]))
  return float(res.x[C]), chosen, starts.tolist(), durs, orders


def sequential_layer_ms(prof: Profile, dense_batch: int, decodes: int) -> float:
  """Every op of the layer on the whole GPU, one after another (all-reduces included under TP)."""
  return sum(op_time(prof, op, dense_batch, decodes, prof.num_sms) for op in ops_for(prof.tp))


def search_split(prof: Profile, dense_batch: int, decodes: int, align: int = 128,
                 shares: tuple[int, ...] | None = None):
  """The best two-nano-batch config (MILP per split point): (PipelineConfig, predicted layer ms, schedule)."""
  shares = sorted(set(shares or [int(s) for s in prof.times["qkv"]]))
  best = None
  # Both orders of the two-nano-batch template: the second nano-batch's attention beside the first's GEMMs
  # (lead 0), or the first's (where the decode rows are) beside the second's GEMMs (lead 1). Under TP each
  # nano-batch's o also takes either collective form: all-reduce, or the paper's all-gather form.
  forms = [(), (0,), (1,), (0, 1)] if prof.tp > 1 else [()]
  for lead, first, allgather in itertools.product((0, 1), range(align, dense_batch, align), forms):
    cfg = two_nano_batches(dense_batch, prof.num_sms, [first, dense_batch - first], lead, tp=prof.tp,
                           allgather=allgather)
    dec = [min(decodes, first), max(decodes - first, 0)]
    ms, chosen, starts, durs, orders = _solve(cfg, prof, dec, shares)
    if best is None or ms < best[1]:
      for op, s in zip(cfg.ops, chosen):
        op.sm_share = s
      by_id = {op.id: op for op in cfg.ops}
      for later, earlier in orders:
        by_id[later].deps.append(earlier)
      rows = [(o.id, o.stream, st, d, s) for o, st, d, s in zip(cfg.ops, starts, durs, chosen)]
      # List the ops in solved start order: a pair the solver ordered against the template's list order
      # (now a dependency) must not point forward. Start times already keep each stream's order.
      cfg.ops = [cfg.ops[k] for k in sorted(range(len(cfg.ops)), key=lambda k: (starts[k], k))]
      best = (copy.deepcopy(cfg), ms, rows)
  cfg, ms, schedule = best
  cfg.name = f"autosearch-{prof.model}-{prof.device}"
  cfg.beside_attention = dict(prof.beside_attention)   # the attention variant its shares were timed with
  cfg.validate()
  return cfg, ms, schedule


def search(prof: Profile, dense_batch: int, decodes: int, align: int = 128,
           shares: tuple[int, ...] | None = None, split=None):
  """Best config for a dense batch with `decodes` decode rows (first) and the rest prefill: the best
  two-nano-batch split (`split`: search_split's result, if the caller has it already), or the single
  batch when no split is predicted to beat it.
  Returns (PipelineConfig, predicted layer ms, the sequential layer ms, schedule rows for a Gantt chart)."""
  cfg, ms, schedule = split or search_split(prof, dense_batch, decodes, align, shares)
  seq_ms = sequential_layer_ms(prof, dense_batch, decodes)
  if seq_ms <= ms:
    # No split is predicted to beat the whole batch on the whole GPU: ship that (mode nanoflow then runs
    # the sequential schedule instead of a slower pipeline).
    cfg = single(dense_batch, prof.num_sms, f"autosearch-{prof.model}-{prof.device}-single", tp=prof.tp)
    t, schedule = 0.0, []
    for op in cfg.ops:
      d = op_time(prof, op.op, dense_batch, decodes, prof.num_sms)
      schedule.append((op.id, op.stream, t, d, prof.num_sms))
      t += d
    ms = seq_ms
  return cfg, ms, seq_ms, schedule


def gantt(schedule, path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  streams = sorted({s for _, s, _, _, _ in schedule})
  fig, ax = plt.subplots(figsize=(9, 1.2 + 0.6 * len(streams)))
  colors = {"qkv": "tab:blue", "rope_append": "tab:gray", "attention": "tab:red", "o": "tab:cyan",
            "gate_up": "tab:green", "down": "tab:olive", "o_allreduce": "tab:purple", "down_allreduce": "tab:pink",
            "attn_allgather": "tab:orange", "o_allgather": "tab:brown"}
  for op_id, stream, start, dur, share in schedule:
    y = streams.index(stream)
    ax.broken_barh([(start, dur)], (y - 0.4, 0.8), color=colors[op_id.split("@")[0]], edgecolor="black")
    if dur > 0:
      ax.text(start + dur / 2, y, f"{op_id}\n{share} SMs", ha="center", va="center", fontsize=6)
  ax.set_yticks(range(len(streams)), [f"stream {s}" for s in streams])
  ax.set_xlabel("ms (one layer, predicted)")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
