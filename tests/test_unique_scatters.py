"""The scatters whose indices are unique say so (unique_indices): XLA's GPU scatter otherwise writes every element
with an atomic read-modify-write, a compare-and-swap loop for the KV cache's 1- and 2-byte elements
(docs/history/perf-notes.md, session 22). The lowered programs are checked here, and the results against the
same scatter without the promise on fresh random inputs (padding rows included: out of range, dropped)."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax import host_kv, sampler
from pallas_kernels.paged_kv import append_kv


def _scatter_flags(lowered_text: str) -> list[bool]:
  """unique_indices of each scatter in a lowered program, in order."""
  return [m == "true" for m in re.findall(r"stablehlo\.scatter.*?unique_indices = (true|false)", lowered_text,
                                          flags=re.S)]


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.bfloat16])
def test_kv_append_promises_unique_rows_and_writes_what_the_plain_scatter_writes(dtype):
  rng = np.random.default_rng(0)
  layers, heads, pages, page_size, dim, n = 3, 2, 6, 4, 8, 9
  cache = jnp.asarray(rng.standard_normal((layers, heads, pages, page_size, dim)), dtype)
  slots = rng.permutation(pages * page_size)[:n]
  page, offset = slots // page_size, slots % page_size
  page[[2, 5]] = pages                      # padding rows: out of range
  k, v = (jnp.asarray(rng.standard_normal((n, heads, dim)), jnp.float32) for _ in range(2))
  args = (cache, cache, jnp.int32(1), k, v, jnp.asarray(page), jnp.asarray(offset))
  assert _scatter_flags(jax.jit(append_kv).lower(*args).as_text()) == [True, True]
  got_k, got_v = jax.jit(append_kv)(*args)
  plain = lambda c, x: c.at[1, :, page, offset].set(x.astype(c.dtype), mode="drop")
  np.testing.assert_array_equal(np.asarray(got_k.astype(jnp.float32)), np.asarray(plain(cache, k).astype(jnp.float32)))
  np.testing.assert_array_equal(np.asarray(got_v.astype(jnp.float32)), np.asarray(plain(cache, v).astype(jnp.float32)))


def test_truncation_scatters_each_rows_permutation_without_atomics():
  rows, vocab = 3, 50
  p = dataclasses.replace(sampler.SamplingArrays.empty(rows), top_p=np.full(rows, 0.5, np.float32))
  scaled = jnp.asarray(np.random.default_rng(1).standard_normal((rows, vocab)), jnp.float32)
  flags = _scatter_flags(jax.jit(sampler.truncate).lower(scaled, p).as_text())
  assert len(flags) == 2 and all(flags)   # the permutation's, and the column kept for the top token


def test_host_tier_put_back_pads_out_of_range_and_promises_unique_pages():
  shape = (2, 2, 5, 4, 8)
  k = jnp.zeros(shape)
  pages = jnp.asarray([1, 3, shape[2], shape[2]], jnp.int32)   # two pages and two padding entries
  ks = [jnp.full(shape[:2] + shape[3:], i + 1.0) for i in range(4)]
  text = jax.jit(host_kv._scatter).lower(k, k, pages, ks, ks).as_text()
  assert _scatter_flags(text) == [True, True]
  got, _ = host_kv._scatter(k, jnp.zeros(shape), pages, ks, ks)
  got = np.asarray(got)
  assert (got[:, :, 1] == 1).all() and (got[:, :, 3] == 2).all()
  assert not got[:, :, [0, 2, 4]].any()   # the padding wrote nothing anywhere
