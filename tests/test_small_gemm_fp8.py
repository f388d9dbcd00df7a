"""The small step's fp8 GEMM op as a Pallas kernel (pallas_kernels/small_gemm_fp8.py) in interpret mode against its
reference (the engine's unfused W8A8 ops), bit for bit: the RMSNorm, the per-token e4m3, the GEMM, the scales,
the residual or SiLU-and-multiply, at 16 rows and at fewer (padded).

XLA keeps values in f32 across a fusion's casts to bf16 (excess precision), in the reference and in the kernel's
interpreted body alike, and a bf16 step moved by that flips e4m3 roundings (1-3% apart). With
`--xla_allow_excess_precision=false` every cast is honoured and the two agree exactly; XLA reads the flag at
start, so the comparison runs in a process of its own."""
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [dict(m=16), dict(m=3, norm=True), dict(m=16, norm=True, silu_mul=True), dict(m=5, norm=True, silu_mul=True),
         dict(m=7, residual=True), dict(m=16, dtype="float16", norm=True)]


def _compare(cases) -> list[str]:
  """Each case's kernel output against the reference: 'exact' or what differs (run in the flagged process)."""
  import jax.numpy as jnp
  from pallas_kernels import small_gemm_fp8 as sg
  out = []
  for i, c in enumerate(cases):
    rng = np.random.default_rng(i)
    dt = jnp.dtype(c.get("dtype", "bfloat16"))
    m, k, n = c["m"], 512, 96
    x = jnp.asarray(rng.normal(size=(m, k)), dt)
    w8 = jnp.asarray(rng.normal(size=(n, k)) * 0.05, jnp.float32).astype(jnp.float8_e4m3fn)
    ws = jnp.asarray(rng.uniform(0.5, 2, n), jnp.float32)
    kw = {}
    if c.get("norm"):
      kw["norm_scale"] = jnp.asarray(rng.uniform(0.5, 1.5, k), dt)
    if c.get("silu_mul"):
      kw["silu_mul"] = True
    if c.get("residual"):
      kw["residual"] = jnp.asarray(rng.normal(size=(m, n)), dt)
    ref = np.asarray(sg.small_gemm_fp8_reference(x, w8, ws, **kw), np.float32)
    got = np.asarray(sg.small_gemm_fp8(x, w8, ws, interpret=True, block_n=16, block_k=128, **kw), np.float32)
    if got.shape != ref.shape:
      out.append(f"shape {got.shape} != {ref.shape}")
    elif not np.array_equal(got, ref):
      out.append(f"max diff {np.abs(got - ref).max()} rel {np.linalg.norm(got - ref) / np.linalg.norm(ref)}")
    else:
      out.append("exact")
  return out


def test_the_kernel_equals_its_reference_bit_for_bit():
  env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip(),
         "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env, cwd=ROOT,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  results = r.stdout.strip().splitlines()[-len(CASES):]
  assert results == ["exact"] * len(CASES), list(zip(CASES, results))


def test_shapes_it_cannot_take_are_refused_by_name():
  import jax.numpy as jnp
  from pallas_kernels import small_gemm_fp8 as sg
  w8 = jnp.zeros((64, 256), jnp.float8_e4m3fn)
  with pytest.raises(ValueError, match="at most 16 rows"):
    sg.small_gemm_fp8(jnp.zeros((17, 256), jnp.bfloat16), w8, jnp.ones(64), interpret=True)
  with pytest.raises(ValueError, match="must divide"):
    sg.small_gemm_fp8(jnp.zeros((4, 256), jnp.bfloat16), w8, jnp.ones(64), block_n=48, interpret=True)
  with pytest.raises(ValueError, match="no residual"):
    sg.small_gemm_fp8(jnp.zeros((4, 256), jnp.bfloat16), w8, jnp.ones(64), silu_mul=True,
                      residual=jnp.zeros((4, 32), jnp.bfloat16), interpret=True)


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  print("\n".join(_compare(CASES)))
