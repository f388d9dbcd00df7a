"""The fused RoPE + KV-append Triton kernel (Triton's interpreter on the CPU) against the model's RoPE and
append_kv: llama3-scaled frequencies, head counts that are no power of two, padding rows that must not
write, other layers and other pages left untouched."""
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax.config import RopeConfig
from nanoflow_jax.models.layers import rope_inv_freq
from pallas_kernels import rope_append_triton as rat

pytest.importorskip("triton")


@pytest.mark.parametrize("num_sms,n", [(1, 9), (3, 9), (1, 40)])   # 40 tokens on 1 SM: programs walk several
@pytest.mark.parametrize("hq,hkv", [(6, 2), (4, 4)])
def test_rope_append_matches_reference(num_sms, n, hq, hkv):
  rng = np.random.default_rng()
  d, layers, pages, page_size = 16, 3, 12, 4
  q = rng.normal(size=(n, hq, d)).astype(np.float32)
  k = rng.normal(size=(n, hkv, d)).astype(np.float32)
  v = rng.normal(size=(n, hkv, d)).astype(np.float32)
  positions = rng.integers(0, 5000, size=n).astype(np.int32)
  slots = rng.permutation(pages * page_size)[:n]
  page, offset = (slots // page_size).astype(np.int32), (slots % page_size).astype(np.int32)
  page[[2, 7]] = pages                                   # padding rows: dropped
  kc = rng.normal(size=(layers, hkv, pages, page_size, d)).astype(np.float32)
  vc = rng.normal(size=(layers, hkv, pages, page_size, d)).astype(np.float32)
  inv = rope_inv_freq(RopeConfig(type="llama3", theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=8192), d)
  ref_q, ref_kc, ref_vc = rat.rope_append_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                                    jnp.asarray(positions), inv, jnp.asarray(kc), jnp.asarray(vc),
                                                    1, jnp.asarray(page), jnp.asarray(offset))
  out_q, out_kc, out_vc = rat.interpret_call(q, k, v, positions, inv, kc, vc, 1, page, offset, num_sms=num_sms)
  np.testing.assert_allclose(out_q, np.asarray(ref_q), atol=2e-5)
  np.testing.assert_allclose(out_kc, np.asarray(ref_kc), atol=2e-5)
  np.testing.assert_allclose(out_vc, np.asarray(ref_vc), atol=0)
  assert not np.allclose(out_kc, kc)                     # something was written


def test_one_program_per_token_up_to_a_bound():
  assert rat._meta((9, 8, 16), (9, 2, 16), (1, 2, 8, 4, 16), 132)[0] == 9
  assert rat._meta((4096, 8, 16), (4096, 2, 16), (1, 2, 8, 4, 16), 132)[0] == 132 * rat.PROGRAMS_PER_SM


def test_mismatched_shapes_are_refused():
  with pytest.raises(ValueError, match="do not match"):
    rat._meta((4, 8, 16), (4, 2, 16), (1, 4, 8, 4, 32), 2)
