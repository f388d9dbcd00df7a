"""NanoFlow's auto-search: profile the kernels (GPU), then solve the pipeline schedule (MILP, any machine).

  PYTHONPATH=. python3 launch/autosearch.py --model=llama-3-8b --device_kind=h200 --out_dir=DIR
  python launch/autosearch.py --model=llama-3-8b --device_kind=h200 --out_dir=DIR --from_profile

Writes DIR/pipeline_<model>_<device>.json (a PipelineConfig), DIR/gantt_<model>_<device>.png (the
predicted pipeline of one layer) and, after profiling, the table to nanoflow_jax/runtime/profiles/.
On the GPU it then runs the real step (launch/mixed_step.MixedStep: the decode/prefill mix searched for)
sequentially and with the best split, and draws the split's measured timeline from a profiler trace to
DIR/timeline_<model>_<device>.png; --nomeasure skips that.
With --ship the config also goes to nanoflow_jax/runtime/configs/, where the engine looks for one.
"""
from __future__ import annotations

import os
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llama-3-8b", "Named shape.")
flags.DEFINE_string("device_kind", "h200", "Device kind the tables and configs are for.")
flags.DEFINE_string("out_dir", "/tmp/autosearch", "Where the config and the chart go.")
flags.DEFINE_bool("from_profile", False, "Search from the stored table only (no GPU needed).")
flags.DEFINE_bool("ship", False, "Also write the config to nanoflow_jax/runtime/configs/.")
flags.DEFINE_integer("dense_batch", 2048, "Tokens per step.")
flags.DEFINE_integer("decodes", 512, "Decode rows in the step (the rest is prefill).")
flags.DEFINE_integer("context", 1024, "Decode context length profiled.")
flags.DEFINE_list("shares", ["132", "99", "66", "33"], "SM shares profiled.")
flags.DEFINE_list("sizes", ["256", "512", "1024", "2048"], "Token counts profiled.")
flags.DEFINE_bool("measure", True, "After a GPU profile, time the real step and draw its measured timeline.")
flags.DEFINE_integer("tp", 1, "Tensor parallelism: profile one device's shard of each layer and the all-reduces "
                     "across this many GPUs; the search then schedules the all-reduces as network nano-ops.")
flags.DEFINE_string("beside_attention", "", "Changes to the decode attention's configuration on SM shares below "
                    "the whole GPU, e.g. prefetch_pages=1,num_stages=3,programs_per_sm=1: profiled so, and carried "
                    "by the config searched (the executor then runs the attention so on its share).")
flags.DEFINE_bool("interference", True, "Stage 1 also measures a GEMM and decode attention running together.")
flags.DEFINE_enum("quantization", None, ["fp8"], "Profile and search the fp8 variant: e4m3 GEMMs on their SM shares "
                  "(pallas_kernels/gemm_fp8.py, each with its activation quantization, as --fp8_gemm=mosaic runs "
                  "them) and an fp8 KV cache; stored and shipped as <model>_<device>_fp8, which the engine takes "
                  "for fp8 weights.")
flags.DEFINE_integer("compile_workers", min(8, os.cpu_count() or 1), "Threads compiling stage 1's kernels (all "
                     "compiled before any is timed).")
flags.DEFINE_integer("power_sample_ms", 100, "Sample the board's power (nvidia-smi) at this interval while stage 1 "
                     "runs: the median per op (on the whole GPU) and per pair goes into the profile (0: off).")


def _time(fn, *args, iters=10) -> float:
  from nanoflow_jax.perf import median_seconds
  return 1e3 * median_seconds(fn, *args, iters=iters, samples=3)


def _decode_config_on(decode_cfg: dict, share: int, num_sms: int) -> dict:
  """The decode attention's configuration on `share` SMs, as the executor runs it: --beside_attention's
  changes below the whole GPU."""
  from pallas_kernels.paged_attention import config_changes
  return decode_cfg if share >= num_sms else {**decode_cfg, **config_changes(FLAGS.beside_attention)}


