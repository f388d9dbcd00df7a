"""Ceilings measured in the running process, for ratios that hold across runs."""
from __future__ import annotations

import statistics
import time


def gemm_peak_tflops(samples: int = 5) -> float:
  """XLA's bf16 GEMM rate on this device, measured now (8192^3 on a GPU, 1024^3 on a CPU): the best of
  `samples` timings, since a ceiling is the best the device showed (single timings varied by 15% with
  the clocks)."""
  import jax
  import jax.numpy as jnp
  n = 8192 if jax.default_backend() == "gpu" else 1024
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  reps = 20 if n == 8192 else 3
  best = float("inf")
  for _ in range(samples):
    t = time.perf_counter()
    for _ in range(reps):
      r = f(a)
    jax.block_until_ready(r)
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 * reps / best / 1e12


def median_seconds(fn, *args, iters: int = 20, samples: int = 5) -> float:
  """Median seconds per call of fn(*args): queue `iters` calls, block once, `samples` times (one
  block per call would add host latency to every figure)."""
  import jax
  jax.block_until_ready(fn(*args))
  out = []
  for _ in range(samples):
    t = time.perf_counter()
    for _ in range(iters):
      r = fn(*args)
    jax.block_until_ready(r)
    out.append((time.perf_counter() - t) / iters)
  return statistics.median(out)
