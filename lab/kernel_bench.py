"""Kernel figures on the GPU, each against a ceiling measured in the same run.

  PYTHONPATH=. python3 lab/kernel_bench.py --out_dir=/tmp/kb [--quick]

- GEMM (bf16, fp32 accumulation) for LLaMA-3-8B and LLaMA-2-70B per-TP-shard shapes at each SM share,
  against XLA's GEMM on the same shape (TFLOP/s and the ratio).
- Paged decode attention (LLaMA-3-8B heads, 512 sequences at context 1024) at each SM share, against a
  device-to-device copy (TB/s counting bytes read; the copy counts read + write).
- Prefill attention over a 4096-token prompt, against the XLA GEMM peak (8192^3) of this run.
Writes kernel_bench.json and kernel_bench.md (the table) into --out_dir.
"""
from __future__ import annotations

import json
import os

if __package__ in (None, ""):
  import _root  # noqa: F401  (the repository root on sys.path: lab/_root.py)

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", "/tmp/kernel_bench", "Where the JSON and the markdown table go.")
flags.DEFINE_list("shares", ["132", "112", "96", "64", "48", "32"], "SM shares to measure.")
flags.DEFINE_bool("quick", False, "Fewer shapes (a smoke run).")
flags.DEFINE_integer("iters", 20, "Calls per timing sample.")
flags.DEFINE_bool("sweep_attention", False, "Only sweep the attention kernels' tunables (decode and prefill).")
flags.DEFINE_multi_string("sweep_variant", [], "--sweep_attention: instead of the grid, the engine's configuration "
                          "of each --sweep_kinds kind and these changes to it (e.g. prefetch_pages=1,num_stages=4), "
                          "each checked against the reference first; may be repeated (Triton only).")
flags.DEFINE_integer("sweep_sms", 132, "The SM share --sweep_attention runs the variants on.")
flags.DEFINE_list("sweep_kinds", ["decode", "prefill"], "Which attention shapes --sweep_attention sweeps.")
flags.DEFINE_list("attention_backends", ["pallas", "triton"],
                  "Attention implementations to time (triton needs jax-triton: see WORKSPACE.md).")
flags.DEFINE_enum("attention_kv_dtype", "bfloat16", ["bfloat16", "fp8"], "The attention shapes' KV cache type "
                  "(fp8 = float8_e4m3fn, read at half the bytes: decode TB/s count the bytes read).")
flags.DEFINE_integer("decode_context", 1024, "Context of the decode shape's sequences (512 x 1024 / context of "
                     "them: the same bytes of K and V at any context).")
flags.DEFINE_float("decode_spread", 0.0, "The decode shape's contexts drawn uniformly from --decode_context x (1 -+ "
                   "this) (same mean): real batches' sequences differ in length (1000/1000: 1000 to 2000), and a "
                   "fixed share of work items per program then leaves programs idle at the end.")
flags.DEFINE_integer("attention_page_size", 16, "The attention shapes' KV page size (tokens): the engine's default "
                     "is 16; an fp8 page of one head is then 2 KB of contiguous bytes.")
flags.DEFINE_list("prefill_chunks", ["4096"], "The prefill shape's prompts (token counts, each from position 0, laid "
                  "out back to back): one 4096-token prompt by default; 1536 is step_bench's mix step's chunk.")
flags.DEFINE_bool("skip_gemm", False, "Time the attention kernels only.")
flags.DEFINE_bool("rope_append", False, "Only time the fused RoPE + KV-append Triton kernel against the XLA "
                  "fusions it would replace (2048 tokens, LLaMA-3-8B heads, a 1 GB cache).")
flags.DEFINE_bool("rms_norm", False, "Only time the fused residual-add + RMSNorm Triton kernel against XLA's "
                  "fusion (2048 x 4096 bf16).")
flags.DEFINE_bool("grouped_gemm", False, "Only time the experts' grouped GEMM (Mixtral-8x7B shapes: 2048 tokens "
                  "top-2 over 8 experts) per SM share against XLA's ragged dot, with its error vs the reference.")
flags.DEFINE_bool("beside_gemm", False, "Only time decode attention variants on each --shares share beside the "
                  "gate_up GEMM on the rest of the SMs, against the two in turn on the whole GPU (Triton kernel).")
flags.DEFINE_multi_string("beside_variant", [], "--beside_gemm: a decode attention variant as changes to the "
                          "engine's configuration, e.g. swap_ab=1,programs_per_sm=1; may be repeated (default: "
                          "BESIDE_VARIANTS). The engine's configuration is always measured first.")
flags.DEFINE_enum("beside_shape", "llama-3-8b", ["llama-3-8b", "llama-2-70b-tp2", "llama-2-70b-tp4"],
                  "--beside_gemm's shapes: one GPU's share of this model's decode attention and gate_up GEMM.")
flags.DEFINE_bool("silu_mul", False, "Only time gate_up with the SiLU-and-multiply: XLA (dot + fusion), our GEMM + "
                  "XLA's silu_mul, and the fused kernel (gemm.gemm_silu_mul) in a few tilings, at each --shares share.")
flags.DEFINE_bool("prefill_ceiling", False, "Only time prefill attention on contiguous K/V with jax's "
                  "warp-specialized Hopper kernel (attention_mgpu) beside ours on the same shapes: a ceiling.")
flags.DEFINE_bool("stacked_gemm", False, "Only time the GEMM reading one layer of the stacked weights in place "
                  "(gemm(..., layer=i)) against the same GEMM on a weight of its own, at each --shares share.")
flags.DEFINE_bool("tune_gemm", False, "Only tune the GEMM tiles (gemm.TUNE_SPACE) of --tune_shapes at full grid; "
                  "writes gemm_configs.json (the shipped one with these choices merged in) into --out_dir: copy it "
                  "to pallas_kernels/ to ship it.")
flags.DEFINE_list("tune_shapes", ["70b-tp2-qkv", "70b-tp4-qkv", "70b-tp8-qkv", "70b-tp8-gate_up", "70b-tp1-down"],
                  "Shapes (names of the bench's GEMM table) to tune; 'all' for every one, '8b-small' for the 8B "
                  "shapes at 128-1024 rows.")

LLAMA3_8B_M2048 = {"qkv": (2048, 6144, 4096), "o": (2048, 4096, 4096), "gate_up": (2048, 28672, 4096),
                   "down": (2048, 4096, 14336)}


def llama3_8b_small_m() -> dict[str, tuple[int, int, int]]:
  """The decode-heavy steps' GEMMs (128-1024 rows): memory-bound, where tiles tuned at 2048 rows leave SMs
  idle (session 3: 1.55 TB/s of weights at 128 rows, docs/history/perf-notes.md). `--tune_shapes=8b-small`."""
  return {f"8b-m{m}-{op}": (m, n, k) for m in (128, 256, 512, 1024)
          for op, (_, n, k) in LLAMA3_8B_M2048.items()}


