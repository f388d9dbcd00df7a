"""The paged attention kernel (Pallas, interpret mode on the CPU) against the jnp reference, and the
reference against plain causal attention: ragged lengths, partial pages, chunked prefill continuing from
cached pages, GQA, sliding windows, every SM-share path."""
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_utils import paged_batch as _batch

from nanoflow_jax.models.layers import causal_attention
from pallas_kernels.paged_attention import (paged_attention, paged_attention_reference,
                                            query_blocks)


def test_reference_equals_causal_attention():
  rng = np.random.default_rng(0)
  ctx = (7, 13)
  q, cache, table, slots, positions, _, (k, v, all_slot, all_pos) = _batch(rng, ctx=ctx, chunk=ctx)
  out = paged_attention_reference(q, *cache, table, slots, positions)
  for i, c in enumerate(ctx):
    sel = slots == i
    ref = causal_attention(q[sel][None], k[all_slot == i][None], v[all_slot == i][None])[0]
    np.testing.assert_allclose(out[sel], ref, atol=1e-5)


@pytest.mark.parametrize("num_sms", [1, 3, 8])
@pytest.mark.parametrize("block_q", [1, 4, 16])
@pytest.mark.parametrize("window", [None, 6])
def test_kernel_matches_reference(num_sms, block_q, window):
  rng = np.random.default_rng()
  q, cache, table, slots, positions, lengths, _ = _batch(rng)
  ref = paged_attention_reference(q, *cache, table, slots, positions, window)
  start, length, nb = query_blocks(lengths, len(slots), block_q)
  out = paged_attention(q, *cache, table, slots, positions, start, length, jnp.int32(nb), num_sms=num_sms,
                        block_q=block_q, pages_per_block=2, sliding_window=window, interpret=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)


def test_kernel_gqa_group_of_one_and_bf16():
  rng = np.random.default_rng()
  q, cache, table, slots, positions, lengths, _ = _batch(rng, hkv=4, g=1, d=16, ctx=(3, 30), chunk=(3, 12))
  q, cache = q.astype(jnp.bfloat16), (cache[0].astype(jnp.bfloat16), cache[1].astype(jnp.bfloat16), cache[2])
  ref = paged_attention_reference(q, *cache, table, slots, positions)
  start, length, nb = query_blocks(lengths, len(slots), 16)
  out = paged_attention(q, *cache, table, slots, positions, start, length, jnp.int32(nb), num_sms=2,
                        interpret=True)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=3e-2)


def test_query_blocks_cover_chunks():
  start, length, nb = query_blocks([1, 20, 3], 32, 8)
  assert nb == 5
  assert list(start[:nb]) == [0, 1, 9, 17, 21] and list(length[:nb]) == [1, 8, 8, 4, 3]


@pytest.mark.parametrize("decode_first, decode_splits", [(True, 1), (False, 4)])
def test_two_calls_fill_one_output(decode_first, decode_splits):
  """Decode blocks with a small block_q, prefill blocks with a large one, written into one output in either order;
  a decode call with key splits merges into its own rows only, keeping the other call's."""
  rng = np.random.default_rng()
  q, cache, table, slots, positions, lengths, _ = _batch(rng, ctx=(5, 33, 30, 21), chunk=(1, 1, 20, 7))
  ref = paged_attention_reference(q, *cache, table, slots, positions)
  n = len(slots)
  d_start, d_len, d_nb = query_blocks(lengths[:2], n, 1)
  p_start, p_len, p_nb = query_blocks(lengths[2:], n, 8)
  p_start[:p_nb] += 2
  decode = lambda out: paged_attention(q, *cache, table, slots, positions, d_start, d_len, jnp.int32(d_nb), num_sms=2,
                                       block_q=1, pages_per_block=1, interpret=True, out=out, key_splits=decode_splits)
  prefill = lambda out: paged_attention(q, *cache, table, slots, positions, p_start, p_len, jnp.int32(p_nb), num_sms=3,
                                        block_q=8, interpret=True, out=out, programs_per_sm=2)
  out = prefill(decode(None)) if decode_first else decode(prefill(None))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)


@pytest.mark.parametrize("key_splits", [2, 3, 8])
@pytest.mark.parametrize("window", [None, 6])
def test_key_splits_match_the_reference(key_splits, window):
  """Each work item's key blocks shared out over key_splits items and merged after the call (flash-decoding):
  splits left empty (a short context over 8 splits), windows, decodes and prefill blocks alike."""
  rng = np.random.default_rng()
  q, cache, table, slots, positions, lengths, _ = _batch(rng, ctx=(5, 40, 30, 21), chunk=(1, 1, 9, 7))
  ref = paged_attention_reference(q, *cache, table, slots, positions, window)
  start, length, nb = query_blocks(lengths, len(slots), 4)
  out = paged_attention(q, *cache, table, slots, positions, start, length, jnp.int32(nb), num_sms=3, block_q=4,
                        pages_per_block=1, sliding_window=window, interpret=True, key_splits=key_splits)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)


def test_fp8_cache_kernel_matches_reference():
  """An fp8 (e4m3) cache: the kernel upcasts K/V tiles to the query dtype, as the reference does; and the
  fp8 result stays close to the float32 cache's (what the cache's precision costs)."""
  rng = np.random.default_rng()
  q, (kc, vc, layer), table, slots, positions, lengths, _ = _batch(rng)
  fp8 = jnp.float8_e4m3fn
  q16 = q.astype(jnp.bfloat16)
  ref = paged_attention_reference(q16, kc.astype(fp8), vc.astype(fp8), layer, table, slots, positions)
  start, length, nb = query_blocks(lengths, len(slots), 4)
  out = paged_attention(q16, kc.astype(fp8), vc.astype(fp8), layer, table, slots, positions, start, length,
                        jnp.int32(nb), num_sms=3, block_q=4, pages_per_block=2, interpret=True)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=3e-2)
  full = paged_attention_reference(q, kc, vc, layer, table, slots, positions)
  err = np.linalg.norm(np.asarray(ref, np.float32) - np.asarray(full)) / np.linalg.norm(np.asarray(full))
  assert 1e-4 < err < 0.1, err      # fp8 really is in use, and costs little


def test_config_changes_parse_and_refuse_what_is_not_an_integer():
  from pallas_kernels.paged_attention import config_changes
  assert config_changes("swap_ab=1, num_stages=3") == {"swap_ab": 1, "num_stages": 3}
  assert config_changes("") == {}
  for bad in ("swap_ab", "num_stages=three", "block_n=64,=2"):
    with pytest.raises(ValueError, match="key=integer"):
      config_changes(bad)
