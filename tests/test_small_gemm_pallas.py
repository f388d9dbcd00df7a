"""The small step's GEMM op as a Pallas kernel, fp8 (pallas_kernels/small_gemm_fp8.py: W8A8) and bf16/f16
(small_gemm.py), in interpret mode against its reference (the engine's unfused ops), bit for bit: the RMSNorm,
(the per-token e4m3,) the GEMM, (the scales,) the residual or SiLU-and-multiply, at 16 rows and at fewer (padded).

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
CASES = [dict(c, fp8=True) for c in CASES] + [dict(c, fp8=False) for c in CASES]


def _compare(cases) -> list[str]:
  """Each case's kernel output against the reference: 'exact' or what differs (run in the flagged process)."""
  import jax.numpy as jnp
  from pallas_kernels import small_gemm, small_gemm_fp8
  out = []
  for i, c in enumerate(cases):
    rng = np.random.default_rng(i)
    dt = jnp.dtype(c.get("dtype", "bfloat16"))
    m, k, n = c["m"], 512, 96
    x = jnp.asarray(rng.normal(size=(m, k)), dt)
    if c["fp8"]:   # e4m3 [N, K] with channel scales
      w8 = jnp.asarray(rng.normal(size=(n, k)) * 0.05, jnp.float32).astype(jnp.float8_e4m3fn)
      ws = jnp.asarray(rng.uniform(0.5, 2, n), jnp.float32)
      ref_fn, kernel_fn, weights = small_gemm_fp8.small_gemm_fp8_reference, small_gemm_fp8.small_gemm_fp8, (w8, ws)
    else:          # the model dtype, [K, N]
      w = jnp.asarray(rng.normal(size=(k, n)) * 0.05, dt)
      ref_fn, kernel_fn, weights = small_gemm.small_gemm_reference, small_gemm.small_gemm, (w,)
    kw = {}
    if c.get("norm"):
      kw["norm_scale"] = jnp.asarray(rng.uniform(0.5, 1.5, k), dt)
    if c.get("silu_mul"):
      kw["silu_mul"] = True
    if c.get("residual"):
      kw["residual"] = jnp.asarray(rng.normal(size=(m, n)), dt)
    ref = np.asarray(ref_fn(x, *weights, **kw), np.float32)
    got = np.asarray(kernel_fn(x, *weights, interpret=True, block_n=16, block_k=128, **kw), np.float32)
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
  from pallas_kernels import small_gemm
  from pallas_kernels import small_gemm_fp8 as sg
  w = jnp.zeros((256, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="at most 16 rows"):
    small_gemm.small_gemm(jnp.zeros((17, 256), jnp.bfloat16), w, interpret=True)
  with pytest.raises(ValueError, match="w \\[K=256, N\\] in x's dtype"):
    small_gemm.small_gemm(jnp.zeros((4, 256), jnp.bfloat16), w.astype(jnp.float16), interpret=True)
  with pytest.raises(ValueError, match="must divide"):
    small_gemm.small_gemm(jnp.zeros((4, 256), jnp.bfloat16), w, block_n=48, interpret=True)
  w8 = jnp.zeros((64, 256), jnp.float8_e4m3fn)
  with pytest.raises(ValueError, match="at most 16 rows"):
    sg.small_gemm_fp8(jnp.zeros((17, 256), jnp.bfloat16), w8, jnp.ones(64), interpret=True)
  with pytest.raises(ValueError, match="must divide"):
    sg.small_gemm_fp8(jnp.zeros((4, 256), jnp.bfloat16), w8, jnp.ones(64), block_n=48, interpret=True)
  with pytest.raises(ValueError, match="no residual"):
    sg.small_gemm_fp8(jnp.zeros((4, 256), jnp.bfloat16), w8, jnp.ones(64), silu_mul=True,
                      residual=jnp.zeros((4, 32), jnp.bfloat16), interpret=True)


@pytest.mark.parametrize("quantization", ["fp8", None])
def test_engine_runs_small_steps_through_the_hook_and_gives_the_same_tokens(monkeypatch, quantization):
  """small_gemm: steps of <= 16 rows run each GEMM's whole op through the hook, fp8 weights and unquantized alike
  (here its reference, the unfused ops' math, so the tokens are the same as without): the norm carried into qkv
  and gate_up, the residual into o and down, SiLU-and-multiply into gate_up; larger steps never reach it."""
  from nanoflow_jax.engine import Engine, EngineConfig
  from nanoflow_jax.model import load_model
  from nanoflow_jax.sampling_params import SamplingParams
  from pallas_kernels import small_gemm, small_gemm_fp8
  module, name = (small_gemm_fp8, "small_gemm_fp8_reference") if quantization else (small_gemm, "small_gemm_reference")
  model = load_model("tiny", dtype="float32", random_weights=True, quantization=quantization)
  real, seen = getattr(module, name), []

  def counting(x, *weights, **kw):
    seen.append((x.shape[0], kw["norm_scale"] is not None, kw["residual"] is not None, kw["silu_mul"]))
    return real(x, *weights, **kw)
  monkeypatch.setattr(module, name, counting)
  prompts = [list(range(5, 45)), [7, 8, 9, 10, 11] * 7]
  out = {}
  for small in (False, True):
    eng = Engine(model, EngineConfig(dense_batch=64, num_pages=64, max_num_seqs=4, small_gemm=small,
                                     layer_loop="unrolled", compilation_cache_dir=None))
    for i, p in enumerate(prompts):
      eng.add_request(f"r{i}", p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    eng.run_until_done()
    out[small] = [eng.pop_output(f"r{i}").outputs[0].token_ids for i in range(len(prompts))]
  assert out[True] == out[False]
  assert seen and all(rows <= module.MAX_ROWS for rows, *_ in seen)
  kinds = {tuple(flags) for _, *flags in seen}
  assert kinds == {(True, False, False), (False, True, False), (True, False, True)}   # qkv, o/down, gate_up


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  print("\n".join(_compare(CASES)))