def llama2_70b_shard(tp: int) -> dict[str, tuple[int, int, int]]:
  m = 2048
  return {f"70b-tp{tp}-qkv": (m, 10240 // tp, 8192), f"70b-tp{tp}-o": (m, 8192, 8192 // tp),
          f"70b-tp{tp}-gate_up": (m, 57344 // tp, 8192), f"70b-tp{tp}-down": (m, 8192, 28672 // tp)}


def timeit(fn, *args, iters: int) -> float:
  from nanoflow_jax.perf import median_seconds
  return median_seconds(fn, *args, iters=iters)


def _kv_dtype():
  """--attention_kv_dtype as a jnp dtype."""
  import jax.numpy as jnp
  return jnp.float8_e4m3fn if FLAGS.attention_kv_dtype == "fp8" else jnp.bfloat16


def _attention_problem(kind: str, hkv: int = 8, g: int = 4):
  """The decode (512 sequences at context 1024, or --decode_context) or prefill (--prefill_chunks: prompts from
  position 0, one 4096-token prompt by default) shape of the table, with `hkv` KV heads of `g` query heads
  each (LLaMA-3-8B's by default): (q, cache, table, slots, positions, chunk lengths, work in bytes or FLOPs)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  d, ps = 128, FLAGS.attention_page_size
  prompts = [int(c) for c in FLAGS.prefill_chunks]
  ctx, b_ = FLAGS.decode_context, 512 * 1024 // FLAGS.decode_context   # decode: the same bytes at any context
  spread = int(ctx * FLAGS.decode_spread)
  contexts = np.random.default_rng(5).integers(ctx - spread, ctx + spread + 1, b_) if spread else np.full(b_, ctx)
  per_seq = [-(-int(c) // ps) for c in (contexts if kind == "decode" else prompts)]   # whole pages per sequence
  pages = sum(per_seq)
  kv_dtype = _kv_dtype()
  cache = (jax.random.normal(jax.random.PRNGKey(3), (1, hkv, pages, ps, d), jnp.bfloat16).astype(kv_dtype),
           jax.random.normal(jax.random.PRNGKey(8), (1, hkv, pages, ps, d), jnp.bfloat16).astype(kv_dtype))
  if kind == "decode":   # each sequence's pages scattered over the cache
    order = np.random.default_rng(0).permutation(pages).astype(np.int32)
    table = np.zeros((b_, max(per_seq)), np.int32)
    first = np.cumsum([0] + per_seq[:-1])
    for i, n in enumerate(per_seq):
      table[i, :n] = order[first[i]:first[i] + n]
    slots, positions, chunks = np.arange(b_, dtype=np.int32), (contexts - 1).astype(np.int32), [1] * b_
    work = 2 * int(contexts.sum()) * hkv * d * jnp.dtype(kv_dtype).itemsize   # bytes of K and V read
  else:
    table = np.zeros((len(prompts), max(per_seq)), np.int32)
    first = np.cumsum([0] + per_seq[:-1])
    for i, n in enumerate(per_seq):
      table[i, :n] = first[i] + np.arange(n)
    slots = np.concatenate([np.full(c, i, np.int32) for i, c in enumerate(prompts)])
    positions = np.concatenate([np.arange(c, dtype=np.int32) for c in prompts])
    chunks = prompts
    work = sum(2 * c * c * hkv * g * d for c in prompts)   # causal: half of 4 T^2 Hq D per prompt
  q = jax.random.normal(jax.random.PRNGKey(4), (len(slots), hkv * g, d), jnp.bfloat16)
  return q, cache, table, slots, positions, chunks, work


def time_attention(backend: str, kind: str, cfg: dict, num_sms: int, iters: int, problem=None) -> float:
  """Seconds per call of one attention implementation and configuration."""
  import jax
  import jax.numpy as jnp
  from pallas_kernels.paged_attention import attention_call, query_blocks
  q, cache, table, slots, positions, chunks, _ = problem or _attention_problem(kind)
  start, length, nb = query_blocks(chunks, len(slots), cfg["block_q"])
  f = jax.jit(lambda q, c: attention_call(backend, q, c[0], c[1], 0, table, slots, positions, start, length,
                                          jnp.int32(nb), num_sms=num_sms, config=cfg))
  return timeit(f, q, cache, iters=iters)


def check_attention(backend: str, kind: str, cfg: dict, problem) -> float:
  """Relative error against the jnp reference on the bench's own inputs (decode: all of them; prefill:
  the first 512 query tokens, to keep the reference cheap)."""
  import jax.numpy as jnp
  import numpy as np
  from pallas_kernels.paged_attention import attention_call, paged_attention_reference, query_blocks
  q, cache, table, slots, positions, chunks, _ = problem
  if kind == "prefill":   # the first prompt's first 512 tokens
    n = min(512, chunks[0])
    q, slots, positions, chunks = q[:n], slots[:n], positions[:n], [n]
  start, length, nb = query_blocks(chunks, len(slots), cfg["block_q"])
  out = attention_call(backend, q, cache[0], cache[1], 0, table, slots, positions, start, length, jnp.int32(nb),
                       num_sms=132, config=cfg)
  ref = paged_attention_reference(q, cache[0], cache[1], 0, table, slots, positions)
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _variants(backend: str, kind: str):
  import itertools
  if backend == "pallas":
    keys = ("block_q", "pages_per_block", "num_warps", "num_stages", "programs_per_sm")
    grid = (itertools.product([1, 4], [4, 8, 16], [4, 8], [2, 3], [1, 2]) if kind == "decode" else
            itertools.product([16, 32, 64], [2, 4, 8], [4, 8], [2, 3], [1]))
  else:
    keys = ("block_q", "block_n", "num_warps", "num_stages", "programs_per_sm", "heavy_first", "dot_f16")
    # f16 dots only with an fp8 cache (e4m3 -> f16 is one conversion; session 3: fp8 with bf16 dots ran
    # at 0.39x the bf16 cache's rate); fewer programs-per-SM values there to keep the sweep's length.
    f16 = [False, True] if FLAGS.attention_kv_dtype == "fp8" else [False]
    programs = [1, 2] if FLAGS.attention_kv_dtype == "fp8" else [1, 2, 4, 8]
    grid = (itertools.product([1], [64, 128, 256], [4, 8], [2, 3], programs, [False], f16) if kind == "decode" else
            itertools.product([32], [64, 128], [8], [2, 3], [1], [False, True], f16))
  for values in grid:
    yield dict(zip(keys, values))


def _given_variants(kind: str):
  """The engine's Triton configuration for `kind` and each --sweep_variant's changes to it."""
  from pallas_kernels.paged_attention import config_changes, configs
  base = configs("triton", _kv_dtype())[0 if kind == "decode" else 1]
  return [base] + [{**base, **config_changes(v)} for v in FLAGS.sweep_variant]


def sweep_attention(backends, copy_tbs: float, peak: float, iters: int) -> list[tuple]:
  """Times each implementation's variants (the grid of `_variants`, or the engine's configuration and
  --sweep_variant's changes) on the decode and prefill shapes of the table; best first."""
  out = []
  for kind in FLAGS.sweep_kinds:
    problem = _attention_problem(kind)
    for backend in backends:
      given = FLAGS.sweep_variant and backend == "triton"
      for cfg in (_given_variants(kind) if given else _variants(backend, kind)):
        label = f"{kind} {backend} " + " ".join(f"{k}={v}" for k, v in cfg.items())
        try:
          if given:
            label += f" (rel. error {check_attention(backend, kind, cfg, problem):.1e})"
          fig = problem[-1] / time_attention(backend, kind, cfg, FLAGS.sweep_sms, iters, problem) / 1e12
          ratio = fig / (copy_tbs if kind == "decode" else peak)
          out.append((label, str(FLAGS.sweep_sms), f"{fig:.2f} {'TB/s' if kind == 'decode' else 'TFLOP/s'}",
                      f"{ratio:.2f}"))
        except Exception as e:
          out.append((label, str(FLAGS.sweep_sms), f"FAILED {type(e).__name__}: {str(e)[:60]}", "-"))
        print(out[-1], flush=True)
    del problem
  return sorted(out, key=lambda r: (r[0].split()[0], -float(r[3]) if r[3] != "-" else 0))


def bench_rope_append(iters: int, copy_tbs: float, n: int = 2048, pages: int = 32768) -> list[tuple]:
  """RoPE + the KV append, 2048 tokens, caches donated, on a bf16 and an fp8 cache: XLA's fusions with the
  scatter that promises unique rows (the engine's, append_kv), the same without the promise (each element an
  atomic read-modify-write: the engine before session 22), and the fused Triton kernel; checked first."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from nanoflow_jax.config import RopeConfig
  from nanoflow_jax.models.layers import rope_inv_freq
  from pallas_kernels import rope_append_triton as rat
  from pallas_kernels.ops_reference import apply_rope
  hq, hkv, d = 32, 8, 128
  key = jax.random.PRNGKey(0)
  q, k, v = (jax.random.normal(jax.random.fold_in(key, i), (n, h, d), jnp.bfloat16)
             for i, h in enumerate((hq, hkv, hkv)))
  pos = jnp.asarray(np.random.default_rng(0).integers(0, 4096, n), jnp.int32)
  slot = np.random.default_rng(1).permutation(pages * 16)[:n]
  page, off = jnp.asarray(slot // 16, jnp.int32), jnp.asarray(slot % 16, jnp.int32)
  inv = rope_inv_freq(RopeConfig(theta=500000.0, type="llama3", factor=8.0), d)

  def atomic(kc, vc):   # append_kv without unique_indices
    put = lambda c, x: c.at[0, :, page, off].set(x.astype(c.dtype), mode="drop")
    return apply_rope(q, pos, inv), put(kc, apply_rope(k, pos, inv)), put(vc, v)

  rows = []
  for cache_dtype in (jnp.bfloat16, jnp.float8_e4m3fn):
    label = jnp.dtype(cache_dtype).name
    caches = [jnp.zeros((1, hkv, pages, 16, d), cache_dtype) for _ in range(2)]
    fns = {"xla": lambda kc, vc: rat.rope_append_reference(q, k, v, pos, inv, kc, vc, 0, page, off),
           "xla, atomic scatter": atomic,
           "triton": lambda kc, vc: rat.rope_append(q, k, v, pos, inv, kc, vc, 0, page, off, num_sms=132)}
    fns = {name: jax.jit(f, donate_argnums=(0, 1)) for name, f in fns.items()}
    outs = {name: f(*[jnp.zeros_like(c) for c in caches]) for name, f in fns.items()}
    for name in ("xla, atomic scatter", "triton"):
      err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                for a, b in zip(outs["xla"], outs[name]))
      rows.append((f"rope+append {label} cache: {name} vs xla, max difference", "132", f"{err:.1e}", "-"))
    del outs
    moved = (2 * q.size + 2 * k.size + v.size) * 2 + 2 * k.size * jnp.dtype(cache_dtype).itemsize
    for name, f in fns.items():
      state = [jnp.zeros_like(c) for c in caches]

      def run(f=f, state=state):
        out = f(*state)
        state[:] = out[1:]
        return out[0]
      t = timeit(run, iters=iters)
      rows.append((f"rope+append {label} cache, {name} ({n} tokens)", "132", f"{t * 1e6:.1f} us",
                   f"{moved / t / 1e12 / copy_tbs:.2f} of copy"))
      print(rows[-1], flush=True)
  return rows


def bench_rms_norm(iters: int, copy_tbs: float) -> list[tuple]:
  """The fused kernel against the XLA fusion of the reference; bytes = 2 read + 2 written activations."""
  import jax
  import jax.numpy as jnp
  from pallas_kernels import rms_norm_triton as rnt
  n, h = 2048, 4096
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x, r = (jax.random.normal(k, (n, h), jnp.bfloat16) for k in keys[:2])
  scale = jax.random.normal(keys[2], (h,), jnp.bfloat16)
  fns = {"xla": jax.jit(lambda x, r: rnt.rms_norm_residual_reference(x, r, scale, 1e-5)),
         "triton": jax.jit(lambda x, r: rnt.rms_norm_residual(x, r, scale, 1e-5, num_sms=132))}
  outs = {name: f(x, r) for name, f in fns.items()}
  err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
            for a, b in zip(outs["xla"], outs["triton"]))
  rows = [("rms_norm+residual triton vs xla: max difference", "132", f"{err:.1e}", "-")]
  for name, f in fns.items():
    t = timeit(f, x, r, iters=iters)
    tbs = 4 * n * h * 2 / t / 1e12
    rows.append((f"rms_norm+residual {name} (2048x4096)", "132", f"{t * 1e6:.0f} us = {tbs:.2f} TB/s",
                 f"{tbs / copy_tbs:.2f}"))
    print(rows[-1], flush=True)
  return rows


def bench_grouped_gemm(shares: list[int], peak: float, iters: int, rows_: int = 4096, experts: int = 8,
                       hidden: int = 4096, inter: int = 14336) -> list[tuple]:
  """Mixtral-8x7B's two expert GEMMs for a 2048-token step (4096 routed rows, uneven over 8 experts):
  gate_up with the SiLU-and-multiply epilogue and down. Ratios: to XLA's lax.ragged_dot on the same
  problem (gate_up: followed by XLA's SiLU-and-multiply) and to the dense GEMM peak of this run."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from pallas_kernels import grouped_gemm as gg
  sizes = np.random.default_rng(0).multinomial(rows_, np.full(experts, 1 / experts)).astype(np.int32)
  sizes = jnp.asarray(sizes)
  key = jax.random.PRNGKey(0)
  out = []
  for name, k, n, epilogue in (("gate_up+silu_mul", hidden, 2 * inter, "silu_mul"), ("down", inter, hidden, None)):
    lhs = jax.random.normal(key, (rows_, k), jnp.bfloat16)
    rhs = jax.random.normal(jax.random.fold_in(key, 1), (experts, k, n), jnp.bfloat16) * 0.02
    flops = 2 * rows_ * k * n
    xla = jax.jit(lambda a, b, g: gg.grouped_gemm_reference(a, b, g, epilogue))
    ref = xla(lhs, rhs, sizes)
    t_xla = timeit(xla, lhs, rhs, sizes, iters=iters)
    out.append((f"grouped {name} {rows_}x{n}x{k} XLA ragged_dot", "132", f"{flops / t_xla / 1e12:.0f} TFLOP/s",
                f"{flops / t_xla / 1e12 / peak:.2f} of peak"))
    for s in shares:
      try:
        f = jax.jit(lambda a, b, g, s=s: gg.grouped_gemm(a, b, g, num_sms=s, epilogue=epilogue))
        got = f(lhs, rhs, sizes)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32))) /
                    (jnp.max(jnp.abs(ref.astype(jnp.float32))) + 1e-6))
        t = timeit(f, lhs, rhs, sizes, iters=iters)
        out.append((f"grouped {name} (rel. error {err:.1e})", str(s), f"{flops / t / 1e12:.0f} TFLOP/s",
                    f"{t_xla / t:.2f} of XLA, {flops / t / 1e12 / peak:.2f} of peak"))
      except Exception as e:  # keep measuring the rest; the table says what failed
        out.append((f"grouped {name}", str(s), f"FAILED: {type(e).__name__}: {str(e)[:80]}", "-"))
      print(out[-1], flush=True)
  # The dense gate_up (LLaMA-3-8B, 2048 rows) as one group with the fused epilogue, against our dense GEMM
  # followed by XLA's SiLU-and-multiply: whether the epilogue pays for the simpler kernel body.
  from nanoflow_jax.models import layers
  from pallas_kernels import gemm
  m, k, n = rows_ // 2, hidden, 2 * inter
  sms = shares[0] if shares else 132
  a = jax.random.normal(key, (m, k), jnp.bfloat16)
  b = jax.random.normal(jax.random.fold_in(key, 2), (1, k, n), jnp.bfloat16) * 0.02
  one = jnp.array([m], jnp.int32)
  fused = jax.jit(lambda a, b: gg.grouped_gemm(a, b, one, num_sms=sms, epilogue="silu_mul"))
  split = jax.jit(lambda a, b: layers.silu_and_mul(gemm.gemm(a, b[0], num_sms=sms).reshape(m, 2, -1)))
  for name, f in (("our GEMM + XLA silu_mul", split), ("grouped kernel, fused silu_mul", fused)):
    try:
      t = timeit(f, a, b, iters=iters)
      out.append((f"dense gate_up {m}x{n}x{k}: {name}", str(sms),
                  f"{2 * m * n * k / t / 1e12:.0f} TFLOP/s", f"{2 * m * n * k / t / 1e12 / peak:.2f} of peak"))
    except Exception as e:
      out.append((f"dense gate_up: {name}", "-", f"FAILED: {type(e).__name__}: {str(e)[:80]}", "-"))
    print(out[-1], flush=True)
  return out


