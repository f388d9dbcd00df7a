"""Sampling on the device, one row per sequence slot, every parameter per row.

Order as vLLM applies it: penalties (repetition over prompt+output, presence and frequency over the
output), min_tokens (EOS/stop ids banned), temperature, then top_k, top_p and min_p on the sorted
probabilities (the kept sets found without a sort: truncate_by_threshold), then a draw with the row's own
key: fold_in(PRNGKey(seed), tokens generated so far), so a seeded request gives the same tokens whatever
else is in the batch. Logprobs are of the raw model distribution.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nanoflow_jax.sampling_params import MAX_BANNED_IDS, MAX_LOGPROBS


@dataclasses.dataclass
class SamplingArrays:
  """Host-built per-slot parameters for one step (numpy; all [R] unless noted)."""
  temperature: np.ndarray
  top_k: np.ndarray
  top_p: np.ndarray
  min_p: np.ndarray
  repetition_penalty: np.ndarray
  presence_penalty: np.ndarray
  frequency_penalty: np.ndarray
  seed: np.ndarray          # uint32
  step: np.ndarray          # int32: tokens generated so far
  banned: np.ndarray        # [R, MAX_BANNED_IDS] ids masked out (min_tokens), -1 = none
  num_logprobs: np.ndarray  # int32: top log-probabilities asked (0: none; SamplingParams.logprobs)

  @classmethod
  def empty(cls, rows: int) -> "SamplingArrays":
    f = lambda v: np.full((rows,), v, np.float32)
    return cls(temperature=f(1.0), top_k=np.zeros(rows, np.int32), top_p=f(1.0), min_p=f(0.0),
               repetition_penalty=f(1.0), presence_penalty=f(0.0), frequency_penalty=f(0.0),
               seed=np.zeros(rows, np.uint32), step=np.zeros(rows, np.int32),
               banned=np.full((rows, MAX_BANNED_IDS), -1, np.int32), num_logprobs=np.zeros(rows, np.int32))


jax.tree_util.register_dataclass(SamplingArrays, data_fields=[f.name for f in dataclasses.fields(SamplingArrays)],
                                 meta_fields=[])


def ban(logits, p: SamplingArrays):
  """-inf at each row's banned ids (min_tokens keeps EOS and stop ids out)."""
  rows = jnp.arange(logits.shape[0])[:, None]
  banned = jnp.where(p.banned >= 0, p.banned, logits.shape[1])  # -1 -> out of range -> dropped
  return logits.at[rows, banned].set(-jnp.inf, mode="drop")


def apply_penalties(logits, counts, prompt_mask, p: SamplingArrays):
  seen = (counts > 0) | prompt_mask
  rep = p.repetition_penalty[:, None]
  logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
  logits = logits - p.presence_penalty[:, None] * (counts > 0) - p.frequency_penalty[:, None] * counts
  return ban(logits, p)


def truncate(scaled, p: SamplingArrays):
  """top_k, top_p and min_p: -inf outside each row's kept set (one sort over the vocabulary): the reference
  that truncate_by_threshold (what the sampler runs) is tested against."""
  vocab = scaled.shape[-1]
  order = jnp.argsort(-scaled, axis=-1)
  sorted_l = jnp.take_along_axis(scaled, order, axis=-1)
  probs = jax.nn.softmax(sorted_l, axis=-1)
  rank = jnp.arange(vocab)[None, :]
  drop = (p.top_k[:, None] > 0) & (rank >= p.top_k[:, None])
  drop |= (jnp.cumsum(probs, axis=-1) - probs) > p.top_p[:, None]
  drop |= probs < p.min_p[:, None] * probs[:, :1]
  drop = drop.at[:, 0].set(False)  # the most likely token always survives
  rows = jnp.arange(scaled.shape[0])[:, None]
  # each row's order is a permutation: unique indices, so XLA's GPU scatter needs no atomics (byte-wide CAS loops)
  drop = jnp.zeros_like(drop).at[rows, order].set(drop, unique_indices=True)
  return jnp.where(drop, -jnp.inf, scaled)


# XLA's GPU TopK kernel takes k up to 16; from 17 lax.top_k is a sort of the whole vocabulary (deviceless census:
# 21 sort passes at k=17 or 20, one topk kernel at k<=16; logprobs at k=20 cost 5.1 ms at 512 rows, H100). A
# step whose rows ask at most this many top log-probabilities computes this many.
TOPK_KERNEL_MAX_K = 16
# truncate_by_threshold finds each row's cut-off key SEARCH_BITS bits a pass over the vocabulary.
SEARCH_BITS = 4


