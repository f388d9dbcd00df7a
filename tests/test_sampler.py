"""The device sampler against a numpy reference of each transformation, on fresh random logits."""
import jax
import numpy as np
import pytest

from nanoflow_jax import sampler
from nanoflow_jax.sampling_params import MAX_BANNED_IDS, MAX_LOGPROBS

R, V = 6, 50
sample = jax.jit(sampler.sample)  # as the engine runs it: inside a compiled step


def _arrays(**rows):
  sp = sampler.SamplingArrays.empty(R)
  for k, v in rows.items():
    getattr(sp, k)[:] = v
  return sp


def _ref_penalize(logits, counts, prompt_mask, rep, pres, freq):
  out = logits.copy()
  seen = (counts > 0) | prompt_mask
  out = np.where(seen, np.where(out > 0, out / rep, out * rep), out)
  return out - pres * (counts > 0) - freq * counts


@pytest.fixture
def inputs():
  rng = np.random.default_rng()
  logits = rng.normal(size=(R, V)).astype(np.float32) * 3
  counts = rng.integers(0, 3, size=(R, V)).astype(np.int32) * (rng.random((R, V)) < 0.2)
  prompt_mask = rng.random((R, V)) < 0.1
  return logits, counts.astype(np.int32), prompt_mask


def test_penalties_match_reference(inputs):
  logits, counts, pm = inputs
  sp = _arrays(repetition_penalty=1.7, presence_penalty=0.6, frequency_penalty=0.3)
  got = np.asarray(sampler.apply_penalties(logits, counts, pm, sp))
  np.testing.assert_allclose(got, _ref_penalize(logits, counts, pm, 1.7, 0.6, 0.3), rtol=1e-6, atol=1e-6)


def test_greedy_is_argmax_of_penalized(inputs):
  logits, counts, pm = inputs
  sp = _arrays(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5, num_logprobs=20)
  tok, lp, top_lp, top_ids = map(np.asarray, sample(logits, counts, pm, sp))
  np.testing.assert_array_equal(tok, np.argmax(_ref_penalize(logits, counts, pm, 2.0, 0, 0.5), axis=-1))
  ref_lp = jax.nn.log_softmax(logits, axis=-1)  # logprobs are of the raw distribution
  np.testing.assert_allclose(lp, np.take_along_axis(np.asarray(ref_lp), tok[:, None], 1)[:, 0], rtol=1e-5)
  np.testing.assert_array_equal(top_ids[:, 0], np.argmax(logits, axis=-1))


def _empirical(logits, sp, draws=400):
  zeros = np.zeros((R, V), np.int32)
  seen = np.zeros((R, V), bool)
  for step in range(draws):
    sp.step[:] = step
    tok = np.asarray(sample(logits, zeros, np.zeros((R, V), bool), sp)[0])
    seen[np.arange(R), tok] = True
  return seen


def test_top_k_top_p_min_p_restrict_support(inputs):
  logits, _, _ = inputs
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  order = np.argsort(-probs, axis=-1)
  # top_k = 3: only the 3 most likely ever appear
  seen = _empirical(logits, _arrays(top_k=3, seed=np.arange(R)))
  for r in range(R):
    assert set(np.nonzero(seen[r])[0]) <= set(order[r, :3])
  # top_p = 0.5: the smallest prefix reaching 0.5
  seen = _empirical(logits, _arrays(top_p=0.5, seed=np.arange(R)))
  for r in range(R):
    sp_ = probs[r, order[r]]
    keep = order[r, :int(np.searchsorted(np.cumsum(sp_), 0.5) + 1)]
    assert set(np.nonzero(seen[r])[0]) <= set(keep)
  # min_p = 0.3: tokens at least 0.3 x the top probability
  seen = _empirical(logits, _arrays(min_p=0.3, seed=np.arange(R)))
  for r in range(R):
    assert set(np.nonzero(seen[r])[0]) <= set(np.nonzero(probs[r] >= 0.3 * probs[r].max())[0])