# Decode attention variants for --beside_gemm when no --beside_variant is given (changes to the engine's
# configuration). A first sweep in session 7 found the rate of one CTA per SM flat in its stages (2-6) and
# key block (32-128): ~27 GB/s (session 8 found why: none of those pipelined their loads; lab/triton_ir.py).
# So these variants add CTAs per SM, and load each key block's page ids one iteration ahead.
BESIDE_VARIANTS = ({}, {"programs_per_sm": 4}, {"programs_per_sm": 8}, {"prefetch_pages": True},
                   {"prefetch_pages": True, "programs_per_sm": 4})


# --beside_shape: (KV heads, query heads per KV head, hidden, gate_up width) on one GPU
BESIDE_SHAPES = {"llama-3-8b": (8, 4, 4096, 28672), "llama-2-70b-tp2": (4, 8, 8192, 28672),
                 "llama-2-70b-tp4": (2, 8, 8192, 14336)}


def gate_up_operands(shape: str, rows: int):
  """The gate_up GEMM's operands at one GPU's share of `shape` (BESIDE_SHAPES): a [rows, hidden] activation
  and a [hidden, width] weight, random bf16."""
  import jax
  import jax.numpy as jnp
  _, _, hidden, width = BESIDE_SHAPES[shape]
  key = jax.random.PRNGKey(5)
  a = jax.random.normal(key, (rows, hidden), jnp.bfloat16)
  b = jax.random.normal(jax.random.fold_in(key, 1), (hidden, width), jnp.bfloat16) * 0.02
  return a, b


