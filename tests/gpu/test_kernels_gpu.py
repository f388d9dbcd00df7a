"""The kernels on the GPU against their references, at real model shapes and every SM share.

  NANOFLOW_GPU_TESTS=1 PYTHONPATH=. python3 -m pytest -q tests/gpu
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gemm
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference, query_blocks

pytestmark = pytest.mark.gpu
SHARES = [132, 112, 96, 64, 48, 32]


@pytest.mark.parametrize("mnk", [(2048, 6144, 4096), (1024, 4096, 4096), (512, 28672, 4096), (2048, 4096, 14336)])
@pytest.mark.parametrize("num_sms", SHARES)
def test_gemm_llama3_8b_shapes(mnk, num_sms):
  m, n, k = mnk
  keys = jax.random.split(jax.random.PRNGKey(m + n + num_sms), 3)
  a = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
  b = jax.random.normal(keys[1], (k, n), jnp.bfloat16) * 0.02
  c = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
  out = jax.jit(lambda a, b, c: gemm.gemm(a, b, c, num_sms=num_sms))(a, b, c)
  ref = gemm.gemm_reference(a, b, c)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=0.1, rtol=0.02)


@pytest.mark.parametrize("num_sms", SHARES)
def test_paged_attention_mixed_batch(num_sms):
  rng = np.random.default_rng(num_sms)
  hkv, g, d, s, pages = 8, 4, 128, 16, 4096
  ctx = list(rng.integers(1, 700, size=60)) + [900]
  chunk = [1] * 60 + [300]                     # 60 decodes and one prefill chunk continuing a prefix
  table = np.zeros((64, 64), np.int32)
  perm = rng.permutation(pages)
  used = 0
  slots, positions = [], []
  for i, (c, n) in enumerate(zip(ctx, chunk)):
    need = -(-c // s)
    table[i, :need] = perm[used:used + need]
    used += need
    slots += [i] * n
    positions += list(range(c - n, c))
  kc = jax.random.normal(jax.random.PRNGKey(1), (2, hkv, pages, s, d), jnp.bfloat16)
  vc = jax.random.normal(jax.random.PRNGKey(7), (2, hkv, pages, s, d), jnp.bfloat16)
  q = jax.random.normal(jax.random.PRNGKey(2), (len(slots), hkv * g, d), jnp.bfloat16)
  slots, positions = np.array(slots, np.int32), np.array(positions, np.int32)
  ref = paged_attention_reference(q, kc, vc, 1, table, slots, positions)
  start, length, nb = query_blocks(chunk, len(slots), 16)
  out = paged_attention(q, kc, vc, 1, table, slots, positions, start, length, jnp.int32(nb), num_sms=num_sms)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)
