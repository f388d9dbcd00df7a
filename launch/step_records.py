"""What an offline run's steps held and how long they took (from EngineStats.step_records).

The engine runs one step ahead and waits for each step's results before it dispatches the step after
next, so where the device is the bottleneck the gap between two dispatches is a device step time.
From the records: the steady-state rate (steps whose batch is full, which a run of few requests dilutes
with its ramp-up and its tail of shrinking decode-only steps), and a least-squares fit of step time
against the step's padded tokens (the GEMMs) and the decodes' summed context (attention reads), which
says where a step's time goes without a profiler.
"""
from __future__ import annotations

import numpy as np

FULL_BATCH = 0.95  # a step counts as full when it holds this share of the dense batch
STALL_FACTOR, STALL_MIN_S = 5.0, 0.1   # a stall: a step this many times the median, and at least this long


def step_table(records) -> np.ndarray:
  """Rows: (seconds, tokens, bucket, decodes, decode_context) for every step but the last."""
  if len(records) < 2:
    return np.zeros((0, 5))
  r = np.asarray([tuple(x) for x in records], np.float64)
  seconds = np.diff(r[:, 0])
  return np.column_stack([seconds, r[:-1, 1:]])


def summarize(records, dense_batch: int, optimal_tokens_per_s: float, exclude: range = range(0)) -> dict:
  """`exclude`: steps left out (those a profiler traced: starting it costs a second)."""
  t = step_table(records)
  keep = np.ones(len(t), bool)
  keep[[i for i in exclude if 0 <= i < len(t)]] = False
  t = t[keep]
  if not len(t):
    return {}
  seconds, tokens, bucket, _, context = t.T
  full = tokens >= FULL_BATCH * dense_batch
  out = {"steps_timed": len(t), "full_steps": int(full.sum()),
         "mean_tokens_per_step": float(tokens.mean())}
  # Stalls: isolated steps far longer than the rest (session 17: Python's full garbage collections, 0.4-0.6 s)
  stall = (seconds > STALL_FACTOR * np.median(seconds)) & (seconds > STALL_MIN_S)
  out["stalls"] = {"count": int(stall.sum()), "seconds": float(seconds[stall].sum()),
                   "longest_ms": 1e3 * float(seconds[stall].max()) if stall.any() else 0.0}
  if full.any():
    rate = tokens[full].sum() / seconds[full].sum()
    out.update(steady_tokens_per_s=float(rate), steady_percent_of_optimal=100 * float(rate) / optimal_tokens_per_s,
               steady_step_ms=1e3 * float(seconds[full].mean()))
  if len(t) >= 8:
    # step seconds ~ fixed + per_token * bucket + per_context * decode_context
    a = np.column_stack([np.ones(len(t)), bucket, context])
    coef, *_ = np.linalg.lstsq(a, seconds, rcond=None)
    pred = a @ coef
    ss = ((seconds - seconds.mean()) ** 2).sum()
    out["fit"] = {"fixed_ms": 1e3 * coef[0], "ms_per_1k_tokens": 1e6 * coef[1],
                  "ms_per_1m_context": 1e9 * coef[2],
                  "r2": float(1 - ((seconds - pred) ** 2).sum() / ss) if ss > 0 else 1.0}
  return out


def full_step_windows(records, dense_batch: int, trim_s: float = 1.0, min_s: float = 2.0) -> list[tuple[float, float]]:
  """[start, end) host times of the runs of consecutive full steps (a step spans from its record to the
  next one's), each run's first `trim_s` left out (a power reading averages the second before it), runs
  shorter than `min_s` after that dropped: where a sampler's readings show the steady state alone."""
  if len(records) < 2:
    return []
  r = np.asarray([tuple(x) for x in records], np.float64)
  full = r[:-1, 1] >= FULL_BATCH * dense_batch
  windows, k = [], 0
  while k < len(full):
    if not full[k]:
      k += 1
      continue
    j = k
    while j < len(full) and full[j]:
      j += 1
    start, end = r[k, 0] + trim_s, r[j, 0]
    if end - start >= min_s:
      windows.append((float(start), float(end)))
    k = j
  return windows


def plot(records, path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  t = step_table(records)
  fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
  a1.plot(1e3 * t[:, 0], lw=0.8)
  a1.set_ylabel("step (ms)")
  a2.plot(t[:, 1], lw=0.8, label="tokens")
  a2.plot(t[:, 3], lw=0.8, label="decodes")
  a2.set_ylabel("per step")
  a2.set_xlabel("step")
  a2.legend()
  a1.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