def _order_keys(x):
  """fp32 -> uint32 keys in the same order (a float's bits, the negatives' flipped)."""
  u = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where((u >> 31) == 1, ~u, u | jnp.uint32(0x80000000))


def truncate_by_threshold(scaled, p: SamplingArrays, by_rank: bool = True, by_mass: bool = True):
  """`truncate` without the sort: each condition keeps the tokens at or above a threshold, found by a search
  over the logits' order-preserving keys, SEARCH_BITS bits a pass (32 / SEARCH_BITS passes over the rows, each
  testing 2^SEARCH_BITS - 1 cut-offs an element; H100, session 30: 7.2 against the sort's 8.5 ms at 512 rows,
  0.97 against 2.0 at 64; the passes are bound by that work, not by memory).
  top_p keeps the tokens whose more-likely tokens' mass is at most top_p (the sort's exclusive cumulative sum),
  top_k those with fewer than k more-likely tokens, min_p those at least min_p times the likeliest. The same
  kept sets as `truncate`, except that tokens tied at a cut-off are kept together (the sort keeps them in its
  own order) and a token whose more-likely mass is within rounding of top_p may fall either way. by_rank /
  by_mass False: no row has top_k / top_p, and that half of the search is left out."""
  keys = _order_keys(scaled)
  vmax = jnp.max(scaled, axis=-1, keepdims=True)
  e = jnp.exp(scaled - vmax)                  # unnormalized probabilities, the likeliest 1
  # top_p >= 1 and top_k <= 0 bound nothing (the bounds are then above any mass and any count)
  mass_bound = jnp.where(p.top_p >= 1, jnp.inf, p.top_p * jnp.sum(e, axis=-1))[:, None]
  ranks_bound = jnp.where(p.top_k <= 0, jnp.iinfo(jnp.int32).max, p.top_k - 1)[:, None]
  # The cut-off: the least key c with mass(keys > c) <= top_p and count(keys > c) <= k - 1 (both hold from some
  # key on, so together too: the larger of the two cut-offs); it is a token's key. Each pass splits the range
  # left into 2^SEARCH_BITS blocks and tests each block's last key.
  lo = jnp.zeros(scaled.shape[:1], jnp.uint32)
  j = jnp.arange(1, 2 ** SEARCH_BITS, dtype=jnp.uint32)[None, :]
  for level in range(32 // SEARCH_BITS if by_rank or by_mass else 0):
    shift = 32 - SEARCH_BITS * (level + 1)
    ends = lo[:, None] + (j << shift) - 1            # [R, blocks - 1]: no overflow, lo's low bits are zero
    k3, ends3 = keys[:, None, :], ends[:, :, None]     # [R, blocks - 1, V] below, fused into one reduction
    # `above` written twice (> and <) on purpose: one compare shared by both sums would have XLA write it out
    # (985 MB at 512 rows, deviceless census)
    terms, zeros = [], []
    if by_mass:
      terms.append(jnp.where(k3 > ends3, e[:, None, :], 0.0))
      zeros.append(jnp.float32(0))
    if by_rank:
      terms.append((ends3 < k3).astype(jnp.int32))
      zeros.append(jnp.int32(0))
    sums = jax.lax.reduce(tuple(terms), tuple(zeros), lambda a, b: tuple(x + y for x, y in zip(a, b)), (2,))
    fails = jnp.zeros(ends.shape, jnp.bool_)
    if by_mass:
      fails |= sums[0] > mass_bound
    if by_rank:
      fails |= sums[-1] > ranks_bound
    lo = lo + (jnp.sum(fails, axis=-1).astype(jnp.uint32) << shift)
  # the likeliest token always survives: nothing is above it (mass 0, count 0) and its e is 1 >= min_p
  keep = (keys >= lo[:, None]) & ~(e < p.min_p[:, None])
  return jnp.where(keep, scaled, -jnp.inf)


class Modes(NamedTuple):
  """Which costly parts of `sample` a step needs, decided on the host from the rows it samples. Passed
  static, they replace lax.cond: a conditional on the GPU makes the host wait for the whole step before
  it can launch the rest (measured: 19 ms of a 67 ms step idle, docs/history/perf-notes.md)."""
  penalized: bool      # some row has a repetition, presence or frequency penalty
  all_greedy: bool     # every row takes the argmax
  truncation: bool     # some sampling row has top_k, top_p or min_p
  logprobs: bool       # some row wants top logprobs
  structured: bool = False   # some row's tokens are masked by a grammar (structured output)
  biased: bool = False       # some row has a logit_bias
  # which halves of truncation's search a step needs (each is half its work): some sampling row has top_k
  # (by_rank), top_p (by_mass); None where not known or there is no truncation (then both where it runs)
  by_rank: bool | None = None
  by_mass: bool | None = None
  # some row asks more than TOPK_KERNEL_MAX_K top log-probabilities (then all MAX_LOGPROBS are computed); None
  # where not known or none are asked
  many_logprobs: bool | None = None


def modes_for(p: SamplingArrays, rows: np.ndarray) -> Modes:
  """The Modes of the rows in the bool mask `rows` (numpy, on the host; other rows' tokens are unused)."""
  greedy = p.temperature[rows] < 1e-5
  sampling = ~greedy
  truncation = bool(np.any(sampling & ((p.top_k[rows] > 0) | (p.top_p[rows] < 1) | (p.min_p[rows] > 0))))
  logprobs = bool(np.any(p.num_logprobs[rows] > 0))
  return Modes(
      penalized=bool(np.any((p.repetition_penalty[rows] != 1) | (p.presence_penalty[rows] != 0) |
                            (p.frequency_penalty[rows] != 0))),
      all_greedy=bool(np.all(greedy)),
      truncation=truncation,
      logprobs=logprobs,
      many_logprobs=bool(np.any(p.num_logprobs[rows] > TOPK_KERNEL_MAX_K)) if logprobs else None,
      by_rank=bool(np.any(sampling & (p.top_k[rows] > 0))) if truncation else None,
      by_mass=bool(np.any(sampling & (p.top_p[rows] < 1))) if truncation else None)


def _branch(static: bool | None, dynamic, true_fn, false_fn, x):
  """true_fn(x) or false_fn(x): chosen in Python when `static` is known, else by lax.cond on `dynamic`."""
  if static is None:
    return jax.lax.cond(dynamic, true_fn, false_fn, x)
  return true_fn(x) if static else false_fn(x)


def sample(logits: jax.Array, counts: jax.Array, prompt_mask: jax.Array, p: SamplingArrays,
           modes: Modes | None = None):
  """logits [R, V] fp32 -> (tokens [R], sampled logprob [R], top logprobs [R, K], top ids [R, K]).

  The costly parts (penalties over [R, V], the vocabulary sort, the draw, the top-K logprobs) run only
  when some row asks for them: per `modes` when given (the engine's way: no device conditionals), else
  decided on the device over all rows (lax.cond). A greedy batch pays for an argmax.
  """
  m = modes or Modes(None, None, None, None)
  raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
  penalized = jnp.any((p.repetition_penalty != 1) | (p.presence_penalty != 0) | (p.frequency_penalty != 0))
  logits = _branch(m.penalized, penalized, lambda l: apply_penalties(l, counts, prompt_mask, p),
                   lambda l: ban(l, p), logits)
  greedy_tok = jnp.argmax(logits, axis=-1)
  greedy = p.temperature < 1e-5

  def sampled(logits):
    scaled = logits / jnp.maximum(p.temperature, 1e-5)[:, None]
    needs_truncation = jnp.any(~greedy & ((p.top_k > 0) | (p.top_p < 1) | (p.min_p > 0)))
    cut = functools.partial(truncate_by_threshold, p=p, by_rank=m.by_rank is not False,
                            by_mass=m.by_mass is not False)
    masked = _branch(m.truncation, needs_truncation, cut, lambda s: s, scaled)

    def draw(seed, step, row):
      return jax.random.categorical(jax.random.fold_in(jax.random.PRNGKey(seed), step), row)
    return jax.vmap(draw)(p.seed, p.step, masked).astype(jnp.int32)

  drawn = _branch(m.all_greedy, jnp.all(greedy), lambda l: greedy_tok.astype(jnp.int32), sampled, logits)
  tokens = jnp.where(greedy, greedy_tok, drawn).astype(jnp.int32)

  token_lp = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
  k = min(TOPK_KERNEL_MAX_K if m.many_logprobs is False else MAX_LOGPROBS, logits.shape[-1])
  top_lp, top_ids = _branch(
      m.logprobs, jnp.any(p.num_logprobs > 0), lambda l: tuple(jax.lax.top_k(l, k)),
      lambda l: (jnp.zeros((l.shape[0], k), l.dtype), jnp.zeros((l.shape[0], k), jnp.int32)), raw_logprobs)
  return tokens, token_lp, top_lp, top_ids.astype(jnp.int32)