def decode_attention_at(problem, cfg: dict, sms: int):
  """f(q, k_cache, v_cache): the Triton decode attention of `problem` (_attention_problem) in configuration
  `cfg` on `sms` SMs."""
  import jax.numpy as jnp
  from pallas_kernels.paged_attention import attention_call, query_blocks
  _, _, table, slots, positions, chunks, _ = problem
  start, length, nb = query_blocks(chunks, len(slots), cfg["block_q"])
  return lambda q, kc, vc: attention_call("triton", q, kc, vc, 0, table, slots, positions, start, length,
                                          jnp.int32(nb), num_sms=sms, config=cfg)


def bench_beside_gemm(shares: list[int], iters: int, gemm_rows: int = 1536, shape: str = "llama-3-8b",
                      variants: tuple[dict, ...] = BESIDE_VARIANTS) -> list[tuple]:
  """Decode attention (the table's 512 sequences at context 1024) on `share` SMs beside the gate_up GEMM
  (`gemm_rows` rows, the prefill rows of the step) on the rest, at one GPU's shapes of `shape`
  (BESIDE_SHAPES), each as a chain of calls on its own stream (perf.concurrent_seconds), for each attention
  variant. Ratio: the two chains' time one after the other on the whole GPU (attention in the engine's
  configuration) over their time together: above 1.0 the overlap pays."""
  import jax
  from nanoflow_jax import perf
  from pallas_kernels import gemm
  from pallas_kernels.paged_attention import configs
  hkv, g, _, _ = BESIDE_SHAPES[shape]
  problem = _attention_problem("decode", hkv, g)
  q, cache, *_, work = problem
  base = configs("triton", cache[0].dtype)[0]
  a, b = gate_up_operands(shape, gemm_rows)
  hidden, width = b.shape
  num_sms = getattr(jax.devices()[0], "core_count", 132)
  attention = lambda cfg, sms: decode_attention_at(problem, cfg, sms)
  gemm_at = lambda sms: (lambda a, b: gemm.gemm(a, b, num_sms=sms))
  t_gemm_full = timeit(jax.jit(gemm_at(num_sms)), a, b, iters=iters)
  t_attn_full = timeit(jax.jit(attention(base, num_sms)), q, *cache, iters=iters)
  out = [(f"beside ({shape}): gate_up {gemm_rows}x{width}x{hidden} alone", str(num_sms), f"{t_gemm_full * 1e3:.3f} ms",
          "-"),
         (f"beside: decode attention alone, engine config {base}", str(num_sms),
          f"{work / t_attn_full / 1e12:.2f} TB/s ({t_attn_full * 1e3:.3f} ms)", "-")]
  print(out, flush=True)
  variants = ({},) + tuple(v for v in variants if v)
  for variant in variants:   # each variant alone on the whole GPU, and its error
    cfg = {**base, **variant}
    try:
      err = check_attention("triton", "decode", cfg, problem)
      t = timeit(jax.jit(attention(cfg, num_sms)), q, *cache, iters=iters)
      out.append((f"beside: decode {variant or 'engine config'} alone (rel. error {err:.1e})", str(num_sms),
                  f"{work / t / 1e12:.2f} TB/s", f"{t_attn_full / t:.3f}"))
    except Exception as e:
      out.append((f"beside: decode {variant}", str(num_sms), f"FAILED: {type(e).__name__}: {str(e)[:80]}", "-"))
    print(out[-1], flush=True)
  for share in shares:
    for variant in variants:
      cfg = {**base, **variant}
      label = f"beside: decode {variant or 'engine config'} | GEMM on {num_sms - share}"
      try:
        t = perf.concurrent_seconds(gemm_at(num_sms - share), (a, b), attention(cfg, share), (q, *cache),
                                    iters=iters)
        seq = t["reps_a"] * t_gemm_full + t["reps_b"] * t_attn_full
        out.append((label, str(share), f"attention alone {work / t['b'] / 1e12:.2f} TB/s; chains GEMM x{t['reps_a']} "
                    f"{t['chain_a'] * 1e3:.2f} ms, attention x{t['reps_b']} {t['chain_b'] * 1e3:.2f} ms, together "
                    f"{t['both'] * 1e3:.2f} ms, in turn on the whole GPU {seq * 1e3:.2f} ms", f"{seq / t['both']:.3f}"))
      except Exception as e:  # keep measuring the rest; the table says what failed
        out.append((label, str(share), f"FAILED: {type(e).__name__}: {str(e)[:80]}", "-"))
      print(out[-1], flush=True)
  return out