def test_temperature_sharpens(inputs):
  logits, _, _ = inputs
  hot = _empirical(logits, _arrays(temperature=5.0, seed=np.arange(R)), draws=200).sum()
  cold = _empirical(logits, _arrays(temperature=0.2, seed=np.arange(R)), draws=200).sum()
  assert hot > cold


def test_banned_ids_never_sampled(inputs):
  logits, counts, pm = inputs
  sp = _arrays(temperature=0.0)
  best = np.argmax(logits, axis=-1)
  sp.banned[:, 0] = best
  tok = np.asarray(sample(logits, counts * 0, pm & False, sp)[0])
  assert not np.any(tok == best)
  assert sp.banned.shape[1] == MAX_BANNED_IDS


def test_seed_and_step_determine_the_draw(inputs):
  logits, counts, pm = inputs
  a = _arrays(seed=7, step=3)
  t1 = np.asarray(sample(logits, counts, pm, a)[0])
  t2 = np.asarray(sample(logits, counts, pm, a)[0])
  np.testing.assert_array_equal(t1, t2)
  draws = {tuple(np.asarray(sample(logits, counts, pm, _arrays(seed=s, step=3))[0])) for s in range(8)}
  assert len(draws) > 1


@pytest.mark.parametrize("case", ["greedy", "mixed", "penalized", "truncated", "logprobs"])
def test_host_modes_give_the_device_conditionals_tokens(inputs, case):
  """The engine decides the sampler's branches on the host from the rows it samples (Modes); on those
  rows the tokens and logprobs equal the all-rows lax.cond path's. Rows not sampled may differ."""
  logits, counts, pm = inputs
  rng = np.random.default_rng()
  sp = _arrays(temperature=0.0, seed=rng.integers(0, 2 ** 31, R).astype(np.uint32), step=3)
  rows = np.array([True, True, False, True, False, True])
  if case != "greedy":
    sp.temperature[[1, 3]] = 0.8
  if case == "penalized":
    sp.repetition_penalty[0] = 1.5
  if case == "truncated":
    sp.top_p[1] = 0.7
    sp.top_k[3] = 5
  if case == "logprobs":
    sp.num_logprobs[5] = 3
  sp.temperature[2] = 1.0        # a row not sampled this step: must not turn the sampling branch on
  sp.repetition_penalty[4] = 2.0
  modes = sampler.modes_for(sp, rows)
  assert modes.all_greedy == (case == "greedy") and modes.penalized == (case == "penalized")
  assert modes.truncation == (case == "truncated") and modes.logprobs == (case == "logprobs")
  static = jax.jit(lambda *a: sampler.sample(*a, modes=modes))(logits, counts, pm, sp)
  dynamic = sample(logits, counts, pm, sp)
  for s, d in zip(static, dynamic):   # (the top log-probabilities: the host's modes ask only as many as rows do)
    s, d = np.asarray(s), np.asarray(d)
    np.testing.assert_allclose(s[rows], d[rows][..., :s.shape[-1]] if s.ndim == 2 else d[rows], rtol=1e-6)
  assert static[2].shape[-1] == (sampler.TOPK_KERNEL_MAX_K if case == "logprobs" else MAX_LOGPROBS)


def _random_truncation(rng, rows, vocab):
  p = sampler.SamplingArrays.empty(rows)
  p.top_k = rng.choice([0, 1, 2, 7, 50, vocab - 1, vocab + 5], rows).astype(np.int32)
  p.top_p = rng.choice([1.0, 0.999, 0.9, 0.5, 0.1, 0.01], rows).astype(np.float32)
  p.min_p = rng.choice([0.0, 0.0, 0.01, 0.2, 0.9], rows).astype(np.float32)
  # rows from flat to peaked, with negatives, and banned tokens (-inf)
  logits = rng.normal(size=(rows, vocab)) * rng.uniform(0.3, 8, size=(rows, 1)) + rng.normal(size=(rows, 1)) * 5
  logits[rng.random((rows, vocab)) < 0.02] = -np.inf
  return jax.numpy.asarray(logits, jax.numpy.float32), p


