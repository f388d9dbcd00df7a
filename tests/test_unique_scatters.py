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
from pallas_kernels import grouped_gemm
from pallas_kernels.paged_kv import append_kv


def _scatter_flags(lowered_text: str) -> list[bool]:
  """unique_indices of each scatter in a lowered program, in order."""
  return [unique for unique, _ in _scatters(lowered_text)]


def _scatters(lowered_text: str) -> list[tuple[bool, str]]:
  """(unique_indices, result element type) of each scatter in a lowered program, in order."""
  found = re.findall(r"stablehlo\.scatter.*?unique_indices = (true|false).*?\}\) : \(.*?\) -> tensor<(?:\d+x)*(\w+)>",
                     lowered_text, flags=re.S)
  return [(unique == "true", dtype) for unique, dtype in found]


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
  rows = jnp.asarray([2, 0, 0, 0], jnp.int32)                  # from the block's rows 2 and 0
  block = jnp.stack([jnp.stack([jnp.full(shape[:2] + shape[3:], i + 1.0) for i in range(4)], axis=2)] * 2)
  text = jax.jit(host_kv._scatter).lower(k, k, pages, block, rows).as_text()
  assert _scatter_flags(text) == [True, True]
  got, _ = host_kv._scatter(k, jnp.zeros(shape), pages, block, rows)
  got = np.asarray(got)
  assert (got[:, :, 1] == 3).all() and (got[:, :, 3] == 1).all()
  assert not got[:, :, [0, 2, 4]].any()   # the padding wrote nothing anywhere


def test_grouped_gemm_padding_promises_unique_rows():
  lhs = jnp.ones((40, 16), jnp.bfloat16)
  sizes = jnp.array([10, 20, 5], jnp.int32)   # 5 rows past the groups
  text = jax.jit(lambda a, s: grouped_gemm.pad_groups(a, s, block_m=16)).lower(lhs, sizes).as_text()
  assert _scatter_flags(text) == [True]


def test_moe_combine_gathers_each_tokens_rows_and_has_no_atomic_scatter():
  """The experts' outputs go back to their tokens by the inverse of the sort and a sum over the k copies (no
  scatter-add): equal to each token's weighted experts written out densely, for k = 3 of 4 experts."""
  from nanoflow_jax.checkpoint import random_params
  from nanoflow_jax.config import tiny_config
  from nanoflow_jax.models.transformer import DecoderLayer
  cfg = dataclasses.replace(tiny_config(), model_type="mixtral", num_experts=4, num_experts_per_tok=3,
                            name="tiny-moe")
  params = random_params(cfg, jnp.float32, seed=int(np.random.default_rng().integers(1 << 20)))
  layer = DecoderLayer(cfg, jnp.float32).bind({"params": params["layers_0"]})
  rng = np.random.default_rng()
  h = jnp.asarray(rng.standard_normal((13, cfg.hidden_size)), jnp.float32)
  weights, ids = layer.router(h)
  got = np.asarray(layer.experts(h, weights, ids))
  gu = np.asarray(layer.experts_gate_up_w).reshape(cfg.num_experts, cfg.hidden_size, 2, cfg.intermediate_size)
  down = np.asarray(layer.experts_down_w)
  x = np.asarray(h, np.float64)
  want = np.zeros_like(x)
  for t in range(x.shape[0]):
    for j in range(3):
      e = int(ids[t, j])
      g, u = x[t] @ gu[e, :, 0], x[t] @ gu[e, :, 1]
      want[t] += float(weights[t, j]) * ((g / (1 + np.exp(-g)) * u) @ down[e])
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
  # (the expert counts' bincount stays a scatter-add: 32-bit integer atomics are native, one per token copy)
  found = _scatters(jax.jit(lambda h, w, i: layer.experts(h, w, i)).lower(h, weights, ids).as_text())
  assert found and all(unique or dtype == "i32" for unique, dtype in found), found
  assert any(unique and dtype == "i32" for unique, dtype in found)   # the sort's inverse
