"""bf16 against fp8 GEMMs at the LLaMA-3-8B layer shapes, as the engine runs them: XLA's bf16 dot, and the fp8
path of nanoflow_jax/quantization.py (per-token activation quantization + cuBLASLt's e4m3 dot + the scales on
its output), plus the bare fp8 dot (operands already e4m3) to show what the quantization costs. Each row is
checked against a float32 product; TFLOP/s and the ratio to bf16 in the same run.

--mosaic adds our fp8 GEMM (pallas_kernels/gemm_fp8.py) against its same-run peer, XLA's fp8 dot with the
scales on its output (both from e4m3 operands, so the activation quantization is out of both): for gate_up
SiLU-and-multiply fused (against XLA's dot + scales + silu_and_mul), for o and down the residual fused; each
of CONFIGS tried, the best reported, checked against the jnp reference.

  PYTHONPATH=.:.carry python3 lab/fp8_gemm.py --rows=2048,512,128 --mosaic

Rows of at most SMALL_M (decode steps: memory-bound) also go to a second table in weight bytes per second
against the copy bandwidth measured in the same run, with a fourth form beside the three: W8A16, the e4m3
weight converted inside XLA's GEMM fusion and bf16 activations (no activation quantization): how much of a small
step's GEMM time the quantization passes are (issue 27), and whether a fused small-M kernel could stream faster.

  PYTHONPATH=.:.carry python3 lab/fp8_gemm.py --rows=1,8,32
"""
from __future__ import annotations

if __package__ in (None, ""):
  import _root  # noqa: F401  (the repository root on sys.path: lab/_root.py)

from absl import app, flags

from lab._report import report

FLAGS = flags.FLAGS
flags.DEFINE_list("rows", ["2048", "512", "128"], "Token rows (M).")
flags.DEFINE_string("out", None, "Write the markdown table here too.")
flags.DEFINE_list("shapes", ["qkv", "o", "gate_up", "down"], "Which of the layer's GEMMs (SHAPES).")
flags.DEFINE_bool("mosaic", False, "Also time our Mosaic GPU fp8 GEMM against XLA's scaled fp8 dot.")
flags.DEFINE_bool("write_configs", False, "With --mosaic: keep each shape's fastest tiling in "
                  "pallas_kernels/gemm_fp8_configs.json (what the engine's fp8_gemm=mosaic then runs).")

# Our kernel's tilings tried per shape (CTA tiles 128 x 256 two ways, 128 x 128, and 64-byte K steps).
CONFIGS = [{}, dict(tile_m=64, tile_n=256, wg_dimension="M"), dict(tile_m=64, tile_n=128, wg_dimension="M",
                                                                   max_concurrent_steps=5),
           dict(tile_k=64, max_concurrent_steps=5), dict(grid_minor_dim="M", grid_tile_width=16)]