def bench_stacked_gemm(shares: list[int], iters: int) -> list[tuple]:
  """gemm(..., layer=i) reading layer i of LLaMA-3-8B's stacked weights [32, K, N] in place, against the
  same GEMM on a weight of its own (ratio: stacked / plain time; 1.0 = the in-place read costs nothing)."""
  import jax
  import jax.numpy as jnp
  from pallas_kernels import gemm
  out = []
  for name, (m, n, k) in LLAMA3_8B_M2048.items():
    key = jax.random.PRNGKey(7)
    a = jax.random.normal(key, (m, k), jnp.bfloat16)
    stack = jax.random.normal(jax.random.fold_in(key, 1), (32, k, n), jnp.bfloat16) * 0.02
    one = jnp.array(stack[17])
    layer = jnp.int32(17)
    for s in shares:
      try:
        stacked = jax.jit(lambda a, w, i, s=s: gemm.gemm(a, w, num_sms=s, layer=i))
        plain = jax.jit(lambda a, w, s=s: gemm.gemm(a, w, num_sms=s))
        err = float(jnp.max(jnp.abs(stacked(a, stack, layer).astype(jnp.float32) - plain(a, one).astype(jnp.float32))))
        t_s, t_p = timeit(stacked, a, stack, layer, iters=iters), timeit(plain, a, one, iters=iters)
        out.append((f"gemm {name} {m}x{n}x{k}, layer 17 of a 32-layer stack (max diff to plain {err:.1e})", str(s),
                    f"stacked {2 * m * n * k / t_s / 1e12:.0f} TFLOP/s, plain {2 * m * n * k / t_p / 1e12:.0f}",
                    f"{t_s / t_p:.3f}"))
      except Exception as e:
        out.append((f"gemm {name} stacked", str(s), f"FAILED: {type(e).__name__}: {str(e)[:80]}", "-"))
      print(out[-1], flush=True)
    del stack
  return out


# Fused gate_up tilings timed at full grid besides the default (gemm.SILU_MUL_DEFAULT's changes).
SILU_MUL_VARIANTS = ({"max_concurrent_steps": 3}, {"grid_minor_dim": "M"}, {"grid_tile_width": 16},
                     {"wg_dimension": "N", "tile_m": 64, "tile_n": 64, "max_concurrent_steps": 4},
                     {"wg_dimension": "N", "tile_m": 128, "tile_n": 64, "max_concurrent_steps": 3})


SILU_MUL_SHAPES = {"8b-2048": (2048, 28672, 4096), "8b-1536": (1536, 28672, 4096), "8b-128": (128, 28672, 4096),
                   "70b-tp4-2048": (2048, 14336, 8192)}


