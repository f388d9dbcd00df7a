"""Runs one engine step on the device: one compiled function per token-count bucket.

A step takes the dense batch as flat token arrays (decodes and prefill chunks mixed), runs the model's
per-layer ops with the paged KV cache, samples one token for every sequence whose chunk reached its
end, and keeps the per-slot sampling state (last token, output counts, prompt mask) on the device, so
the next step can be dispatched before this one's tokens reach the host. KV and sampling state are
donated in and out: no copies.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from nanoflow_jax import kv_cache, sampler
from nanoflow_jax.model import Model
from pallas_kernels.paged_attention import append_kv, paged_attention_reference

log = logging.getLogger(__name__)

MIN_BUCKET = 16
KIND_PAD, KIND_PROMPT, KIND_REFED_OUTPUT = 0, 1, 2  # how a fed token enters the penalty state


@dataclasses.dataclass
class StepInputs:
  """Host-built arrays for one step. [N] per token (N = bucket), [R] per slot."""
  tokens: np.ndarray         # int32 [N] (ignored where from_device)
  from_device: np.ndarray    # bool [N]: take the slot's last sampled token instead
  positions: np.ndarray      # int32 [N]
  slots: np.ndarray          # int32 [N]
  kv_pages: np.ndarray       # int32 [N] (num_pages for padding: the write is dropped)
  kv_offsets: np.ndarray     # int32 [N]
  kinds: np.ndarray          # int32 [N]: KIND_*
  page_table: np.ndarray     # int32 [R, max_pages]
  sample_index: np.ndarray   # int32 [R]: which token's logits each slot samples from
  sample_mask: np.ndarray    # bool [R]
  reset: np.ndarray          # bool [R]: a new sequence took the slot


jax.tree_util.register_dataclass(StepInputs, data_fields=[f.name for f in dataclasses.fields(StepInputs)],
                                 meta_fields=[])


def buckets_for(dense_batch: int) -> list[int]:
  out, b = [], MIN_BUCKET
  while b < dense_batch:
    out.append(b)
    b *= 2
  return out + [dense_batch]


class Executor:
  def __init__(self, model: Model, num_pages: int, page_size: int, max_num_seqs: int, max_model_len: int,
               dense_batch: int, kv_dtype=None):
    cfg = model.config
    self.model = model
    self.num_pages, self.page_size = num_pages, page_size
    self.max_num_seqs = max_num_seqs
    self.max_pages_per_seq = -(-max_model_len // page_size)
    self.buckets = buckets_for(dense_batch)
    self.kv_dtype = jnp.dtype(kv_dtype or model.dtype)
    self.kv = kv_cache.allocate_kv(cfg, num_pages, page_size, self.kv_dtype)
    r, v = max_num_seqs, cfg.vocab_size
    self.last_tokens = jnp.zeros((r,), jnp.int32)
    self.counts = jnp.zeros((r, v), jnp.int32)
    self.prompt_mask = jnp.zeros((r, v), jnp.bool_)
    self._compiled: dict[int, object] = {}
    self.compile_seconds: dict[int, float] = {}
    self._jitted = jax.jit(self._step, donate_argnums=(1, 2, 3, 4))

  def bucket(self, num_tokens: int) -> int:
    for b in self.buckets:
      if num_tokens <= b:
        return b
    raise ValueError(f"{num_tokens} tokens exceed the dense batch {self.buckets[-1]}")

  # --- the step itself (traced once per bucket) ---------------------------------------------------
  def _forward(self, params, kv, tokens, inp: StepInputs):
    m = self.model.bind(params)
    cfg = self.model.config
    x = m.embed(tokens)
    new_kv = []
    for layer, cache in zip(m.layers, kv):
      q, k, v = layer.qkv(layer.attn_norm(x))
      q, k = m.rope(q, k, inp.positions)
      cache = append_kv(cache, k, v, inp.kv_pages, inp.kv_offsets)
      attn = paged_attention_reference(q, cache, inp.page_table, inp.slots, inp.positions, cfg.sliding_window)
      x = x + layer.o(attn)
      x = x + layer.mlp(layer.mlp_norm(x))
      new_kv.append(cache)
    return m.logits(x[inp.sample_index]), new_kv

  def _step(self, params, kv, last_tokens, counts, prompt_mask, inp: StepInputs, sp: sampler.SamplingArrays):
    tokens = jnp.where(inp.from_device, last_tokens[inp.slots], inp.tokens)
    logits, new_kv = self._forward(params, kv, tokens, inp)
    counts = jnp.where(inp.reset[:, None], 0, counts)
    prompt_mask = jnp.where(inp.reset[:, None], False, prompt_mask)
    prompt_mask = prompt_mask.at[inp.slots, tokens].max(inp.kinds == KIND_PROMPT)
    counts = counts.at[inp.slots, tokens].add((inp.kinds == KIND_REFED_OUTPUT).astype(jnp.int32))
    tok, lp, top_lp, top_ids = sampler.sample(logits, counts, prompt_mask, sp)
    last_tokens = jnp.where(inp.sample_mask, tok, last_tokens)
    rows = jnp.arange(tok.shape[0])
    counts = counts.at[rows, tok].add(inp.sample_mask.astype(jnp.int32))
    return new_kv, last_tokens, counts, prompt_mask, (tok, lp, top_lp, top_ids)

  # --- host side --------------------------------------------------------------------------------
  def _compiled_for(self, n: int, inp: StepInputs, sp: sampler.SamplingArrays):
    if n not in self._compiled:
      t = time.perf_counter()
      lowered = self._jitted.lower(self.model.params, self.kv, self.last_tokens, self.counts, self.prompt_mask,
                                   inp, sp)
      self._compiled[n] = lowered.compile()
      self.compile_seconds[n] = time.perf_counter() - t
      log.info("compiled the step for %d tokens in %.1f s", n, self.compile_seconds[n])
    return self._compiled[n]

  def run(self, inp: StepInputs, sp: sampler.SamplingArrays):
    """Dispatches the step; returns device arrays (tokens, logprob, top logprobs, top ids) not yet read."""
    fn = self._compiled_for(len(inp.tokens), inp, sp)
    self.kv, self.last_tokens, self.counts, self.prompt_mask, out = fn(
        self.model.params, self.kv, self.last_tokens, self.counts, self.prompt_mask, inp, sp)
    return out