SILU_CONFIGS = [{}, dict(max_concurrent_steps=4, epi_tile_n=32), dict(tile_n=64, wg_dimension="N", tile_m=128),
                dict(tile_k=64, max_concurrent_steps=6)]

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}   # (K, N)
SMALL_M = 64


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from nanoflow_jax import quantization as Q
  from nanoflow_jax.perf import gemm_peak_tflops, median_seconds
  import json
  from pallas_kernels import gemm_fp8, small_gemm_fp8_triton
  chosen = {}
  peak = gemm_peak_tflops()
  peak8 = gemm_peak_tflops(dtype="fp8")
  lines = [f"GEMM peak (XLA 8192^3, ones) in this run: bf16 {peak:.0f} TFLOP/s, fp8 {peak8:.0f}", "",
           "| GEMM | M | bf16 TFLOP/s | fp8 engine path | fp8 / bf16 | bare fp8 dot | bare / bf16 | rel. error fp8 |",
           "|---|---|---|---|---|---|---|---|"]
  small = [int(m) for m in FLAGS.rows if int(m) <= SMALL_M]
  if small:
    from launch.decode_sweep import copy_bandwidth
    bw = copy_bandwidth()
    fused = ["", "The whole op at small M (the RMSNorm before qkv and gate_up, the per-token quantization, the fp8 "
             "GEMM, the scales, o's and down's residual, gate_up's SiLU-and-multiply), weight TB/s: XLA's (the "
             "engine's layers, jitted) against pallas_kernels/small_gemm_fp8_triton.py (jax-triton), its best "
             "tiling, and the engine's pallas_kernels/small_gemm_fp8.py (Pallas: recorded in command buffers)", "",
             "| op | M | XLA TB/s | ours TB/s | ours / XLA | best (block_n, block_k) | rel. error vs XLA | "
             "Pallas TB/s (best tiling) | Pallas / XLA | Pallas rel. error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fused16 = ["", "The same whole op on bf16 weights, weight TB/s: XLA's (the engine's layers, jitted) against "
               "pallas_kernels/small_gemm.py at its best tiling (--small_gemm with bf16 weights)", "",
               "| op | M | XLA TB/s | Pallas TB/s (best tiling) | Pallas / XLA | Pallas rel. error |",
               "|---|---|---|---|---|---|"]
    decode = ["", f"Small M (weight bytes per second; copy bandwidth in this run {bw['copy']:.2f} TB/s, read "
              f"{bw['read']:.2f}): W8A16 = the e4m3 weight converted in XLA's GEMM fusion, bf16 activations", "",
              "| GEMM | M | bf16 TB/s | fp8 engine path TB/s | bare fp8 dot TB/s | W8A16 TB/s | engine / bare | "
              "rel. error W8A16 |", "|---|---|---|---|---|---|---|---|"]
  key = jax.random.PRNGKey(0)
  ours = ["", "Ours (gemm_fp8) against XLA's fp8 dot with the scales on its output, both from e4m3 operands "
          "(fused: gate_up's SiLU-and-multiply, o's and down's residual; XLA's then runs them as passes):", "",
          "| GEMM | M | XLA scaled fp8 TFLOP/s | ours, best | ours / XLA | best config | rel. error vs reference |",
          "|---|---|---|---|---|---|---|"]
  for name, (k, n) in ((name, SHAPES[name]) for name in FLAGS.shapes):
    w = (0.02 * jax.random.normal(key, (k, n), jnp.float32)).astype(jnp.bfloat16)
    w8, ws = jax.jit(lambda w: Q.quantize_weight(w, 1))(w)
    ws = ws.reshape(-1)
    for m in map(int, FLAGS.rows):
      a = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.float32).astype(jnp.bfloat16)
      a8, _ = Q.quantize_activation(a)
      bf16 = jax.jit(lambda a, w: jnp.dot(a, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
      fp8 = jax.jit(lambda a, w8, ws: Q.fp8_matmul(a, w8, ws, jnp.bfloat16))
      bare = jax.jit(lambda a8, w8: jax.lax.dot_general(a8, w8, (((1,), (1,)), ((), ())),
                                                        preferred_element_type=jnp.bfloat16))
      exact = np.asarray(jnp.dot(a.astype(jnp.float32), w.astype(jnp.float32)))
      got = np.asarray(fp8(a, w8, ws), np.float32)
      err = float(np.linalg.norm(got - exact) / np.linalg.norm(exact))
      assert err < 0.08, (name, m, err)
      flops = 2 * m * k * n
      t_b, t_f, t_r = (median_seconds(bf16, a, w), median_seconds(fp8, a, w8, ws), median_seconds(bare, a8, w8))
      tf = lambda t: flops / t / 1e12
      if m <= SMALL_M:
        w8a16 = jax.jit(lambda a, w8, ws: (jax.lax.dot_general(a, w8.astype(a.dtype), (((1,), (1,)), ((), ())),
                                                                preferred_element_type=jnp.float32)
                                           * ws).astype(jnp.bfloat16))
        got16 = np.asarray(w8a16(a, w8, ws), np.float32)
        err16 = float(np.linalg.norm(got16 - exact) / np.linalg.norm(exact))
        assert err16 < 0.08, (name, m, err16)
        t_16 = median_seconds(w8a16, a, w8, ws)
        tb = lambda nbytes, t: nbytes / t / 1e12
        decode.append(f"| {name} {k}x{n} | {m} | {tb(2 * k * n, t_b):.2f} | {tb(k * n, t_f):.2f} | "
                      f"{tb(k * n, t_r):.2f} | {tb(k * n, t_16):.2f} | {t_f / t_r:.2f}x | {err16:.4f} |")
        print(decode[-1], flush=True)
        if m <= small_gemm_fp8_triton.MAX_ROWS:
          fused.append(_small_fused_row(name, a, w8, ws, k * n))
          print(fused[-1], flush=True)
          fused16.append(_small_bf16_row(name, a, w))
          print(fused16[-1], flush=True)
      lines.append(f"| {name} {k}x{n} | {m} | {tf(t_b):.0f} | {tf(t_f):.0f} | {t_b / t_f:.2f}x | {tf(t_r):.0f} | "
                   f"{t_b / t_r:.2f}x | {err:.4f} |")
      print(lines[-1], flush=True)
      if FLAGS.mosaic:
        row, best = _ours_against_xla(name, a, w8, ws, flops)
        ours.append(row)
        print(row, flush=True)
        if best is not None:
          chosen[gemm_fp8.config_key(m, w8.shape[0], k, name == "gate_up")] = best
  if FLAGS.write_configs and chosen:
    with open(gemm_fp8.CONFIG_FILE, "w") as f:
      json.dump({**gemm_fp8._tuned(), **chosen}, f, indent=1, sort_keys=True)
    ours.append(f"\n{len(chosen)} tilings written to {gemm_fp8.CONFIG_FILE}")
  text = "\n".join(lines + (ours if FLAGS.mosaic else []) + (decode + fused + fused16 if small else []))
  report(text, FLAGS.out)


SMALL_FUSED_TILES = ((16, 128), (16, 256), (32, 256), (32, 512))


def _small_fused_row(name, a, w8, ws, weight_bytes) -> str:
  """One row: the whole small-M op as XLA runs the engine's layers, against our fused kernel's tilings (where
  jax-triton runs), each checked against XLA's output."""
  import functools
  import jax
  import jax.numpy as jnp
  import numpy as np
  from nanoflow_jax.perf import median_seconds
  from pallas_kernels import paged_attention_triton, small_gemm_fp8, small_gemm_fp8_triton
  m, k = a.shape
  n = w8.shape[0]
  key = jax.random.PRNGKey(7)
  kw = {"qkv": dict(norm_scale=1 + 0.1 * jax.random.normal(key, (k,), jnp.float32)),
        "o": dict(residual=jax.random.normal(key, (m, n), jnp.float32)),
        "gate_up": dict(norm_scale=1 + 0.1 * jax.random.normal(key, (k,), jnp.float32), silu_mul=True),
        "down": dict(residual=jax.random.normal(key, (m, n), jnp.float32))}[name]
  kw = {kk: (v.astype(a.dtype) if hasattr(v, "astype") else v) for kk, v in kw.items()}
  xla = jax.jit(functools.partial(small_gemm_fp8_triton.small_gemm_fp8_reference, **kw))
  want = np.asarray(xla(a, w8, ws), np.float32)
  t_x = median_seconds(xla, a, w8, ws)
  tb = lambda t: weight_bytes / t / 1e12
  rel = lambda got: float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
  on_gpu = jax.default_backend() == "gpu"
  if on_gpu:   # the Pallas form at each tiling: the fastest
    timed = []
    for bn, bk in SMALL_FUSED_TILES:
      f = jax.jit(functools.partial(small_gemm_fp8.small_gemm_fp8, block_n=bn, block_k=bk, **kw))
      try:
        err_p = rel(np.asarray(f(a, w8, ws), np.float32))
      except Exception as e:   # a tiling the compiler refuses: say so, try the next
        print(f"  {name} M={m} Pallas ({bn}, {bk}): {type(e).__name__}: {str(e)[:200]}", flush=True)
        continue
      timed.append((median_seconds(f, a, w8, ws), (bn, bk), err_p))
    t_p, tile_p, err_p = min(timed) if timed else (float("nan"), None, float("nan"))
    tail = f" {tb(t_p):.2f} {tile_p} | {t_x / t_p:.2f}x | {err_p:.4f} |"
  else:   # interpreted (the default tiling): its error only
    pallas = jax.jit(functools.partial(small_gemm_fp8.small_gemm_fp8, interpret=True, **kw))
    tail = f" interpreted | - | {rel(np.asarray(pallas(a, w8, ws), np.float32)):.4f} |"
  if not paged_attention_triton.available():
    return f"| {name} | {m} | {tb(t_x):.2f} | unavailable (jax-triton) | - | - | - |" + tail
  best = None
  for bn, bk in SMALL_FUSED_TILES:
    f = jax.jit(functools.partial(small_gemm_fp8_triton.small_gemm_fp8, block_n=bn, block_k=bk, **kw))
    try:
      got = np.asarray(f(a, w8, ws), np.float32)
    except Exception as e:   # a tiling the compiler refuses: say so, try the next
      print(f"  {name} M={m} ({bn}, {bk}): {type(e).__name__}: {str(e)[:200]}", flush=True)
      continue
    err = rel(got)
    t = median_seconds(f, a, w8, ws)
    if best is None or t < best[0]:
      best = (t, (bn, bk), err)
  if best is None:
    return f"| {name} | {m} | {tb(t_x):.2f} | no tiling compiled | - | - | - |" + tail
  t, tile, err = best
  return f"| {name} | {m} | {tb(t_x):.2f} | {tb(t):.2f} | {t_x / t:.2f}x | {tile} | {err:.4f} |" + tail


def _small_bf16_row(name, a, w) -> str:
  """One row: the whole small-M op on the bf16 weight w [K, N] as XLA runs the engine's layers, against the Pallas
  small_gemm at each tiling (on the GPU; its error alone where interpreted)."""
  import functools
  import jax
  import jax.numpy as jnp
  import numpy as np
  from nanoflow_jax.perf import median_seconds
  from pallas_kernels import small_gemm
  m, k = a.shape
  n = w.shape[1]
  key = jax.random.PRNGKey(11)
  kw = {"qkv": dict(norm_scale=(1 + 0.1 * jax.random.normal(key, (k,))).astype(a.dtype)),
        "o": dict(residual=jax.random.normal(key, (m, n), a.dtype)),
        "gate_up": dict(norm_scale=(1 + 0.1 * jax.random.normal(key, (k,))).astype(a.dtype), silu_mul=True),
        "down": dict(residual=jax.random.normal(key, (m, n), a.dtype))}[name]
  xla = jax.jit(functools.partial(small_gemm.small_gemm_reference, **kw))
  want = np.asarray(xla(a, w), np.float32)
  rel = lambda got: float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
  nbytes = 2 * k * n
  tb = lambda t: nbytes / t / 1e12
  if jax.default_backend() != "gpu":
    got = np.asarray(small_gemm.small_gemm(a, w, interpret=True, **kw), np.float32)
    return f"| {name} | {m} | - | interpreted | - | {rel(got):.4f} |"
  t_x = median_seconds(xla, a, w)
  timed = []
  for bn, bk in SMALL_FUSED_TILES:
    f = jax.jit(functools.partial(small_gemm.small_gemm, block_n=bn, block_k=bk, **kw))
    try:
      err = rel(np.asarray(f(a, w), np.float32))
    except Exception as e:   # a tiling the compiler refuses: say so, try the next
      print(f"  {name} M={m} bf16 Pallas ({bn}, {bk}): {type(e).__name__}: {str(e)[:200]}", flush=True)
      continue
    timed.append((median_seconds(f, a, w), (bn, bk), err))
  if not timed:
    return f"| {name} | {m} | {tb(t_x):.2f} | no tiling compiled | - | - |"
  t, tile, err = min(timed)
  return f"| {name} | {m} | {tb(t_x):.2f} | {tb(t):.2f} {tile} | {t_x / t:.2f}x | {err:.4f} |"


def _ours_against_xla(name, a, w8, ws, flops) -> tuple[str, dict | None]:
  """One table row: XLA's scaled fp8 dot (+ the fused op as XLA runs it) against each of our tilings; and the
  fastest tiling (None where none takes the shape)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from nanoflow_jax import quantization as Q
  from nanoflow_jax.models.layers import silu_and_mul
  from nanoflow_jax.perf import median_seconds
  from pallas_kernels import gemm_fp8
  a8, a_scale = Q.quantize_activation(a)
  m, n = a.shape[0], w8.shape[0]
  silu = name == "gate_up"
  residual = None if name in ("qkv", "gate_up") else jnp.ones((m, n), jnp.bfloat16)
  if silu:
    xla = jax.jit(lambda a8, s, w8, ws: silu_and_mul(Q.scaled_fp8_dot(a8, s, w8, ws, jnp.bfloat16).reshape(m, 2, -1)))
    ref = gemm_fp8.gemm_fp8_silu_mul_reference(a8, w8, a_scale, ws)
  else:
    xla = jax.jit(lambda a8, s, w8, ws: Q.scaled_fp8_dot(a8, s, w8, ws, jnp.bfloat16)
                  + (0 if residual is None else residual))
    ref = gemm_fp8.gemm_fp8_reference(a8, w8, a_scale, ws, residual)
  t_x = median_seconds(xla, a8, a_scale, w8, ws)
  best = None
  for cfg in (SILU_CONFIGS if silu else CONFIGS):
    if not gemm_fp8.supported(m, n, a.shape[1], cfg, silu_mul=silu):
      continue
    if silu:
      f = jax.jit(lambda a8, s, w8, ws, cfg=cfg: gemm_fp8.gemm_fp8_silu_mul(a8, w8, s, ws, num_sms=jax.devices()[0].core_count, config=cfg))
    else:
      f = jax.jit(lambda a8, s, w8, ws, cfg=cfg: gemm_fp8.gemm_fp8(a8, w8, s, ws, residual, num_sms=jax.devices()[0].core_count, config=cfg))
    try:
      got = np.asarray(f(a8, a_scale, w8, ws), np.float32)
    except Exception as e:   # a tiling the GPU compiler refuses: say so, try the next
      print(f"  {name} M={m} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
      continue
    want = np.asarray(ref, np.float32)
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert err < 0.01, (name, m, cfg, err)
    t = median_seconds(f, a8, a_scale, w8, ws)
    if best is None or t < best[0]:
      best = (t, cfg, err)
  tf = lambda t: flops / t / 1e12
  if best is None:
    return f"| {name} | {m} | {tf(t_x):.0f} | - | - | no tiling takes the shape | - |", None
  t, cfg, err = best
  return f"| {name} | {m} | {tf(t_x):.0f} | {tf(t):.0f} | {t_x / t:.2f}x | {cfg or 'default'} | {err:.5f} |", cfg


if __name__ == "__main__":
  app.run(main)
