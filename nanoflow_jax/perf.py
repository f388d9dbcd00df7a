"""Ceilings measured in the running process, for ratios that hold across runs."""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor


def gemm_peak_tflops(samples: int = 5, data: str = "ones", dtype: str = "bf16") -> float:
  """XLA's bf16 GEMM rate on this device, measured now (8192^3 on a GPU, 1024^3 on a CPU): the best of
  `samples` timings, since a ceiling is the best the device showed (single timings varied by 15% with
  the clocks). `data`: "ones" (the figure every run has reported) or "random" (normal values, like
  weights): on an H200 the GEMM of random data draws the board's 700 W and runs at a lower SM clock than
  the one of ones (lab/clock_probe.py), so the two peaks differ by the power limit."""
  import jax
  import jax.numpy as jnp
  if data not in ("ones", "random"):
    raise ValueError(f"data must be 'ones' or 'random', not {data!r}")
  n = 8192 if jax.default_backend() == "gpu" else 1024
  a = (jnp.ones((n, n), jnp.bfloat16) if data == "ones"
       else jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16))
  if dtype == "fp8":   # XLA's direct e4m3 dot (cuBLASLt's fp8 GEMM on the GPU), bf16 out: the fp8 ceiling
    a = a.astype(jnp.float8_e4m3fn)
    # a @ a.T: both operands K-major, the layout cuBLASLt's fp8 GEMM takes without a transpose
    f = jax.jit(lambda a: jax.lax.dot_general(a, a, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16))
  else:
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


def compile_all(cases: list, workers: int = 8, desc: str = "compiling") -> list:
  """[(name, fn, args)] -> fn compiled for args, for each case in order, ready to call as fn(*args).

  A profile times ~100 kernels, each compiled once; they used to compile one after another between timings
  (what share of the auto-search's time that is on a GPU is not yet measured: it now prints it). Tracing and
  lowering hold the GIL and run here, one by one; XLA's compile releases it and runs on `workers` threads,
  beside the lowering of the next cases (8 fp8 GEMMs compiled deviceless for an H200 on 2 busy cores: 6.5-7.9 s
  on 2 threads against 9.7-10.0 s on one). A failed lowering or compile raises naming its case."""
  import jax
  from tqdm import tqdm
  with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(total=len(cases), desc=desc, unit="kernel") as bar:
    futures = []
    for name, fn, args in cases:
      try:
        lowered = jax.jit(fn).lower(*args)
      except Exception as e:
        raise RuntimeError(f"lowering {name}: {e}") from e
      future = pool.submit(lowered.compile)
      future.add_done_callback(lambda _: bar.update())
      futures.append((name, future))
    out = []
    for name, future in futures:
      try:
        out.append(future.result())
      except Exception as e:
        raise RuntimeError(f"compiling {name}: {e}") from e
  return out


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


def chained(fn, reps: int):
  """fn called `reps` times in a row in one computation: run(firsts, *rest) calls fn(firsts[i], *rest)
  for each of `reps` distinct first arguments (XLA merges identical calls, even across an optimization
  barrier), each call ordered after the last by a barrier; every output is returned, so none is dropped
  as dead code."""
  import jax

  def run(firsts, *rest):
    assert len(firsts) == reps
    outs, prev = [], None
    for first in firsts:
      if prev is not None:
        first, _ = jax.lax.optimization_barrier((first, prev))
      prev = fn(first, *rest)
      outs.append(prev)
    return outs
  return run


def distinct_copies(x, n: int) -> list:
  """n copies of the array x in buffers of their own (chained's distinct first arguments)."""
  import jax.numpy as jnp
  return [jnp.array(x, copy=True) for _ in range(n)]


def concurrent_step(fa, args_a: tuple, reps_a: int, fb, args_b: tuple, reps_b: int):
  """One compiled step running fa `reps_a` times in a chain on one stream and fb `reps_b` times on another
  (stream annotation on a GPU; elsewhere the same step without streams), as the nano-batch pipeline runs two
  nano-ops. Returns (step, in_a, in_b, chain_a, chain_b): step(in_a, in_b) runs both chains at once; the
  jitted chain_a(*in_a) and chain_b(*in_b) run each alone."""
  import jax
  from nanoflow_jax import compat
  ca, cb = chained(fa, reps_a), chained(fb, reps_b)
  in_a = (distinct_copies(args_a[0], reps_a), *args_a[1:])
  in_b = (distinct_copies(args_b[0], reps_b), *args_b[1:])
  gpu = jax.default_backend() == "gpu"
  on = (lambda f, s: compat.compute_on(f, f"gpu_stream:{s}")) if gpu else (lambda f, s: f)
  both = jax.jit(lambda a, b: (on(ca, 1)(*a), on(cb, 2)(*b)))
  step = both.lower(in_a, in_b).compile(compat.STREAM_ANNOTATION_OPTIONS if gpu else None)
  return step, in_a, in_b, jax.jit(ca), jax.jit(cb)


def balanced_reps(t_a: float, t_b: float) -> tuple[int, int]:
  """Chain lengths that make two chains about equally long (4x the longer single call), so that they
  really overlap."""
  return max(1, round(4 * max(t_a, t_b) / t_a)), max(1, round(4 * max(t_a, t_b) / t_b))


def concurrent_seconds(fa, args_a: tuple, fb, args_b: tuple, iters: int = 10) -> dict:
  """Two kernels side by side, as the nano-batch pipeline runs them: each as a chain of calls on a stream
  of its own in one step (concurrent_step), the chains about equally long (balanced_reps).
  Returns seconds: a and b (one call), chain_a and chain_b (alone), both (the two chains at once), and
  reps_a, reps_b."""
  import jax
  t_a = median_seconds(jax.jit(fa), *args_a, iters=iters)
  t_b = median_seconds(jax.jit(fb), *args_b, iters=iters)
  reps_a, reps_b = balanced_reps(t_a, t_b)
  step, in_a, in_b, chain_a, chain_b = concurrent_step(fa, args_a, reps_a, fb, args_b, reps_b)
  n = max(1, iters // 2)
  return {"a": t_a, "b": t_b, "reps_a": reps_a, "reps_b": reps_b,
          "chain_a": median_seconds(chain_a, *in_a, iters=n),
          "chain_b": median_seconds(chain_b, *in_b, iters=n),
          "both": median_seconds(step, in_a, in_b, iters=n)}
