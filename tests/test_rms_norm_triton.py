"""The fused residual-add + RMSNorm Triton kernel (Triton's interpreter on the CPU) against the model's
rms_norm: a width that is no power of two, more rows than programs and fewer."""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import rms_norm_triton as rnt

pytest.importorskip("triton")


@pytest.mark.parametrize("num_sms", [1, 4, 32])
def test_rms_norm_residual_matches_reference(num_sms):
  rng = np.random.default_rng()
  x = rng.normal(size=(13, 48)).astype(np.float32)
  r = rng.normal(size=(13, 48)).astype(np.float32)
  scale = rng.normal(size=(48,)).astype(np.float32)
  ref_h, ref_y = rnt.rms_norm_residual_reference(jnp.asarray(x), jnp.asarray(r), jnp.asarray(scale), 1e-5)
  h, y = rnt.interpret_call(x, r, scale, 1e-5, num_sms=num_sms)
  np.testing.assert_allclose(h, np.asarray(ref_h), atol=1e-6)
  np.testing.assert_allclose(y, np.asarray(ref_y), rtol=1e-5, atol=1e-5)
  assert np.std(y) > 0.1