def bench_silu_mul(shares: list[int], peak: float, iters: int, shapes: dict | None = None) -> list[tuple]:
  """gate_up + SiLU-and-multiply of LLaMA-3-8B (2048, 1536 and 128 rows) and LLaMA-2-70B's TP-4 shard: XLA's
  dot and fusion, our GEMM then XLA's silu_mul (the engine's unfused path), and the fused kernel. TFLOP/s
  count the GEMM's 2*M*2I*K; the ratio is to the unfused pair of the same share."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from nanoflow_jax.models import layers
  from pallas_kernels import gemm
  out = []
  for name, (m, n, k) in (shapes or SILU_MUL_SHAPES).items():
    ka, kb = jax.random.split(jax.random.PRNGKey(m))
    a = jax.random.normal(ka, (m, k), jnp.bfloat16)
    b = jax.random.normal(kb, (k, n), jnp.bfloat16) * 0.02
    flops = 2 * m * n * k
    ref = np.asarray(gemm.gemm_silu_mul_reference(a, b), np.float32)
    xla = jax.jit(lambda a, b: layers.silu_and_mul(
        jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype).reshape(m, 2, -1)))
    t = timeit(xla, a, b, iters=iters)
    out.append((f"gate_up+silu {name} {m}x{n}x{k}: XLA dot + fusion", "-", f"{flops / t / 1e12:.0f} TFLOP/s",
                f"{flops / t / 1e12 / peak:.2f} of peak"))
    print(out[-1], flush=True)
    for s in shares:
      unfused = jax.jit(lambda a, b, s=s: layers.silu_and_mul(gemm.gemm(a, b, num_sms=s).reshape(m, 2, -1)))
      t_unfused = timeit(unfused, a, b, iters=iters)
      out.append((f"gate_up+silu {name}: our GEMM + XLA silu_mul", str(s), f"{flops / t_unfused / 1e12:.0f} TFLOP/s",
                  f"1.00 ({flops / t_unfused / 1e12 / peak:.2f} of peak)"))
      print(out[-1], flush=True)
      for changes in [{}] + (list(SILU_MUL_VARIANTS) if s == max(shares) else []):
        label = f"gate_up+silu {name}: fused " + (" ".join(f"{c}={v}" for c, v in changes.items()) or "default")
        try:
          cfg = {**gemm.SILU_MUL_DEFAULT, **changes}
          f = jax.jit(lambda a, b, s=s, cfg=cfg: gemm.gemm_silu_mul(a, b, num_sms=s, config=cfg))
          err = float(np.max(np.abs(np.asarray(f(a, b), np.float32) - ref)) / np.max(np.abs(ref)))
          t = timeit(f, a, b, iters=iters)
          out.append((f"{label} (rel. error {err:.1e})", str(s), f"{flops / t / 1e12:.0f} TFLOP/s",
                      f"{t_unfused / t:.2f} ({flops / t / 1e12 / peak:.2f} of peak)"))
        except Exception as e:  # keep measuring the rest; the table says what failed
          out.append((label, str(s), f"FAILED: {type(e).__name__}: {str(e)[:80]}", "-"))
        print(out[-1], flush=True)
  return out


def bench_prefill_ceiling(peak: float, iters: int) -> list[tuple]:
  """Causal prefill attention, LLaMA-3-8B heads (32 query, 8 KV, d 128), one 4096-token prompt and four of
  1024: jax's warp-specialized Hopper kernel (attention_mgpu: contiguous K/V, no pages, equal lengths) in a
  few tilings, against our Triton and Mosaic GPU prefill kernels (through the page table) on the same
  tokens. TFLOP/s count the causal half of 4 * T^2 * Hq * D per prompt."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental.pallas.ops.gpu import attention_mgpu as am
  from pallas_kernels import paged_attention_triton as pat
  hq, hkv, d = 32, 8, 128
  out = []
  for batch, t in ((1, 4096), (4, 1024)):
    flops = batch * 2 * t * t * hq * d
    keys = jax.random.split(jax.random.PRNGKey(t), 3)
    q = jax.random.normal(keys[0], (batch, t, hq, d), jnp.bfloat16)
    k, v = (jax.random.normal(key, (batch, t, hkv, d), jnp.bfloat16) for key in keys[1:])
    # jax 0.11.2's kernel takes float16 only (bf16 fails in its output copy); the tensor cores' rate is the
    # same for both.
    q16, k16, v16 = (x.astype(jnp.float16) for x in (q, k, v))
    ref = np.asarray(am.attention_reference(q16[:, :512], k16[:, :512], v16[:, :512], causal=True), np.float32)
    for block_q, block_kv, steps in ((64, 64, 2), (64, 128, 2), (64, 128, 3), (128, 64, 2)):
      label = f"prefill {batch}x{t} attention_mgpu block_q={block_q} block_kv={block_kv} steps={steps}"
      try:
        cfg = am.TuningConfig(block_q=block_q, block_kv=block_kv, max_concurrent_steps=steps, causal=True)
        f = jax.jit(lambda q, k, v, cfg=cfg: am.attention(q, k, v, cfg))
        got = np.asarray(f(q16[:, :512], k16[:, :512], v16[:, :512]), np.float32)
        err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        sec = timeit(f, q16, k16, v16, iters=iters)
        out.append((f"{label} (rel. error {err:.1e})", "132", f"{flops / sec / 1e12:.0f} TFLOP/s",
                    f"{flops / sec / 1e12 / peak:.2f}"))
      except Exception as e:
        out.append((label, "132", f"FAILED: {type(e).__name__}: {str(e)[:80]}", "-"))
      print(out[-1], flush=True)
    # Ours on the same tokens: each prompt's K/V in pages of 16, the page table in order. The Triton kernel
    # (the engine's prefill on fp8 caches, and on bf16 with --prefill_attention=triton), then the Mosaic one.
    problem = _prefill_problem(q, k, v)
    try:
      sec = time_attention("triton", "prefill", pat.PREFILL_CONFIG, 132, iters, problem)
      out.append((f"prefill {batch}x{t} ours (triton, PREFILL_CONFIG)", "132", f"{flops / sec / 1e12:.0f} TFLOP/s",
                  f"{flops / sec / 1e12 / peak:.2f}"))
    except Exception as e:
      out.append((f"prefill {batch}x{t} ours", "132", f"FAILED: {type(e).__name__}: {str(e)[:80]}", "-"))
    print(out[-1], flush=True)
    out += _prefill_mgpu_rows(problem, flops, peak, iters, f"prefill {batch}x{t}")
  return out


