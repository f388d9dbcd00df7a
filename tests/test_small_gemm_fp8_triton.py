"""The small-step fp8 GEMM kernel (Triton's interpreter, float32: ROUND=0) against its math written out in
numpy: the RMSNorm, the per-token scale, the dot, the channel scales, o's/down's residual or gate_up's
SiLU-and-multiply; rows fewer than the dot's 16 (masked), column and K tails past the blocks. The jnp
reference (what the engine's layers compute, with e4m3 rounding) against a float64 product within e4m3's error."""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import small_gemm_fp8_triton as sg

pytest.importorskip("triton")


def _numpy_math(x, w, ws, norm_scale=None, eps=1e-5, residual=None, silu_mul=False):
  h = x.astype(np.float64)
  if norm_scale is not None:
    h = h / np.sqrt((h * h).mean(-1, keepdims=True) + eps) * norm_scale
  y = (h @ w.T.astype(np.float64)) * ws
  if silu_mul:
    g, u = np.split(y, 2, axis=-1)
    return g / (1 + np.exp(-g)) * u
  return y if residual is None else y + residual


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("kind", ["qkv", "o", "gate_up"])
def test_small_gemm_fp8_matches_its_math(m, kind):
  rng = np.random.default_rng()
  k, n = 72, 40   # K and N not multiples of the blocks (32, 16)
  x = (rng.normal(size=(m, k)) * rng.uniform(0.1, 5, size=(m, 1))).astype(np.float32)
  w = rng.normal(size=(2 * n if kind == "gate_up" else n, k)).astype(np.float32)
  ws = rng.uniform(0.01, 0.1, size=w.shape[0]).astype(np.float32)
  kw = {"qkv": dict(norm_scale=rng.normal(size=k).astype(np.float32)),
        "o": dict(residual=rng.normal(size=(m, n)).astype(np.float32)),
        "gate_up": dict(norm_scale=rng.normal(size=k).astype(np.float32), silu_mul=True)}[kind]
  got = sg.interpret_call(x, w, ws, **kw)
  np.testing.assert_allclose(got, _numpy_math(x, w, ws, **kw), rtol=2e-4, atol=2e-4)


def test_reference_is_w8a8_within_e4m3_error():
  """The jnp reference (the engine's layers: e4m3 activations and weights) against the float64 product: within
  e4m3's few percent, and not equal to it (the rounding is there)."""
  from nanoflow_jax import quantization
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 256)).astype(np.float32)
  w = (0.05 * rng.normal(size=(256, 64))).astype(np.float32)
  w8, ws = quantization.quantize_weight(jnp.asarray(w), 1)
  got = np.asarray(sg.small_gemm_fp8_reference(jnp.asarray(x), w8, ws.reshape(-1), out_dtype=jnp.float32))
  want = x.astype(np.float64) @ w
  err = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert 1e-4 < err < 0.08


def test_shapes_it_does_not_take_are_refused():
  with pytest.raises(ValueError, match="at most 16 rows"):
    sg._meta(17, 64, 64, norm=False, eps=1e-5, residual=False, silu_mul=False, round_=False, out_f16=False)
  with pytest.raises(ValueError, match="silu_mul"):
    sg._meta(1, 64, 63, norm=False, eps=1e-5, residual=False, silu_mul=True, round_=False, out_f16=False)
