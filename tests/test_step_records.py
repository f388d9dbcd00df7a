"""launch/step_records.py: the steady-state rate and the step-time fit, on records made up here."""
import numpy as np

from launch import step_records
from nanoflow_jax.engine import StepRecord


def _records(rng, n=200, dense_batch=2048):
  """Steps whose time is 3 ms + 20 ms per 1k padded tokens + 15 ms per 1M context, with 1% noise."""
  t, out = 0.0, []
  for i in range(n):
    tokens = dense_batch if i < n // 2 else int(rng.integers(100, dense_batch // 2))
    bucket = 1 << int(np.ceil(np.log2(tokens)))
    decodes = int(rng.integers(0, min(tokens, 800)))
    context = decodes * int(rng.integers(500, 2000))
    out.append(StepRecord(t, tokens, bucket, decodes, context))
    t += (0.003 + 0.020 * bucket / 1e3 + 0.015 * context / 1e6) * (1 + 0.01 * rng.standard_normal())
  return out


def test_fit_recovers_the_step_cost_model():
  s = step_records.summarize(_records(np.random.default_rng(0)), 2048, optimal_tokens_per_s=1e5)
  f = s["fit"]
  assert abs(f["fixed_ms"] - 3) < 1.0
  assert abs(f["ms_per_1k_tokens"] - 20) < 1.0
  assert abs(f["ms_per_1m_context"] - 15) < 1.0
  assert f["r2"] > 0.95


def test_steady_state_counts_only_full_steps():
  rec = _records(np.random.default_rng(1))
  s = step_records.summarize(rec, 2048, optimal_tokens_per_s=1e5)
  t = step_records.step_table(rec)
  full = t[:, 1] >= 2048 * step_records.FULL_BATCH
  assert s["full_steps"] == full.sum() == 100
  assert np.isclose(s["steady_tokens_per_s"], t[full, 1].sum() / t[full, 0].sum())
  assert np.isclose(s["steady_percent_of_optimal"], 100 * s["steady_tokens_per_s"] / 1e5)
  assert step_records.summarize(rec[:1], 2048, 1e5) == {}


def test_excluded_steps_leave_the_fit():
  """A profiler's start makes one step a second long: excluded, the fit is as without it."""
  rec = _records(np.random.default_rng(2))
  spiked = [r._replace(dispatched_at=r.dispatched_at + (1.5 if i > 60 else 0)) for i, r in enumerate(rec)]
  clean = step_records.summarize(rec, 2048, 1e5)["fit"]
  assert abs(step_records.summarize(spiked, 2048, 1e5)["fit"]["fixed_ms"] - clean["fixed_ms"]) > 1
  fit = step_records.summarize(spiked, 2048, 1e5, exclude=range(59, 62))["fit"]
  assert abs(fit["fixed_ms"] - clean["fixed_ms"]) < 0.5


def test_full_step_windows_are_the_runs_of_full_steps_trimmed():
  # steps of 0.5 s: 2 partial, 10 full, 1 partial, 3 full (too short once trimmed), 1 partial
  tokens = [100] * 2 + [2048] * 10 + [300] + [2048] * 3 + [50]
  rec = [StepRecord(0.5 * i, n, 2048, 0, 0) for i, n in enumerate(tokens)]
  # the run of 10 starts at step 2 (1.0 s) and ends where step 12 starts (6.0 s); trimmed by 1 s
  assert step_records.full_step_windows(rec, 2048) == [(2.0, 6.0)]
  assert step_records.full_step_windows(rec, 2048, trim_s=0.0, min_s=1.0) == [(1.0, 6.0), (6.5, 8.0)]
  assert step_records.full_step_windows(rec[:1], 2048) == []


def test_stalls_are_the_isolated_long_steps():
  """Two 0.5 s steps among 50 ms ones (session 17's full garbage collections) are counted; a run without
  them has none, and a slow run evenly slow has none either."""
  t, recs = 0.0, []
  for i in range(200):
    recs.append((t, 2048, 2048, 500, 500_000))
    t += 0.5 if i in (50, 120) else 0.05
  recs.append((t, 0, 0, 0, 0))
  s = step_records.summarize(recs, 2048, 1e5)
  assert s["stalls"]["count"] == 2 and abs(s["stalls"]["seconds"] - 1.0) < 1e-6
  assert abs(s["stalls"]["longest_ms"] - 500) < 1e-3
  even = [(0.5 * i, 2048, 2048, 0, 0) for i in range(50)]
  assert step_records.summarize(even, 2048, 1e5)["stalls"]["count"] == 0
