"""The RMSNorm + per-token e4m3 quantization Triton kernel (Triton's interpreter on the CPU, float32: ROUND=0)
against its reference: a width that is no power of two, more rows than programs and fewer, an all-zero row."""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ops_reference
from pallas_kernels import rms_norm_quant_triton as rnq

pytest.importorskip("triton")


@pytest.mark.parametrize("num_sms", [1, 4, 32])
def test_rms_norm_quant_matches_reference(num_sms):
  rng = np.random.default_rng()
  x = rng.normal(size=(13, 48)).astype(np.float32) * rng.uniform(0.1, 10, size=(13, 1)).astype(np.float32)
  x[7] = 0.0
  w = rng.normal(size=(48,)).astype(np.float32)
  q, s = rnq.interpret_call(x, w, 1e-5, num_sms=num_sms)
  y = np.asarray(ops_reference.rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-5))   # float32: no rounding
  ref_s = np.maximum(np.abs(y).max(axis=-1, keepdims=True), ops_reference.MIN_SCALE) / ops_reference.E4M3_MAX
  np.testing.assert_allclose(s, ref_s, rtol=1e-5)
  np.testing.assert_allclose(q, y / ref_s, rtol=1e-4, atol=1e-3)
  assert np.abs(q).max(axis=-1)[np.arange(13) != 7] == pytest.approx(ops_reference.E4M3_MAX, rel=1e-6)
  assert np.all(q[7] == 0)
  ref8, ref_s8 = rnq.rms_norm_quant_reference(jnp.asarray(x), jnp.asarray(w), 1e-5)   # the model's path
  np.testing.assert_allclose(np.asarray(ref_s8), ref_s, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(ref8.astype(jnp.float32)), q, rtol=0.07, atol=1e-2)
