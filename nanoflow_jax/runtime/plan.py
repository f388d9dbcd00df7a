"""PipelineConfig: how one decoder layer of a dense batch runs as nano-ops.

A config names the nano-batches (token counts, decode rows first, then prefill rows), and the ordered
list of nano-ops of one layer: each an op of OPS applied to one nano-batch, on a stream, with an SM
share, and its dependencies (other nano-ops of the same layer, or of the previous layer with "prev:").
The executor runs the list in order; on the GPU each nano-op's kernel goes to its stream.

Under tensor parallelism (`tp` > 1) the row-parallel GEMMs o and down leave partial sums on each device;
their all-reduces are nano-ops of their own (network class: o_allreduce, down_allreduce), so a plan can
place one nano-batch's all-reduce beside another nano-batch's GEMMs. A nano-batch may instead take the
NanoFlow paper's all-gather form of the attention block (AG_OPS): its attention output is all-gathered
(attn_allgather), o runs column-parallel on all heads (each device computes its slice of the hidden
columns), and that slice is all-gathered (o_allgather). The same bytes cross the network as with o's
all-reduce, in two collectives at two places in the layer, which gives the schedule more room to hide them.

JSON (version 1; "tp" may be left out for 1):
  {"version": 1, "name": "...", "dense_batch": 2048, "num_sms": 132, "nano_batches": [1024, 1024], "tp": 1,
   "ops": [{"op": "qkv", "nano_batch": 0, "stream": 1, "sm_share": 132, "deps": ["prev:down@0"]}, ...]}
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging

log = logging.getLogger(__name__)

VERSION = 1
# pipeline_config's name for the generic split even where a shipped config exists (to measure the split
# the auto-search turned down, e.g. at TP, where the shipped configs are the whole batch).
GENERIC_CONFIG = "generic"
# Attention options a share's variant may not change: the host builds query blocks and the page table by them.
BESIDE_ATTENTION_FIXED = ("block_q", "block_n")
# One layer's ops, in data order: norm + qkv GEMM; RoPE + KV append; attention; o GEMM (+ residual);
# norm + gate_up GEMM; activation + down GEMM (+ residual).
OPS = ("qkv", "rope_append", "attention", "o", "gate_up", "down")
TP_OPS = ("qkv", "rope_append", "attention", "o", "o_allreduce", "gate_up", "down", "down_allreduce")
AG_OPS = ("qkv", "rope_append", "attention", "attn_allgather", "o", "o_allgather", "gate_up", "down",
          "down_allreduce")
RESOURCE = {"qkv": "compute", "rope_append": "memory", "attention": "memory", "o": "compute",
            "gate_up": "compute", "down": "compute", "o_allreduce": "network", "down_allreduce": "network",
            "attn_allgather": "network", "o_allgather": "network"}
NETWORK_STREAM = 3   # where the generic plans put the all-reduces
NETWORK_SMS = 24     # SMs an all-reduce occupies: NCCL runs 24 channels (one CTA each) on 4 H200s (measured)
BESIDE_ALL = ("o", "gate_up", "down")   # the lead nano-batch's GEMMs a two-nano-batch plan runs beside attention


def check_beside_attention(changes: dict) -> None:
  """A share's decode attention variant (PipelineConfig.beside_attention, Executor's, autosearch's flag):
  integer kernel options, none of those the host builds query blocks and the page table by."""
  for key, value in changes.items():
    if key in BESIDE_ATTENTION_FIXED or not isinstance(value, int):
      raise PipelineConfigError(
          f"beside_attention: {key}={value!r}; it takes integer kernel options and cannot change "
          f"{'/'.join(BESIDE_ATTENTION_FIXED)} (the host's query blocks and page table use those)")


def ops_for(tp: int) -> tuple[str, ...]:
  """One layer's ops in data order: with tensor parallelism, each row-parallel GEMM is followed by its
  all-reduce."""
  return TP_OPS if tp > 1 else OPS


class PipelineConfigError(ValueError):
  pass


@dataclasses.dataclass
class NanoOp:
  op: str
  nano_batch: int
  stream: int = 0
  sm_share: int = 0          # 0: the whole GPU
  deps: list[str] = dataclasses.field(default_factory=list)

  @property
  def id(self) -> str:
    return f"{self.op}@{self.nano_batch}"


@dataclasses.dataclass
class PipelineConfig:
  dense_batch: int
  num_sms: int
  nano_batches: list[int]
  ops: list[NanoOp]
  name: str = ""
  version: int = VERSION
  tp: int = 1                # the tensor-parallel degree the plan is for
  # Changes to the decode attention's configuration where it runs on an SM share beside other kernels
  # (Executor's beside_attention), e.g. {"prefetch_pages": 1, "num_stages": 3, "programs_per_sm": 1}: the
  # variant the plan's shares were measured with. Empty: the engine's configuration everywhere.
  beside_attention: dict[str, int] = dataclasses.field(default_factory=dict)

  # --- (de)serialization ------------------------------------------------------------------------------
  def to_json(self) -> str:
    d = dataclasses.asdict(self)
    return json.dumps(d, indent=1)

  @classmethod
  def from_dict(cls, d: dict) -> "PipelineConfig":
    if d.get("version") != VERSION:
      raise PipelineConfigError(f"pipeline config version {d.get('version')!r}; this build reads {VERSION}")
    try:
      ops = [NanoOp(**o) for o in d["ops"]]
      cfg = cls(dense_batch=int(d["dense_batch"]), num_sms=int(d["num_sms"]),
                nano_batches=[int(n) for n in d["nano_batches"]], ops=ops, name=d.get("name", ""),
                tp=int(d.get("tp", 1)), beside_attention=dict(d.get("beside_attention") or {}))
    except (KeyError, TypeError) as e:
      raise PipelineConfigError(f"malformed pipeline config: {e}") from None
    cfg.validate()
    return cfg

  @classmethod
  def load(cls, path: str) -> "PipelineConfig":
    try:
      with open(path) as f:
        return cls.from_dict(json.load(f))
    except json.JSONDecodeError as e:
      raise PipelineConfigError(f"{path}: not valid JSON: {e}") from None

  # --- checks -----------------------------------------------------------------------------------------
  def validate(self) -> None:
    def fail(msg):
      raise PipelineConfigError(msg)
    if self.tp < 1:
      fail(f"tp must be >= 1, got {self.tp}")
    check_beside_attention(self.beside_attention)
    if sum(self.nano_batches) != self.dense_batch or any(n <= 0 for n in self.nano_batches):
      fail(f"nano-batches {self.nano_batches} do not cover the dense batch {self.dense_batch}")
    ids = [o.id for o in self.ops]
    want = {f"{op}@{nb}" for nb in range(len(self.nano_batches)) for op in self.ops_of(nb)}
    if len(ids) != len(set(ids)):
      fail(f"a nano-op appears twice: {sorted(i for i in ids if ids.count(i) > 1)[0]}")
    if set(ids) != want:
      missing, extra = sorted(want - set(ids)), sorted(set(ids) - want)
      fail(f"nano-ops missing {missing} or unknown {extra}")
    for o in self.ops:
      if not 0 <= o.sm_share <= self.num_sms:
        fail(f"{o.id}: SM share {o.sm_share} outside [0, {self.num_sms}]")
      for dep in o.deps:
        if dep.removeprefix("prev:") not in want:
          fail(f"{o.id}: unknown dependency {dep!r}")
    # The data order inside a nano-batch must be among the dependencies (directly or transitively).
    order = {i: k for k, i in enumerate(ids)}
    for o in self.ops:
      for d in o.deps:
        if not d.startswith("prev:") and order[d] > order[o.id]:
          fail(f"{o.id} depends on {d}, which comes later in the list (a cycle)")
    anc = self._ancestors()
    for nb in range(len(self.nano_batches)):
      layer_ops = self.ops_of(nb)
      for a, b in zip(layer_ops, layer_ops[1:]):
        if f"{a}@{nb}" not in anc[f"{b}@{nb}"]:
          fail(f"{b}@{nb} must depend on {a}@{nb}")
    # One KV buffer per layer: an append after (or beside) an attention that reads it makes XLA copy the
    # whole cache (measured: a 95 GiB allocation). Every attention must follow every append of the layer.
    appends = [f"rope_append@{nb}" for nb in range(len(self.nano_batches))]
    for o in self.ops:
      if o.op == "attention":
        missing = [a for a in appends if a not in anc[o.id]]
        if missing:
          fail(f"{o.id} must depend on {missing[0]}: all KV appends of a layer precede its attention reads")
    # Concurrent nano-ops (neither an ancestor of the other) on different streams share the SMs.
    for i, x in enumerate(self.ops):
      for y in self.ops[i + 1:]:
        if x.stream != y.stream and x.id not in anc[y.id] and y.id not in anc[x.id]:
          share = (x.sm_share or self.num_sms) + (y.sm_share or self.num_sms)
          if share > self.num_sms:
            fail(f"{x.id} and {y.id} may run at once with {share} SMs > {self.num_sms}")

  def ops_of(self, nano_batch: int) -> tuple[str, ...]:
    """The layer's ops for one nano-batch, in data order: AG_OPS where the plan all-gathers its attention
    output (tensor parallelism only), else ops_for(tp)."""
    if self.tp > 1 and any(o.op == "attn_allgather" and o.nano_batch == nano_batch for o in self.ops):
      return AG_OPS
    return ops_for(self.tp)

  def _ancestors(self) -> dict[str, set[str]]:
    anc: dict[str, set[str]] = {}
    for o in self.ops:
      s: set[str] = set()
      for d in o.deps:
        if not d.startswith("prev:"):
          s |= {d} | anc[d]
      anc[o.id] = s
    return anc

  def sizes_for(self, num_tokens: int, align: int) -> list[int]:
    """Nano-batch sizes for a bucket of num_tokens: the config's proportions, in multiples of `align`;
    one nano-batch when the bucket is too small to split."""
    if num_tokens == self.dense_batch:
      return list(self.nano_batches)
    sizes, used = [], 0
    for n in self.nano_batches[:-1]:
      s = max(align, round(n * num_tokens / self.dense_batch / align) * align)
      sizes.append(s)
      used += s
    if used >= num_tokens:
      return [num_tokens]
    return sizes + [num_tokens - used]


def single(dense_batch: int, num_sms: int, name: str = "single", tp: int = 1) -> PipelineConfig:
  """One nano-batch, every op on the whole GPU in order: the sequential schedule as a PipelineConfig (what
  the auto-search ships when no split is predicted to beat it)."""
  ops, prev = [], f"prev:{ops_for(tp)[-1]}@0"     # after the previous layer's last op (its all-reduce under TP)
  for op in ops_for(tp):
    ops.append(NanoOp(op, 0, 1, num_sms, [prev]))
    prev = f"{op}@0"
  cfg = PipelineConfig(dense_batch=dense_batch, num_sms=num_sms, nano_batches=[dense_batch], ops=ops, name=name,
                       tp=tp)
  cfg.validate()
  return cfg


def generic_default(dense_batch: int, num_sms: int, tp: int = 1, allgather: tuple[int, ...] = ()) -> PipelineConfig:
  """Two halves; nano-batch 1's attention on a quarter of the SMs beside nano-batch 0's GEMMs
  (`two_nano_batches` with lead 0); `allgather`: the nano-batches that take o's all-gather form."""
  half = (dense_batch // 2 // 128) * 128 or dense_batch // 2
  return two_nano_batches(dense_batch, num_sms, [half, dense_batch - half], lead=0, tp=tp,
                          name="generic-2" if tp == 1 else f"generic-2-tp{tp}", allgather=allgather)


def decode_overlap(dense_batch: int, num_sms: int, decode_rows: int, tp: int = 1, align: int = 128,
                   beside: tuple[str, ...] = BESIDE_ALL) -> PipelineConfig:
  """Nano-batch 0 holds the decode rows (rounded up to `align`), nano-batch 1 the prefill rows; the
  prefill attention runs first on the whole GPU, then the decode attention on a quarter of the SMs beside
  nano-batch 1's GEMMs named in `beside` (`two_nano_batches` with lead 1): the memory-bound decode
  attention is the op the pipeline hides."""
  if dense_batch > align:
    first = min(max(align, -(-decode_rows // align) * align), dense_batch - align)
  else:
    first = dense_batch // 2
  name = "decode-overlap" + ("" if beside == BESIDE_ALL else "-" + "+".join(beside))
  return two_nano_batches(dense_batch, num_sms, [first, dense_batch - first], lead=1, tp=tp,
                          name=name if tp == 1 else f"{name}-tp{tp}", beside=beside)


def two_nano_batches(dense_batch: int, num_sms: int, sizes: list[int], lead: int, tp: int = 1,
                     name: str = "", beside: tuple[str, ...] = BESIDE_ALL,
                     allgather: tuple[int, ...] = ()) -> PipelineConfig:
  """Two nano-batches: both qkv GEMMs and KV appends, then the `lead` nano-batch's attention on the whole
  GPU, then the other's attention (stream 2, a quarter of the SMs) beside the lead's GEMMs named in
  `beside` (stream 1, the rest), then the lead's other GEMMs and the other's GEMMs on the whole GPU.
  `beside` is a prefix of (o, gate_up, down): a GEMM left out waits for the attention and takes the whole
  GPU (measured on an H200: down on half the SMs ran alone after the attention beside it had ended).
  Under tensor parallelism each collective goes to stream 3 as soon as its input is ready, so the lead's
  can run beside the other's attention and GEMMs (the paper's network overlap); the nano-batches in
  `allgather` take the all-gather form of o (AG_OPS), the others o's all-reduce."""
  if not beside or tuple(beside) != BESIDE_ALL[:len(beside)]:
    raise PipelineConfigError(f"beside must be a non-empty prefix of {BESIDE_ALL}, got {beside}")
  ag = set(allgather)
  if ag and tp == 1:
    raise PipelineConfigError("the all-gather form of o needs tensor parallelism (tp > 1)")
  if not ag <= {0, 1}:
    raise PipelineConfigError(f"allgather names nano-batches 0 and 1 only, got {sorted(ag)}")
  a, b = lead, 1 - lead
  attn, gemm = max(num_sms // 4, 1), num_sms - max(num_sms // 4, 1)
  net = min(NETWORK_SMS, num_sms // 4) or 1
  # Under TP the GEMMs leave room for the collectives beside them: the lead's beside the other's
  # attention, and each collective beside the next GEMM.
  rest = num_sms - net if tp > 1 else num_sms
  gemm -= num_sms - rest
  last = "down_allreduce" if tp > 1 else "down"
  o_net = lambda nb: ("o_allgather" if nb in ag else "o_allreduce") if tp > 1 else None
  # o's input: the attention output, or its all-gather (the whole heads) in the all-gather form
  o_in = lambda nb: f"attn_allgather@{nb}" if nb in ag else f"attention@{nb}"
  after_o = lambda nb: f"{o_net(nb)}@{nb}" if tp > 1 else f"o@{nb}"   # what gate_up waits for
  ops = [
      NanoOp("qkv", 0, 1, num_sms, [f"prev:{last}@0"]),
      NanoOp("qkv", 1, 1, num_sms, [f"prev:{last}@1"]),
      NanoOp("rope_append", 0, 1, num_sms, ["qkv@0"]),
      NanoOp("rope_append", 1, 1, num_sms, ["qkv@1", "rope_append@0"]),
      NanoOp("attention", a, 2, num_sms, ["rope_append@0", "rope_append@1"]),
      NanoOp("attention", b, 2, attn, ["rope_append@0", "rope_append@1", f"attention@{a}"]),
  ]
  if a in ag:
    ops.append(NanoOp("attn_allgather", a, NETWORK_STREAM, net, [f"attention@{a}"]))
  ops.append(NanoOp("o", a, 1, gemm, [o_in(a)]))                       # the lead's GEMMs beside attention@b
  if tp > 1:
    ops.append(NanoOp(o_net(a), a, NETWORK_STREAM, net, [f"o@{a}"]))
  if b in ag:   # the other's gather may run beside the lead's MLP
    ops.append(NanoOp("attn_allgather", b, NETWORK_STREAM, net, [f"attention@{b}", f"{o_net(a)}@{a}"]))

  def lead_gemm(op, deps):   # beside attention@b on the rest of the SMs, or after it on the whole GPU
    return (NanoOp(op, a, 1, gemm, deps) if op in beside else
            NanoOp(op, a, 1, rest, deps + [f"attention@{b}"]))
  ops += [lead_gemm("gate_up", [after_o(a)]), lead_gemm("down", [f"gate_up@{a}"])]
  if tp > 1:
    ops.append(NanoOp("down_allreduce", a, NETWORK_STREAM, net, [f"down@{a}"]))
  ops.append(NanoOp("o", b, 1, rest, [o_in(b), f"down@{a}"]))
  if tp > 1:
    ops.append(NanoOp(o_net(b), b, NETWORK_STREAM, net, [f"o@{b}", f"down_allreduce@{a}"]))
  ops += [NanoOp("gate_up", b, 1, rest, [after_o(b)]),
          NanoOp("down", b, 1, rest, [f"gate_up@{b}"])]
  if tp > 1:
    ops.append(NanoOp("down_allreduce", b, NETWORK_STREAM, net, [f"down@{b}"]))
  if ag and name:
    name += "-ag" + "".join(str(nb) for nb in sorted(ag))
  cfg = PipelineConfig(dense_batch=dense_batch, num_sms=num_sms, nano_batches=list(sizes), ops=ops, name=name, tp=tp)
  cfg.validate()
  return cfg


def with_beside_share(cfg: PipelineConfig, attention_sms: int) -> PipelineConfig:
  """A copy of a two-nano-batch plan with the attention that runs on a share given `attention_sms` and
  the GEMMs that may run beside it the rest (less the all-reduces' share under TP)."""
  out = copy.deepcopy(cfg)
  anc = out._ancestors()
  beside = [o for o in out.ops if o.op == "attention" and 0 < o.sm_share < out.num_sms]
  if len(beside) != 1:
    raise PipelineConfigError(f"{out.name}: expected one attention on an SM share, found {len(beside)}")
  attn = beside[0]
  attn.sm_share = attention_sms
  for op in out.ops:
    if RESOURCE[op.op] == "compute" and op.id not in anc[attn.id] and attn.id not in anc[op.id]:
      op.sm_share = out.num_sms - attention_sms - (NETWORK_SMS if out.tp > 1 else 0)
  out.validate()
  return out