def _fp8_gemm_call(op: str, share: int):
  """The fp8 GEMM as the engine runs it with fp8_gemm=mosaic: the activations quantized per token, then
  gemm_fp8 (gate_up: gemm_fp8_silu_mul) on `share` SMs."""
  from nanoflow_jax import quantization as Q
  from pallas_kernels import gemm_fp8

  def call(a, w8, w_scale, residual):
    a8, a_scale = Q.quantize_activation(a)
    if op == "gate_up":
      return gemm_fp8.gemm_fp8_silu_mul(a8, w8, a_scale, w_scale, num_sms=share)
    return gemm_fp8.gemm_fp8(a8, w8, a_scale, w_scale, residual, num_sms=share)
  return call


def _windows(powered):
  """The power.Windows to keep run windows in; without one, one whose sampler reads nothing."""
  from launch import power
  return powered if powered is not None else power.Windows(power.Sampler(None))


def _write(path: str, text: str) -> None:
  """Whole or not at all: a process killed mid-write (a device call's time limit) leaves no half file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _time_cases(cases: list, what: str, times: dict, timed, num_sms: int) -> None:
  """Stage 1's cases [(op, share, rows, fn, args)]: all compiled first (perf.compile_all, on --compile_workers
  threads), then each timed into times[op][share]; prints where the seconds went (a kernel's first call may
  still finish its compile on the device: it is in the timing's seconds)."""
  from nanoflow_jax.perf import compile_all
  t = time.perf_counter()
  compiled = compile_all([(f"{op} {m} rows on {s} SMs", fn, args) for op, s, m, fn, args in cases],
                         workers=FLAGS.compile_workers, desc=f"compiling {what}")
  t_compile = time.perf_counter() - t
  for (op, s, m, _, args), f in zip(cases, compiled):
    times[op][str(s)].append([m, timed(op if s >= num_sms else None, f, *args)])
    print(op, m, s, times[op][str(s)][-1][1], flush=True)
  print(f"stage 1: {len(cases)} {what} kernels compiled in {t_compile:.1f} s ({FLAGS.compile_workers} threads), "
        f"timed in {time.perf_counter() - t - t_compile:.1f} s", flush=True)


def profile(cfg, shares: list[int], sizes: list[int], context: int, fp8: bool = False, powered=None):
  """Stage 1: ms per kernel call, by op, SM share and token count (one layer's shapes). fp8: the fp8
  variant's kernels (fp8 GEMMs, fp8 KV cache). powered: a power.Windows keeping the whole-GPU runs' windows."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from nanoflow_jax import quantization as Q
  from nanoflow_jax.models import layers
  from nanoflow_jax.runtime.autosearch import Profile
  from pallas_kernels import gemm
  from pallas_kernels.paged_attention import append_kv, attention_call, configs, default_backend, query_blocks
  backend = default_backend()       # the attention implementation the engine will run
  kv_dtype = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
  h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  decode_cfg, prefill_cfg = configs(backend, kv_dtype, head_dim=hd, page_size=16,
                                    sliding_window=cfg.sliding_window)
  # (a CPU has no SMs: in the CPU test the largest share stands for the whole device)
  num_sms = getattr(jax.devices()[0], "core_count", max(shares))
  powered = _windows(powered)
  timed = lambda key, fn, *args: powered.run(key, lambda: _time(fn, *args))
  print("attention kernel:", backend, "prefill:", prefill_cfg.get("kernel", backend), flush=True)
  hq, hkv = cfg.num_heads, cfg.num_kv_heads
  shapes = {"qkv": (h, hkv * (cfg.q_per_kv + 2) * hd), "o": (hq * hd, h), "gate_up": (h, 2 * i), "down": (i, h)}
  times: dict = {op: {str(s): [] for s in shares} for op in (*shapes, "rope_append", "decode_attention",
                                                              "prefill_attention")}
  key = jax.random.PRNGKey(0)
  cases = []   # (op, share, rows, the fn, its args): every GEMM compiled at once (compile_all), then timed
  for op, (k, n) in shapes.items():
    b = jax.random.normal(key, (k, n), jnp.bfloat16) * 0.02
    weights = jax.jit(lambda b: Q.quantize_weight(b, 1))(b) if fp8 else (b,)   # (w8 [N, K], scale [N]) or (b,)
    for m in sizes:
      a = jax.random.normal(key, (m, k), jnp.bfloat16)
      res = jnp.zeros((m, n), jnp.bfloat16) if op in ("o", "down") else None
      for s in shares:
        f = _fp8_gemm_call(op, s) if fp8 else (lambda a, b, r, s=s: gemm.gemm(a, b, r, num_sms=s))
        cases.append((op, s, m, f, (a, *weights, res)))
  _time_cases(cases, "GEMMs", times, timed, num_sms)
  cases.clear()
  # rope + KV append: an XLA fusion on the whole GPU, the same time at every share
  pages = (max(sizes) * context) // 16 + max(sizes) // 16 + 16
  cache = [jnp.zeros((1, hkv, pages, 16, hd), kv_dtype), jnp.zeros((1, hkv, pages, 16, hd), kv_dtype)]
  inv = layers.rope_inv_freq(cfg.rope, hd)
  # The cache is donated and threaded through, as in the step: an undonated one would be copied.
  f = jax.jit(lambda q, k, kc, vc, pos: (layers.apply_rope(q, pos, inv), *append_kv(
      kc, vc, 0, layers.apply_rope(k, pos, inv), k, pos // 16, pos % 16)), donate_argnums=(2, 3))
  for m in sizes:
    q = jnp.ones((m, hq, hd), jnp.bfloat16)
    kv = jnp.ones((m, hkv, hd), jnp.bfloat16)
    pos = jnp.arange(m, dtype=jnp.int32)

    def rope_append(q=q, kv=kv, pos=pos):
      out, cache[0], cache[1] = f(q, kv, cache[0], cache[1], pos)
      return out
    t = _time(rope_append)
    for s in shares:
      times["rope_append"][str(s)].append([m, t])
  cache.clear()  # free the caches before the attention inputs are made
  vc = jax.random.normal(key, (1, hkv, pages, 16, hd), jnp.bfloat16).astype(kv_dtype)
  kc = jax.random.normal(jax.random.PRNGKey(1), (1, hkv, pages, 16, hd), jnp.bfloat16).astype(kv_dtype)
  for m in sizes:
    # decodes: m sequences at `context`
    table = np.random.default_rng(0).permutation(pages)[:m * (context // 16)].reshape(m, -1).astype(np.int32)
    q = jax.random.normal(key, (m, hq, hd), jnp.bfloat16)
    st, ln, nb = query_blocks([1] * m, m, decode_cfg["block_q"])
    slots, positions = np.arange(m, dtype=np.int32), np.full(m, context - 1, np.int32)
    # prefill: one prompt of m tokens
    ptable = np.arange(m // 16 + 1, dtype=np.int32)[None]
    pst, pln, pnb = query_blocks([m], m, prefill_cfg["block_q"])
    pslots, ppos = np.zeros(m, np.int32), np.arange(m, dtype=np.int32)
    for s in shares:
      dcfg = _decode_config_on(decode_cfg, s, num_sms)
      cases.append(("decode_attention", s, m, lambda q, kc, vc, s=s, dcfg=dcfg, table=table, st=st, ln=ln, nb=nb,
                    slots=slots, positions=positions: attention_call(
                        backend, q, kc, vc, 0, table, slots, positions, st, ln, jnp.int32(nb), num_sms=s,
                        config=dcfg), (q, kc, vc)))
      cases.append(("prefill_attention", s, m, lambda q, kc, vc, s=s, ptable=ptable, pst=pst, pln=pln, pnb=pnb,
                    pslots=pslots, ppos=ppos: attention_call(
                        backend, q, kc, vc, 0, ptable, pslots, ppos, pst, pln, jnp.int32(pnb), num_sms=s,
                        config=prefill_cfg), (q, kc, vc)))
  _time_cases(cases, "attention", times, timed, num_sms)
  return Profile(model=cfg.name, device=FLAGS.device_kind, num_sms=num_sms, context=context, times=times,
                 variant="fp8" if fp8 else "")


def profile_interference(cfg, gemm_shares: list[int], context: int, tokens: int = 1024, decodes: int = 512,
                         fp8: bool = False, powered=None):
  """Stage 1, pairs: the gate_up GEMM (`tokens` rows) on each GEMM share and decode attention (`decodes`
  sequences at `context`) on the remaining SMs, each a chain of calls on its own stream in one step
  (stream annotation + command buffers, as the engine runs them). Returns {gemm share: factor}, factor =
  time together / the longer chain alone. fp8: the fp8 variant (gate_up's fp8 GEMM, an fp8 KV cache)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from nanoflow_jax import perf
  from nanoflow_jax import quantization as Q
  from pallas_kernels import gemm
  from pallas_kernels.paged_attention import attention_call, configs, default_backend, query_blocks
  backend = default_backend()
  kv_dtype = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
  hkv, hd, num_sms = cfg.num_kv_heads, cfg.head_dim, jax.devices()[0].core_count
  dcfg = _decode_config_on(configs(backend, kv_dtype)[0], 0, num_sms)   # always on a share here
  key = jax.random.PRNGKey(0)
  a = jax.random.normal(key, (tokens, cfg.hidden_size), jnp.bfloat16)
  b = jax.random.normal(key, (cfg.hidden_size, 2 * cfg.intermediate_size), jnp.bfloat16) * 0.02
  weights = jax.jit(lambda b: Q.quantize_weight(b, 1))(b) if fp8 else (b,)
  pages = decodes * (context // 16) + 16
  kc = jax.random.normal(key, (1, hkv, pages, 16, hd), jnp.bfloat16).astype(kv_dtype)
  vc = jax.random.normal(jax.random.PRNGKey(1), (1, hkv, pages, 16, hd), jnp.bfloat16).astype(kv_dtype)
  q = jax.random.normal(key, (decodes, cfg.num_heads, hd), jnp.bfloat16)
  table = np.random.default_rng(0).permutation(pages)[:decodes * (context // 16)].reshape(decodes, -1).astype(np.int32)
  st, ln, nb = query_blocks([1] * decodes, decodes, dcfg["block_q"])
  slots, positions = np.arange(decodes, dtype=np.int32), np.full(decodes, context - 1, np.int32)
  powered = _windows(powered)
  out = {}
  for gs in gemm_shares:
    asms = num_sms - gs
    if asms <= 0:
      continue
    gemm_call = ((lambda a, w8, ws, gs=gs: _fp8_gemm_call("gate_up", gs)(a, w8, ws, None)) if fp8
                 else (lambda a, b, gs=gs: gemm.gemm(a, b, num_sms=gs)))
    attention = (lambda q, kc, vc, asms=asms: attention_call(backend, q, kc, vc, 0, table, slots, positions, st, ln,
                                                             jnp.asarray(nb, jnp.int32), num_sms=asms, config=dcfg))
    pair = lambda: perf.concurrent_seconds(gemm_call, (a, *weights), attention, (q, kc, vc))
    t = powered.run(f"pair:{gs}", pair)
    out[str(gs)] = t["both"] / max(t["chain_a"], t["chain_b"])
    print(f"interference: GEMM on {gs} SMs x{t['reps_a']} {t['chain_a'] * 1e3:.2f} ms, attention on {asms} "
          f"x{t['reps_b']} {t['chain_b'] * 1e3:.2f} ms, together {t['both'] * 1e3:.2f} ms: factor "
          f"{out[str(gs)]:.2f}", flush=True)
  return out


def profile_collectives(hidden: int, sizes: list[int], tp: int) -> dict[str, dict[str, list[list[float]]]]:
  """Stage 1's network class: ms per collective over `tp` devices on [tokens, hidden] bf16, as the step
  runs them under shard_map: allreduce (the psum of o's and down's partial sums) and allgather (the
  all-gather form of o: every device's [tokens, hidden / tp] slice to all), keyed by the share the plans
  give them."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from nanoflow_jax import parallel
  from nanoflow_jax.runtime.plan import NETWORK_SMS
  mesh = parallel.make_mesh(tp)
  ops = {  # (the collective, how its input lies on the mesh)
      "allreduce": (lambda x: jax.lax.psum(x, parallel.AXIS), P(parallel.AXIS)),
      "allgather": (lambda x: jax.lax.all_gather(x, parallel.AXIS, axis=1, tiled=True), P(None, parallel.AXIS)),
  }
  out = {}
  for name, (fn, spec) in ops.items():
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=P(parallel.AXIS) if name == "allreduce"
                              else P(), check_vma=False))
    rows = []
    for m in sizes:
      # allreduce: one [m, hidden] block per device, stacked along the mesh axis; allgather: [m, hidden]
      # split by columns
      shape = (tp * m, hidden) if name == "allreduce" else (m, hidden)
      x = jax.device_put(jnp.ones(shape, jnp.bfloat16), NamedSharding(mesh, spec))
      rows.append([m, _time(f, x)])
      print(name, m, rows[-1][1], flush=True)
    out[name] = {str(NETWORK_SMS): rows}
  return out


def main(argv):
  del argv
  if not FLAGS.from_profile:   # before JAX starts the GPU backend: memory and the overlap flags
    from nanoflow_jax import compat
    compat.configure_gpu_memory()
    # As on one GPU, also with --tp: the pairs are timed on one device, and with XLA's latency-hiding
    # scheduler on (the TP setting) the two streams ran one after the other (session 7, --tp=4: factor
    # 1.91, about the two chains' sum; one GPU with it off: 1.2-1.5). The lone all-reduce needs no overlap.
    compat.enable_concurrent_command_buffers(1)
  from nanoflow_jax import config as config_lib
  from nanoflow_jax.runtime import autosearch
  from nanoflow_jax.runtime.plan import check_beside_attention
  from pallas_kernels.paged_attention import config_changes
  try:   # refused before any GPU time is spent
    beside = config_changes(FLAGS.beside_attention)
    check_beside_attention(beside)
  except ValueError as e:
    raise app.UsageError(f"--beside_attention: {e}") from None
  if beside and FLAGS.from_profile:
    raise app.UsageError("--beside_attention is a profiling choice; the stored profile carries its own")
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  variant = "fp8" if FLAGS.quantization == "fp8" else ""
  if variant and FLAGS.tp > 1:
    raise app.UsageError("--quantization=fp8 profiles one GPU for now (the fp8 GEMMs under TP are not profiled)")
  path = autosearch.profile_path(FLAGS.model, FLAGS.device_kind, FLAGS.tp, variant)
  if FLAGS.from_profile:
    if not os.path.exists(path):
      raise app.UsageError(f"no stored profile {path}: run without --from_profile on a GPU first")
    prof = autosearch.Profile.load(path)
  else:
    cfg = config_lib.named_shape(FLAGS.model)
    if cfg is None:
      raise app.UsageError(f"unknown named shape {FLAGS.model!r}")
    if FLAGS.tp > 1:
      from nanoflow_jax import parallel
      if not parallel.manual_tp_supported(cfg, FLAGS.tp):
        raise app.UsageError(f"{FLAGS.model} cannot run its layers per device at TP {FLAGS.tp}")
      full, cfg = cfg, parallel.local_config(cfg, FLAGS.tp)   # one device's shard of each layer
    from launch import power
    with power.Sampler(power.smi_command(FLAGS.power_sample_ms) if FLAGS.power_sample_ms else None) as sampler:
      powered = power.Windows(sampler)
      prof = profile(cfg, [int(s) for s in FLAGS.shares], [int(s) for s in FLAGS.sizes], FLAGS.context,
                     fp8=bool(variant), powered=powered)
      if FLAGS.tp > 1:
        prof.model, prof.tp = full.name, FLAGS.tp
        prof.times.update(profile_collectives(full.hidden_size, [int(s) for s in FLAGS.sizes], FLAGS.tp))
      prof.beside_attention = beside
      # The tables so far, kept apart from the profile's name (without the pairs a search would take no
      # interference): a call cut short by its time limit still brings them back.
      _write(os.path.join(FLAGS.out_dir, os.path.basename(path).replace(".json", "_stage1_tables.json")),
             prof.to_json())
      if FLAGS.interference:
        prof.interference = profile_interference(cfg, [s for s in map(int, FLAGS.shares) if s < prof.num_sms],
                                                 FLAGS.context, fp8=bool(variant), powered=powered)
    prof.power_w = powered.medians()
    print("power (median W):", prof.power_w or "no readings", flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for p in (path, os.path.join(FLAGS.out_dir, os.path.basename(path))):
      _write(p, prof.to_json())
  split = autosearch.search_split(prof, FLAGS.dense_batch, FLAGS.decodes)   # the MILPs, solved once
  cfg, ms, seq_ms, schedule = autosearch.search(prof, FLAGS.dense_batch, FLAGS.decodes, split=split)
  name = autosearch.config_name(FLAGS.model, FLAGS.device_kind, FLAGS.tp, variant)
  out = os.path.join(FLAGS.out_dir, f"pipeline_{name}.json")
  _write(out, cfg.to_json())
  if FLAGS.ship:
    ship = os.path.join(autosearch.SHIPPED_DIR, f"{name}.json")
    os.makedirs(os.path.dirname(ship), exist_ok=True)
    _write(ship, cfg.to_json())
  autosearch.gantt(schedule, os.path.join(FLAGS.out_dir, f"gantt_{name}.png"),
                   f"{FLAGS.model} on {FLAGS.device_kind}: nano-batches {cfg.nano_batches}, predicted layer "
                   f"{ms:.2f} ms vs sequential {seq_ms:.2f} ms")
  print(f"nano-batches {cfg.nano_batches}; predicted layer {ms:.3f} ms, sequential {seq_ms:.3f} ms "
        f"({seq_ms / ms:.2f}x); config {out}")
  if not FLAGS.from_profile and FLAGS.measure and FLAGS.tp == 1:   # (the step bench runs one device)
    measure(FLAGS.model, split[0], split[1], seq_ms, name, variant)


def measure(model_name: str, split, split_ms: float, seq_layer_ms: float, name: str, variant: str = "") -> None:
  """Times the real step sequentially and with the best split (its predicted layer time split_ms), and
  draws the split's measured timeline; in the fp8 variant with fp8 weights, our fp8 GEMMs and an fp8 cache."""
  import jax
  import jax.numpy as jnp
  from launch.mixed_step import MixedStep
  from nanoflow_jax.model import load_model
  model = load_model(model_name, dtype="bfloat16", random_weights=True, quantization=variant or None)
  step = MixedStep(model, FLAGS.decodes, FLAGS.context, FLAGS.dense_batch - FLAGS.decodes)
  options = dict(kv_dtype=jnp.float8_e4m3fn, fp8_gemm="mosaic") if variant else {}
  seq = step.time(None, **options)
  # A CPU trace has no GPU streams to draw: there the split is only timed (what the CPU test runs).
  png = os.path.join(FLAGS.out_dir, f"timeline_{name}.png") if jax.default_backend() == "gpu" else None
  ms = step.time(split, trace_dir=png and os.path.join(FLAGS.out_dir, "trace"), timeline_png=png, **options)
  predicted = seq_layer_ms / split_ms
  print(f"measured step ({step.describe}): sequential {seq:.1f} ms; best split {split.nano_batches} {ms:.1f} ms "
        f"({seq / ms:.2f}x; predicted {predicted:.2f}x); timeline {png or 'not drawn (no GPU)'}")


if __name__ == "__main__":
  app.run(main)