def _near_top_p(logits, p):
  """Where a token's more-likely mass is within rounding of its row's top_p: either side of the cut is right
  there (the sort's float32 cumulative sum even passes 1.0 in a long tail, so at top_p=1 it drops tokens)."""
  x = np.asarray(logits, np.float64)
  probs = np.exp(x - x.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  before = np.array([[probs[r][x[r] > x[r, t]].sum() for t in range(x.shape[1])] for r in range(x.shape[0])])
  return np.abs(before - p.top_p[:, None]) < 1e-5


@pytest.mark.parametrize("seed,bits", [(0, 4), (1, 4), (2, 4), (3, 4), (4, 1), (5, 2), (6, 8)])
def test_threshold_truncation_keeps_the_sorts_sets(seed, bits, monkeypatch):
  """truncate_by_threshold (the sampler's: no sort) keeps exactly the tokens truncate (one sort) keeps, on fresh
  random rows with every mix of top_k, top_p and min_p, except where the sort's exclusive cumulative mass sits
  within rounding of top_p (either side is right there; those rows are checked on the other tokens). At each
  search width the bench can time (bits a pass)."""
  monkeypatch.setattr(sampler, "SEARCH_BITS", bits)
  rng = np.random.default_rng(seed + 100)
  logits, p = _random_truncation(rng, 96, 3001)
  want = np.asarray(sampler.truncate(logits, p)) > -np.inf
  got = np.asarray(jax.jit(sampler.truncate_by_threshold)(logits, p)) > -np.inf
  near = _near_top_p(logits, p)
  assert want.sum() > 0 and (~want).sum() > 0
  np.testing.assert_array_equal(got[~near], want[~near])


def test_threshold_truncation_keeps_ties_at_the_cut_together():
  """Tokens tied at a cut-off are kept together (the sort keeps k of them in its own order): top_k=2 over three
  equal likeliest tokens keeps all three; a cut between distinct values is exact."""
  p = sampler.SamplingArrays.empty(2)
  p.top_k[:] = 2
  logits = jax.numpy.asarray([[3.0, 1.0, 3.0, 3.0, 0.0], [3.0, 2.0, 1.0, 0.5, 0.0]], jax.numpy.float32)
  got = np.asarray(sampler.truncate_by_threshold(logits, p)) > -np.inf
  np.testing.assert_array_equal(got, [[True, False, True, True, False], [True, True, False, False, False]])


@pytest.mark.parametrize("kind", ["top_p", "top_k", "min_p"])
def test_threshold_truncation_leaves_out_the_search_no_row_needs(kind):
  """Modes.by_rank / by_mass False (no sampling row has top_k / top_p): that half of the search is left out and
  the kept sets are still the sort's; modes_for says which halves the sampled rows need."""
  rng = np.random.default_rng(7)
  logits, p = _random_truncation(rng, 64, 2001)
  if kind != "top_k":
    p.top_k[:] = 0
  if kind != "top_p":
    p.top_p[:] = 1.0
  if kind != "min_p":
    p.min_p[:] = 0.0
  p.temperature[:] = 0.8
  modes = sampler.modes_for(p, np.ones(64, np.bool_))
  assert (modes.by_rank, modes.by_mass, modes.truncation) == (kind == "top_k", kind == "top_p", True)
  want = np.asarray(sampler.truncate(logits, p)) > -np.inf
  got = np.asarray(jax.jit(lambda x: sampler.truncate_by_threshold(x, p, modes.by_rank, modes.by_mass))(logits))
  near = _near_top_p(logits, p)
  np.testing.assert_array_equal((got > -np.inf)[~near], want[~near])
  assert ((np.asarray(logits) > -np.inf) & ~want)[~near].sum() > 0   # it does cut finite tokens
