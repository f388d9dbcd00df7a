"""nanoflow_jax.perf's chains of kernel calls: every call survives compilation (XLA merges identical calls
and drops unused ones, which would make a chain's time that of one call), and the outputs are the calls'."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax import perf


def test_chained_keeps_every_call_and_its_output():
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 64))
  w = jax.random.normal(jax.random.PRNGKey(1), (64, 64))
  f = lambda x, w: jnp.tanh(x @ w)
  firsts = perf.distinct_copies(x, 3)
  assert len({id(c) for c in firsts}) == 3 and all(np.array_equal(c, x) for c in firsts)
  def kernels(reps, firsts):
    hlo = jax.jit(perf.chained(f, reps)).lower(firsts, w).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    return entry.count("fusion(") + entry.count(" dot(")
  assert kernels(3, firsts) == 3 * kernels(1, firsts[:1]) > 0   # three calls, not one
  # (what chained guards against: the same call three times compiles to one)
  same = jax.jit(lambda x, w: [f(x, w) for _ in range(3)]).lower(x, w).compile().as_text()
  assert same[same.index("ENTRY"):].count("fusion(") + same[same.index("ENTRY"):].count(" dot(") < kernels(3, firsts)
  run = jax.jit(perf.chained(f, 3))
  outs = run(firsts, w)
  assert len(outs) == 3 and all(np.allclose(o, f(x, w), atol=1e-5) for o in outs)


def test_concurrent_seconds_balances_the_chains():
  a = jnp.ones((256, 256))
  b = jnp.ones((32, 32))
  t = perf.concurrent_seconds(lambda a: a @ a, (a,), lambda b: b + 1, (b,), iters=2)
  assert t["reps_a"] >= 1 and t["reps_b"] >= t["reps_a"]         # the quick op repeats more
  assert all(t[k] > 0 for k in ("a", "b", "chain_a", "chain_b", "both"))


def test_gemm_peak_on_ones_or_random_data():
  assert perf.gemm_peak_tflops(samples=1) > 0
  assert perf.gemm_peak_tflops(samples=1, data="random") > 0
  with pytest.raises(ValueError, match="ones' or 'random"):
    perf.gemm_peak_tflops(data="zeros")


def test_compile_all_gives_each_case_compiled_for_its_args_in_order():
  import jax
  import jax.numpy as jnp
  from nanoflow_jax.perf import compile_all
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 16))
  w = jax.random.normal(jax.random.PRNGKey(2), (16, 4))
  cases = [(f"scaled {k}", lambda x, w, k=k: (x @ w) * k, (x, w)) for k in range(5)]
  cases.append(("a residual of None", lambda x, w, r: x @ w if r is None else x @ w + r, (x, w, None)))
  compiled = compile_all(cases, workers=3)
  assert len(compiled) == len(cases)
  for (name, fn, args), exe in zip(cases, compiled):
    np.testing.assert_allclose(np.asarray(exe(*args)), np.asarray(fn(*args)), rtol=1e-6, err_msg=name)
  with pytest.raises(RuntimeError, match="lowering bad shapes"):   # the failing case is named
    compile_all([("fine", lambda x: x + 1, (x,)), ("bad shapes", lambda x, w: x @ w.T, (x, w))], workers=2)