def _prefill_mgpu_rows(problem, flops: float, peak: float, iters: int, label: str) -> list[tuple]:
  """Our warp-specialized paged prefill kernel (prefill_attention_mgpu) on a bench problem, in a few
  configurations, each checked against the jnp reference first."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from pallas_kernels import prefill_attention_mgpu as pam
  from pallas_kernels.paged_attention import paged_attention_reference, query_blocks
  q, cache, table, slots, positions, chunks, _ = problem
  start, length, nb = query_blocks(chunks, len(slots), pam.BLOCK_Q)
  mb = pam.max_query_blocks(len(slots), len(chunks))
  ref = np.asarray(paged_attention_reference(q, cache[0], cache[1], 0, table, slots, positions), np.float32)
  out = []
  for cfg in ({}, {"block_kv": 64}, {"block_kv": 64, "max_concurrent_steps": 3},
              {"block_kv": 64, "max_concurrent_steps": 4}):
    name = f"{label} ours (mosaic, pages) " + (" ".join(f"{k}={v}" for k, v in cfg.items()) or "default")
    try:   # the block table built on the host (numpy closed over), as the engine would
      f = jax.jit(lambda q, c, cfg=cfg: pam.prefill_attention_call(q, c[0], c[1], 0, table, slots, positions, start,
                                                                   length, nb, max_blocks=mb, **cfg))
      got = np.asarray(f(q, cache), np.float32)
      err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
      sec = timeit(f, q, cache, iters=iters)
      out.append((f"{name} (rel. error {err:.1e})", "132", f"{flops / sec / 1e12:.0f} TFLOP/s",
                  f"{flops / sec / 1e12 / peak:.2f}"))
    except Exception as e:
      out.append((name, "132", f"FAILED: {type(e).__name__}: {str(e)[:120]}", "-"))
    print(out[-1], flush=True)
  # As the engine calls it: into an output that exists (the decode kernel's), no fresh zeros; and the kernel
  # alone (its table built outside), with the blocks most work first and in row order (what the ordering
  # gains). Each call chained 8 times in one jit, so that the output stays in place (no copy per call).
  reps = 8
  info = pam.block_info(slots, positions, start, length, nb, mb)
  in_rows = info[np.argsort(np.where(info[:, pam.ROWS] > 0, info[:, pam.ROW0], len(slots)), kind="stable")]
  layer0, pages = jnp.zeros((1,), jnp.int32), jnp.asarray(table)
  variants = [
      ("entry into an existing output", 132, lambda q, c, o: pam.prefill_attention_call(
          q, c[0], c[1], 0, table, slots, positions, start, length, nb, max_blocks=mb, out=o)),
      ("kernel only, one CTA per item", 132,
       lambda q, c, o: pam._call(info, layer0, pages, q, c[0], c[1], o, **pam.CONFIG)),
      ("kernel only, one CTA per item, blocks in row order", 132,
       lambda q, c, o: pam._call(in_rows, layer0, pages, q, c[0], c[1], o, **pam.CONFIG))]
  for sms in (132, 112, 96, 64, 48, 32):      # persistent on an SM share
    variants.append(("kernel only, persistent", sms, lambda q, c, o, sms=sms: pam._call(
        info, layer0, pages, q, c[0], c[1], o, num_sms=sms, **pam.CONFIG)))
  for what, sms, call in variants:
    try:
      f = jax.jit(lambda q, c, o, call=call: jax.lax.fori_loop(0, reps, lambda i, o: call(q, c, o), o))
      sec = timeit(f, q, cache, jnp.zeros_like(q), iters=iters) / reps
      out.append((f"{label} ours (mosaic, pages) {what}", str(sms), f"{flops / sec / 1e12:.0f} TFLOP/s",
                  f"{flops / sec / 1e12 / peak:.2f}"))
    except Exception as e:
      out.append((f"{label} ours {what}", str(sms), f"FAILED: {type(e).__name__}: {str(e)[:120]}", "-"))
    print(out[-1], flush=True)
  return out


def _prefill_problem(q, k, v, ps: int = 16):
  """The bench's attention problem tuple for equal-length prompts given as [B, T, H, D] arrays: the cache
  [1, Hkv, pages, ps, D] holding each prompt's K/V in its own pages, in order."""
  import jax.numpy as jnp
  import numpy as np
  batch, t, hq, d = q.shape
  hkv = k.shape[2]
  per = t // ps
  to_cache = lambda x: x.reshape(batch * per, ps, hkv, d).transpose(2, 0, 1, 3)[None]
  table = np.arange(batch * per, dtype=np.int32).reshape(batch, per)
  slots = np.repeat(np.arange(batch, dtype=np.int32), t)
  positions = np.tile(np.arange(t, dtype=np.int32), batch)
  return (q.reshape(batch * t, hq, d), (to_cache(k), to_cache(v)), table, slots, positions, [t] * batch,
          batch * 2 * t * t * hq * d)


