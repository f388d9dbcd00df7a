"""Paged attention over a ragged batch (decodes and prefill chunks mixed), and the KV append.

Every token attends to the positions [0, position] of its own sequence (and, with a sliding window,
only to the last `sliding_window` of them), reading K/V through its sequence's page table. Tokens of a
prefill chunk see each other causally because the chunk's K/V is appended before attention runs.

This file holds the jnp reference, used on the CPU and as the baseline every kernel is tested against.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def append_kv(cache: jax.Array, k: jax.Array, v: jax.Array, pages: jax.Array, offsets: jax.Array) -> jax.Array:
  """cache [2, P, S, Hkv, D]; k, v [N, Hkv, D]; pages/offsets [N]. Page index P (out of range) drops the
  write: that is how padding tokens are expressed."""
  return cache.at[:, pages, offsets].set(jnp.stack([k, v]).astype(cache.dtype), mode="drop")


def paged_attention_reference(q: jax.Array, cache: jax.Array, page_table: jax.Array, slots: jax.Array,
                              positions: jax.Array, sliding_window: int | None = None) -> jax.Array:
  """q [N, Hq, D]; cache [2, P, S, Hkv, D]; page_table [R, max_pages]; slots, positions [N] -> [N, Hq, D].

  Online softmax over one page at a time (fp32), so memory stays O(N * page_size) whatever the context.
  """
  n, hq, d = q.shape
  page_size, hkv = cache.shape[2], cache.shape[3]
  g = hq // hkv
  qg = q.reshape(n, hkv, g, d).astype(jnp.float32) / math.sqrt(d)
  table = page_table[slots]                               # [N, max_pages]
  num_pages = jnp.max(positions) // page_size + 1

  def body(j, carry):
    m, l, acc = carry
    page = table[:, j]
    k = cache[0, page].astype(jnp.float32)                # [N, S, Hkv, D]
    v = cache[1, page].astype(jnp.float32)
    s = jnp.einsum("nkgd,nskd->nkgs", qg, k)
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
    acc = acc * corr[..., None] + jnp.einsum("nkgs,nskd->nkgd", p, v)
    return m_new, l, acc

  init = (jnp.full((n, hkv, g), -jnp.inf, jnp.float32), jnp.zeros((n, hkv, g), jnp.float32),
          jnp.zeros((n, hkv, g, d), jnp.float32))
  _, l, acc = jax.lax.fori_loop(0, num_pages, body, init)
  out = acc / jnp.maximum(l, 1e-30)[..., None]
  return out.reshape(n, hq, d).astype(q.dtype)
