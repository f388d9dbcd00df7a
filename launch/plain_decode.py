"""The plain JAX decode step: issue 27's baseline, timed in the same run as the engine's decode sweep.

What a JAX user writes in an afternoon: the same model's layers (its Flax ops, so bf16 or fp8 weights alike)
unrolled in one jit, each layer's weights an array of its own, XLA's dot, and attention written in jnp over a
contiguous KV cache per layer ([batch, length, kv heads, head dim], bf16), the new token's K and V put in place
with dynamic_update_slice. Every sequence decodes at the same position; no paging, no scheduler, no sampler
beyond argmax, no host work between steps (each step's tokens feed the next on the device), so it is a strong
baseline for the device and dispatch time of a small step.
"""
from __future__ import annotations

import math
import time


def _attend(q, k, v, pos, window: int | None = None):
  """q [B, Hq, D] at position `pos` over k, v [B, S, Hkv, D] (positions after `pos`, and with a sliding `window`
  those `window` or more before it, masked) -> [B, Hq, D]."""
  import jax
  import jax.numpy as jnp
  b, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  qg = q.reshape(b, hkv, hq // hkv, d)
  s = jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
  keys = jnp.arange(s_len)
  visible = keys <= pos
  if window:
    visible &= pos - keys < window
  s = jnp.where(visible, s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  out = jnp.einsum("bkgs,bskd->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, hq, d).astype(q.dtype)


def make_step(model):
  """step(top, layers, ks, vs, tokens [B], pos) -> (logits [B, vocab] fp32, ks, vs): one decode step of the
  tokens at position `pos` (a traced scalar), ks/vs the per-layer caches (donated)."""
  import jax
  import jax.numpy as jnp
  module = model.module

  def step(top, layer_params, ks, vs, tokens, pos):
    m = module.bind({"params": {**top, **{f"layers_{i}": p for i, p in enumerate(layer_params)}}})
    x = m.embed(tokens)
    positions = jnp.full(tokens.shape, pos, jnp.int32)
    ks, vs = list(ks), list(vs)
    for i, layer in enumerate(m.layers):
      q, k, v = layer.qkv(layer.attn_norm(x))
      q, k = m.rope(q, k, positions)
      at = (0, pos, 0, 0)
      ks[i] = jax.lax.dynamic_update_slice(ks[i], k[:, None].astype(ks[i].dtype), at)
      vs[i] = jax.lax.dynamic_update_slice(vs[i], v[:, None].astype(vs[i].dtype), at)
      x = layer.o(_attend(q, ks[i], vs[i], pos, model.config.sliding_window), residual=x)
      x = layer.mlp(layer.mlp_norm(x), residual=x)
    return m.logits(x), ks, vs

  return jax.jit(step, donate_argnums=(2, 3))


def empty_cache(model, batch: int, length: int):
  """Per-layer K and V caches of `length` positions, zeros (bf16 unless the model's dtype is another float)."""
  import jax.numpy as jnp
  cfg = model.config
  shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
  return ([jnp.zeros(shape, model.dtype) for _ in range(cfg.num_layers)],
          [jnp.zeros(shape, model.dtype) for _ in range(cfg.num_layers)])


def time_step(model, batch: int, context: int, steps: int = 32, warmup: int = 4) -> float:
  """Seconds per plain decode step of `batch` sequences from position context - 1 on (the cache holds `context`
  + the steps; what it holds is zeros: the work is the same). The model is put in its per-layer form
  (Model.layer_list: each weight an array of its own), as a user's unrolled step takes it."""
  import jax
  import jax.numpy as jnp
  top, layer_params = model.layer_list()
  step = make_step(model)
  ks, vs = empty_cache(model, batch, context + warmup + steps)
  tokens = jnp.zeros((batch,), jnp.int32)
  pos = context - 1

  def run(n):
    nonlocal ks, vs, tokens, pos
    for _ in range(n):
      logits, ks, vs = step(top, layer_params, ks, vs, tokens, jnp.int32(pos))
      tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      pos += 1
    jax.block_until_ready(tokens)
  run(warmup)   # (compiles)
  t = time.perf_counter()
  run(steps)
  seconds = (time.perf_counter() - t) / steps
  del ks, vs
  return seconds


def sweep(model, batches: list[int], context: int, steps: int = 32) -> dict:
  """Batch size -> ms per plain step. A batch size that fails (its contiguous cache may not fit beside what
  the process still holds) is reported and left out, so that the engine's figures are still written."""
  import gc
  gc.collect()   # (the engines' KV caches, if a cycle still holds them)
  out = {}
  for b in batches:
    try:
      out[b] = 1e3 * time_step(model, b, context, steps)
    except Exception as e:   # (XLA's out-of-memory error types differ by version)
      print(f"plain JAX decode batch {b:4d}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
      continue
    print(f"plain JAX decode batch {b:4d}: {out[b]:7.2f} ms per step", flush=True)
  return out
