"""What the paged-attention kernels (Pallas, Triton, Mosaic GPU prefill) share, below all of them: the KV
append, the jnp reference attention over pages, the query-block layout of a step, and the merge of a kernel's
key splits (flash-decoding)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def append_kv(k_cache: jax.Array, v_cache: jax.Array, layer, k: jax.Array, v: jax.Array, pages: jax.Array,
              offsets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """k_cache, v_cache [L, Hkv, P, S, D]; layer: int32 scalar; k, v [N, Hkv, D]; pages/offsets [N]. A row whose
  page is out of range (padding) writes nothing; the other rows' (page, offset) must be distinct."""
  # unique_indices: without it XLA's GPU scatter writes every element with an atomic read-modify-write, a
  # compare-and-swap loop for 1- and 2-byte elements (docs/history/perf-notes.md, session 22).
  def put(cache, x):
    return cache.at[layer, :, pages, offsets].set(x.astype(cache.dtype), mode="drop", unique_indices=True)
  return put(k_cache, k), put(v_cache, v)


def paged_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer, page_table: jax.Array,
                              slots: jax.Array, positions: jax.Array, sliding_window: int | None = None) -> jax.Array:
  """q [N, Hq, D]; k/v_cache [L, Hkv, P, S, D]; page_table [R, max_pages]; slots, positions [N] -> [N, Hq, D]."""
  n, hq, d = q.shape
  hkv, page_size = k_cache.shape[1], k_cache.shape[3]
  g = hq // hkv
  qg = q.reshape(n, hkv, g, d).astype(jnp.float32) / math.sqrt(d)
  positions = jnp.asarray(positions)
  table = jnp.asarray(page_table)[jnp.asarray(slots)]     # [N, max_pages]
  num_pages = jnp.max(positions) // page_size + 1

  def body(j, carry):
    m, l, acc = carry
    page = table[:, j]
    k = k_cache[layer][:, page].astype(jnp.float32)       # [Hkv, N, S, D]
    v = v_cache[layer][:, page].astype(jnp.float32)
    s = jnp.einsum("nkgd,knsd->nkgs", qg, k)
    kpos = j * page_size + jnp.arange(page_size)
    mask = kpos[None, :] <= positions[:, None]
    if sliding_window is not None:
      mask &= positions[:, None] - kpos[None, :] < sliding_window
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    corr = jnp.exp(m - m_safe)
    l = l * corr + jnp.sum(p, axis=-1)
    acc = acc * corr[..., None] + jnp.einsum("nkgs,knsd->nkgd", p, v)
    return m_new, l, acc

  init = (jnp.full((n, hkv, g), -jnp.inf, jnp.float32), jnp.zeros((n, hkv, g), jnp.float32),
          jnp.zeros((n, hkv, g, d), jnp.float32))
  _, l, acc = jax.lax.fori_loop(0, num_pages, body, init)
  out = acc / jnp.maximum(l, 1e-30)[..., None]
  return out.reshape(n, hq, d).astype(q.dtype)


def query_blocks(chunk_lengths: list[int], num_tokens: int, block_q: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Host side: splits the batch's chunks (laid out back to back) into query blocks of <= block_q tokens.
  Returns (block_start [num_tokens], block_len [num_tokens], num_blocks); unused entries are 0."""
  start = np.zeros(num_tokens, np.int32)
  length = np.zeros(num_tokens, np.int32)
  b = cur = 0
  for n in chunk_lengths:
    for off in range(0, n, block_q):
      start[b], length[b] = cur + off, min(block_q, n - off)
      b += 1
    cur += n
  return start, length, b


def merge_splits(out, part, ml, block_start, block_len, num_blocks, key_splits: int, block_q: int, xp=None):
  """The split partials of a kernel run with key_splits (each work item's keys shared out over S programs: the
  Triton and Pallas attention kernels) combined: part, unnormalized sums [S * T * Hq * D]; ml, (m, l) per row, m
  in log2 units [S * T * Hq * 2]; into `out` [T, Hq, D] at the rows the query blocks cover (the others kept: a
  mixed batch's prefill rows are another call's). xp: jax.numpy (default) or numpy (the interpreter's path)."""
  if xp is None:
    import jax.numpy as xp
  t, hq, d = out.shape
  part = part.reshape(key_splits, t, hq, d)
  ml = ml.reshape(key_splits, t, hq, 2)
  m, l = ml[..., 0], ml[..., 1]
  m_all = m.max(axis=0)
  w = xp.exp2(m - m_all[None])                      # each split's share, [S, T, Hq]
  total = (w * l).sum(axis=0)
  merged = (w[..., None] * part).sum(axis=0) / xp.maximum(total, 1e-30)[..., None]
  blocks = xp.arange(xp.shape(block_start)[0])
  offs = xp.arange(block_q)
  rows = xp.asarray(block_start)[:, None] + offs[None, :]   # [N, block_q]
  run = xp.reshape(xp.asarray(num_blocks), (-1,))[0]
  valid = (blocks[:, None] < run) & (offs[None, :] < xp.asarray(block_len)[:, None])
  covered = xp.zeros((t,), bool)
  merged = merged.astype(out.dtype)
  if xp.__name__ == "numpy":
    covered[rows[valid]] = True
    return np.where(covered[:, None, None], merged, out)
  # lax.select, not jnp.where (a nested jit, which fails under stream annotation on the GPU)
  covered = covered.at[jax.lax.select(valid, rows, xp.full_like(rows, t))].set(True, mode="drop")
  return jax.lax.select(xp.broadcast_to(covered[:, None, None], out.shape), merged, out)