def tune_gemm(names: list[str], iters: int) -> tuple[dict, list[tuple]]:
  """Times every tile configuration of gemm.TUNE_SPACE per shape (checked against the reference first);
  keeps the fastest where it beats the default by more than 2%. Returns (configs by 'MxNxK', table rows)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from pallas_kernels import gemm
  table = {**LLAMA3_8B_M2048, **llama3_8b_small_m()}
  for tp in (1, 2, 4, 8):
    table.update(llama2_70b_shard(tp))
  groups = {"all": list(table), "8b-small": list(llama3_8b_small_m())}
  chosen, rows = {}, []
  for name in [s for n in names for s in groups.get(n, [n])]:
    m, n, k = table[name]
    ka, kb = jax.random.split(jax.random.PRNGKey(m + n + k))
    a = jax.random.normal(ka, (m, k), jnp.bfloat16)
    b = jax.random.normal(kb, (k, n), jnp.bfloat16) * 0.02
    ref = np.asarray(gemm.gemm_reference(a, b), np.float32)
    flops = 2 * m * n * k
    xla = flops / timeit(jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)),
                         a, b, iters=iters) / 1e12
    results = []
    for cfg in [dict(gemm.DEFAULT)] + [{**gemm.DEFAULT, **c} for c in gemm.TUNE_SPACE]:
      f = jax.jit(lambda a, b, cfg=cfg: gemm.gemm(a, b, num_sms=132, config=cfg))
      try:
        err = float(np.abs(np.asarray(f(a, b), np.float32) - ref).max())
        if err > 0.1:
          raise ValueError(f"max error {err}")
        results.append((flops / timeit(f, a, b, iters=iters) / 1e12, cfg))
      except Exception as e:
        print(name, cfg, "FAILED", type(e).__name__, str(e)[:100], flush=True)
    default = results[0][0] if results and results[0][1] == gemm.DEFAULT else 0.0
    best, cfg = max(results, key=lambda r: r[0])
    if best > 1.02 * default:
      chosen[f"{m}x{n}x{k}"] = {key: v for key, v in cfg.items() if gemm.DEFAULT.get(key) != v}
    weight_tbs = 2 * n * k * best / flops   # small M is memory-bound: the weights' read rate at the best
    rows.append((f"tune gemm {name} {m}x{n}x{k}", "132",
                 f"XLA {xla:.0f}, default {default:.0f}, best {best:.0f} TFLOP/s = weights at {weight_tbs:.2f} TB/s "
                 f"({chosen.get(f'{m}x{n}x{k}', 'default')})", f"{best / xla:.2f}"))
    print(rows[-1], flush=True)
  return chosen, rows


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  from pallas_kernels import gemm
  from pallas_kernels import paged_attention_triton
  from pallas_kernels.paged_attention import configs
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  shares = [int(s) for s in FLAGS.shares]
  dev = jax.devices()[0]
  rows, res = [], {"device": dev.device_kind, "jax": jax.__version__, "sms": dev.core_count}

  # Ceilings of this run.
  x = jnp.ones((1 << 30,), jnp.bfloat16)
  t = timeit(jax.jit(lambda x: x + 1), x, iters=FLAGS.iters)
  copy_tbs = 2 * x.nbytes / t / 1e12
  a = jnp.ones((8192, 8192), jnp.bfloat16)
  t = timeit(jax.jit(lambda a, b: a @ b), a, a, iters=FLAGS.iters)
  peak = 2 * 8192 ** 3 / t / 1e12
  res.update(copy_tb_s=copy_tbs, gemm_peak_tflops=peak)
  t = timeit(jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32)), x, iters=FLAGS.iters)
  read_tbs = x.nbytes / t / 1e12   # read-only traffic, like attention's: a second reference for decode
  res.update(read_tb_s=read_tbs)
  rows.append(("copy (read+write)", "-", f"{copy_tbs:.2f} TB/s", "1.00"))
  rows.append(("read only (sum)", "-", f"{read_tbs:.2f} TB/s", f"{read_tbs / copy_tbs:.2f}"))
  rows.append(("XLA GEMM 8192^3", "-", f"{peak:.0f} TFLOP/s", "1.00"))
  print(rows, flush=True)   # now: a step stopped by its time limit writes no table, and its ratios need these
  del x, a
  backends = list(FLAGS.attention_backends)
  if "triton" in backends and not paged_attention_triton.available():
    rows.append(("attention triton", "-", "unavailable: jax-triton does not import (see WORKSPACE.md)", "-"))
    backends.remove("triton")
  if FLAGS.sweep_attention:
    rows += sweep_attention(backends, copy_tbs, peak, FLAGS.iters)
    shares = []
  if FLAGS.rms_norm:
    rows += bench_rms_norm(FLAGS.iters, copy_tbs)
    shares = []
  if FLAGS.rope_append:
    rows += bench_rope_append(FLAGS.iters, copy_tbs)
    shares = []
  if FLAGS.grouped_gemm:
    rows += bench_grouped_gemm(shares, peak, FLAGS.iters)
    shares = []
  if FLAGS.beside_gemm:
    from pallas_kernels.paged_attention import config_changes
    variants = tuple(config_changes(v) for v in FLAGS.beside_variant) or BESIDE_VARIANTS
    rows += bench_beside_gemm([s for s in shares if s < dev.core_count], FLAGS.iters, shape=FLAGS.beside_shape,
                              variants=variants)
    shares = []
  if FLAGS.stacked_gemm:
    rows += bench_stacked_gemm(shares, FLAGS.iters)
    shares = []
  if FLAGS.silu_mul:
    rows += bench_silu_mul(shares, peak, FLAGS.iters)
    shares = []
  if FLAGS.prefill_ceiling:
    rows += bench_prefill_ceiling(peak, FLAGS.iters)
    shares = []
  if FLAGS.tune_gemm:
    chosen, tune_rows = tune_gemm(list(FLAGS.tune_shapes), FLAGS.iters)
    rows += tune_rows
    # The shipped table with this run's choices merged in: copying it to pallas_kernels/ keeps the rest.
    from pallas_kernels import gemm
    with open(os.path.join(FLAGS.out_dir, "gemm_configs.json"), "w") as f:
      json.dump({**gemm._tuned(), **chosen}, f, indent=1, sort_keys=True)
    shares = []

  # GEMM
  shapes = dict(LLAMA3_8B_M2048) if shares and not FLAGS.skip_gemm else {}
  if not FLAGS.quick and shares and not FLAGS.skip_gemm:
    for tp in (1, 2, 4, 8):
      shapes.update(llama2_70b_shard(tp))
  res["gemm"] = {}
  for name, (m, n, k) in shapes.items():
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (m, k), jnp.bfloat16)
    b = jax.random.normal(kb, (k, n), jnp.bfloat16) * 0.02
    flops = 2 * m * n * k
    t_xla = timeit(jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)),
                   a, b, iters=FLAGS.iters)
    xla = flops / t_xla / 1e12
    entry = {"xla_tflops": xla}
    rows.append((f"gemm {name} {m}x{n}x{k}", "XLA", f"{xla:.0f} TFLOP/s", "1.00"))
    for s in shares:
      try:
        t_ours = timeit(jax.jit(lambda a, b, s=s: gemm.gemm(a, b, num_sms=s)), a, b, iters=FLAGS.iters)
        ours = flops / t_ours / 1e12
        entry[str(s)] = ours
        rows.append((f"gemm {name}", str(s), f"{ours:.0f} TFLOP/s", f"{ours / xla:.2f}"))
      except Exception as e:  # keep measuring the rest; the table says what failed
        rows.append((f"gemm {name}", str(s), f"FAILED: {type(e).__name__}", "-"))
    res["gemm"][name] = entry
    print(rows[-1], flush=True)

  # Attention in the configurations the engine runs (configs(backend)), checked against the reference.
  for kind, unit, ceiling, shares_ in (("decode", "TB/s", copy_tbs, shares),
                                       ("prefill", "TFLOP/s", peak, shares[:1] + shares[3:4])):
    if not shares_:
      continue
    problem = _attention_problem(kind)
    label = ("decode attention B=512 ctx=1024" if kind == "decode" else "prefill attention T=4096")
    for backend in backends:
      kv_dtype = "float8_e4m3fn" if FLAGS.attention_kv_dtype == "fp8" else "bfloat16"
      cfg = configs(backend, kv_dtype)[0 if kind == "decode" else 1]
      entry = res.setdefault(f"{kind}_attention", {}).setdefault(backend, {})
      try:
        entry["rel_error"] = check_attention(backend, kind, cfg, problem)
        rows.append((f"{label} {backend} error vs reference", "132", f"{entry['rel_error']:.1e}", "-"))
      except Exception as e:
        rows.append((f"{label} {backend} error vs reference", "132", f"FAILED: {type(e).__name__}: {str(e)[:80]}", "-"))
      for s in shares_:
        try:
          fig = problem[-1] / time_attention(backend, kind, cfg, s, FLAGS.iters, problem) / 1e12
          entry[str(s)] = fig
          rows.append((f"{label} {backend}", str(s), f"{fig:.2f} {unit}", f"{fig / ceiling:.2f}"))
        except Exception as e:
          rows.append((f"{label} {backend}", str(s), f"FAILED: {type(e).__name__}: {str(e)[:80]}", "-"))
        print(rows[-1], flush=True)
    del problem

  table_md = ["| kernel | SMs | achieved | ratio to ceiling |", "|---|---|---|---|"]
  table_md += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
  text = "\n".join(table_md)
  with open(os.path.join(FLAGS.out_dir, "kernel_bench.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(FLAGS.out_dir, "kernel_bench.json"), "w") as f:
    json.dump(res, f, indent=2)
  print(text)


if __name__ == "__main__":
  app.run(main)
