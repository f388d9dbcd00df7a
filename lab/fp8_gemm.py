"""bf16 against fp8 GEMMs at the LLaMA-3-8B layer shapes, as the engine runs them: XLA's bf16 dot, and the fp8
path of nanoflow_jax/quantization.py (per-token activation quantization + cuBLASLt's e4m3 dot + the scales on
its output), plus the bare fp8 dot (operands already e4m3) to show what the quantization costs. Each row is
checked against a float32 product; TFLOP/s and the ratio to bf16 in the same run.

  PYTHONPATH=.:.carry python3 lab/fp8_gemm.py --rows=2048,512,128
"""
from __future__ import annotations

if __package__ in (None, ""):
  import _root  # noqa: F401  (the repository root on sys.path: lab/_root.py)

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("rows", ["2048", "512", "128"], "Token rows (M).")
flags.DEFINE_string("out", None, "Write the markdown table here too.")

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}   # (K, N)


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from nanoflow_jax import quantization as Q
  from nanoflow_jax.perf import gemm_peak_tflops, median_seconds
  peak = gemm_peak_tflops()
  peak8 = gemm_peak_tflops(dtype="fp8")
  lines = [f"GEMM peak (XLA 8192^3, ones) in this run: bf16 {peak:.0f} TFLOP/s, fp8 {peak8:.0f}", "",
           "| GEMM | M | bf16 TFLOP/s | fp8 engine path | fp8 / bf16 | bare fp8 dot | bare / bf16 | rel. error fp8 |",
           "|---|---|---|---|---|---|---|---|"]
  key = jax.random.PRNGKey(0)
  for name, (k, n) in SHAPES.items():
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
      lines.append(f"| {name} {k}x{n} | {m} | {tf(t_b):.0f} | {tf(t_f):.0f} | {t_b / t_f:.2f}x | {tf(t_r):.0f} | "
                   f"{t_b / t_r:.2f}x | {err:.4f} |")
      print(lines[-1], flush=True)
  text = "\n".join(lines)
  print(text)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
