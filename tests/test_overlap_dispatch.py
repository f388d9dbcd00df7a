"""Steps dispatched on a thread of their own (EngineConfig.overlap_dispatch, dispatch_thread.py): the outputs are
those of the engine without it, a step's tokens reach their clients before the next step's dispatch ends, and a
step that fails on the thread fails its requests without running anything on the state it left."""
import threading
import time

import numpy as np
import pytest

from nanoflow_jax import dispatch_thread, multihost
from nanoflow_jax.engine import Engine, EngineConfig
from nanoflow_jax.model import load_model
from nanoflow_jax.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model():
  return load_model("tiny", dtype="float32", random_weights=True)


def _engine(model, overlap, num_pages=64, host_gb=0.0, max_num_seqs=4, preempting=False):
  eng = Engine(model, EngineConfig(dense_batch=32, num_pages=num_pages, max_num_seqs=max_num_seqs,
                                   compilation_cache_dir=None, overlap_dispatch=overlap,
                                   host_kv_cache_gb=host_gb))
  if preempting:   # admission expects one output token per sequence: it admits more than the pages hold
    eng.scheduler.expected_output = lambda seq: 1
  return eng


def _workload(eng):
  """Two rounds of prompts sharing a prefix, every kind of request the loop treats apart (greedy, seeded, n=2,
  logprobs, prompt logprobs, a stop string, min_tokens), one aborted while in flight."""
  rng = np.random.default_rng(3)
  shared = [int(t) for t in rng.integers(3, 250, 40)]
  kinds = [dict(temperature=0.0), dict(temperature=0.9, seed=5), dict(temperature=0.8, seed=6, n=2),
           dict(temperature=0.0, logprobs=3), dict(temperature=0.0, prompt_logprobs=2),
           dict(temperature=0.7, seed=9, stop=["e"]), dict(temperature=0.0, min_tokens=8)]
  out = {}
  for r in range(2):
    rids = []
    for i, kw in enumerate(kinds):
      prompt = shared + [int(t) for t in rng.integers(3, 250, 3 + 11 * i)]
      rid = f"{r}-{i}"
      eng.add_request(rid, prompt, SamplingParams(max_tokens=5 + 3 * i, **kw))
      rids.append(rid)
    for _ in range(4):
      eng.step()
    eng.abort(f"{r}-2")
    eng.run_until_done()
    for rid in rids:
      o = eng.pop_output(rid)
      out[rid] = ([(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in o.outputs], o.num_cached_tokens,
                  o.prompt_logprobs)
  eng.pool.check()
  assert eng.pool.num_free == eng.pool.num_pages and not eng.has_work()
  return out


@pytest.mark.parametrize("num_pages,host_gb", [(64, 0.0), (12, 0.0), (12, 0.01)],
                         ids=["roomy", "preempting", "host-tier"])
def test_the_outputs_are_those_of_the_engine_without_the_thread(model, num_pages, host_gb):
  ref_eng = _engine(model, False, num_pages, host_gb, preempting=num_pages == 12)
  ref = _workload(ref_eng)
  eng = _engine(model, True, num_pages, host_gb, preempting=num_pages == 12)
  got = _workload(eng)
  assert got == ref
  assert eng.stats.steps == ref_eng.stats.steps
  assert eng.scheduler.num_preemptions == ref_eng.scheduler.num_preemptions
  assert any(cached for _, cached, _ in got.values())   # (the second round hit the prefix cache)
  if num_pages == 12:
    assert eng.scheduler.num_preemptions > 0
  if host_gb:
    assert eng.pool.host.loaded > 0
  eng.shutdown()
  assert eng._dispatcher is None


def _slow_dispatch(eng, seconds):
  """executor.run made `seconds` slower (after its own work, GIL released, as XLA's launches are); returns the
  list of the times each call ended."""
  run, ends = eng.executor.run, []

  def slow(*args, **kw):
    out = run(*args, **kw)
    time.sleep(seconds)
    ends.append(time.monotonic())
    return out
  eng.executor.run = slow
  return ends


@pytest.mark.parametrize("overlap", [True, False])
def test_a_steps_tokens_reach_the_client_before_the_next_dispatch_ends(model, overlap):
  """Each dispatch takes 0.4 s more. With the thread, the token sampled in dispatch k is delivered as soon as that
  step is read, while dispatch k+1 goes on; without it, only after dispatch k+1 has returned (what the thread
  removes)."""
  eng = _engine(model, overlap)
  ends = _slow_dispatch(eng, 0.4)
  arrivals = []
  eng.add_request("a", [5, 6, 7, 8], SamplingParams(max_tokens=4, ignore_eos=True),
                  on_delta=lambda d: arrivals.append(time.monotonic()) if d.token_ids else None)
  eng.run_until_done()
  assert len(arrivals) == 4 and len(ends) == 4
  lateness = [a - e for a, e in zip(arrivals, ends)]   # token k was sampled by dispatch k
  if overlap:
    assert max(lateness) < 0.2, lateness
  else:
    assert min(lateness[:-1]) >= 0.35, lateness   # (the last token has no dispatch after it)
  eng.shutdown()


def test_a_failed_dispatch_fails_the_requests_in_flight_and_runs_nothing_after_it(model):
  eng = _engine(model, True)
  for i in range(3):   # cached pages to be forgotten
    eng.add_request(f"warm{i}", [3 + i] * 40, SamplingParams(max_tokens=2))
  eng.run_until_done()
  assert eng.pool.num_cached > 0
  run, calls = eng.executor.run, {"n": 0}

  def flaky(*args, **kw):
    calls["n"] += 1
    if calls["n"] == 3:   # slow: the next step is submitted behind it before it fails
      time.sleep(0.3)
      raise RuntimeError("injected dispatch failure")
    return run(*args, **kw)
  eng.executor.run = flaky
  for i in range(2):
    eng.add_request(f"r{i}", [9, 8, 7, 6 + i], SamplingParams(max_tokens=10, ignore_eos=True))
  errors = []
  while eng.has_work():
    err = multihost.step_and_collect(eng)
    if err is not None:
      errors.append(err)
  assert [str(e) for e in errors] == ["injected dispatch failure"]
  assert calls["n"] == 3   # the step submitted behind the failed one was skipped, not run
  assert eng.pool.num_cached == 0 and eng.pool.num_free == eng.pool.num_pages
  eng.pool.check()
  assert eng.usable() and not eng.requests   # (step_and_collect dropped the failed requests' outputs)

  eng.executor.run = run   # the engine goes on, with the tokens of an engine that never failed
  ref = _engine(model, False)
  for e in (eng, ref):
    e.add_request("after", [9, 8, 7, 6], SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0))
    e.run_until_done()
  assert eng.pop_output("after").outputs[0].token_ids == ref.pop_output("after").outputs[0].token_ids
  eng.shutdown()


def test_the_dispatcher_runs_in_order_skips_after_a_failure_until_drained():
  import sys
  before = sys.getswitchinterval()
  d = dispatch_thread.Dispatcher()
  assert sys.getswitchinterval() <= dispatch_thread.SWITCH_INTERVAL_S
  seen, gate = [], threading.Event()

  def job(i, fail=False):
    def run():
      gate.wait(5)
      seen.append(i)
      if fail:
        raise ValueError(f"job {i}")
      return i
    return run
  ps = [d.submit(job(0)), d.submit(job(1, fail=True)), d.submit(job(2))]
  assert not ps[0].done()
  gate.set()
  assert ps[0].result() == 0
  with pytest.raises(ValueError, match="job 1"):
    ps[1].result()
  with pytest.raises(dispatch_thread.SkippedAfterFailure):
    ps[2].result()
  assert seen == [0, 1] and d.failed
  d.drain()
  assert not d.failed and d.submit(job(3)).result() == 3
  d.close()
  with pytest.raises(RuntimeError, match="closed"):
    d.submit(job(4))
  if dispatch_thread._open == 0:   # (no other dispatcher open in this process: the interval is given back)
    assert sys.getswitchinterval() == before


def test_completed_calls_at_once_and_raises_at_once():
  assert dispatch_thread.completed(lambda: 7).result() == 7
  with pytest.raises(ZeroDivisionError):
    dispatch_thread.completed(lambda: 1 / 0)


def test_a_failure_not_yet_raised_survives_a_look_at_the_device_state(model):
  """usable() waits for the steps in flight but leaves their failure to be raised by the next step (the
  step behind the failed one must not run on what it left)."""
  eng = _engine(model, True)
  run, calls = eng.executor.run, {"n": 0}

  def flaky(*args, **kw):
    calls["n"] += 1
    if calls["n"] == 2:
      raise RuntimeError("injected")
    return run(*args, **kw)
  eng.executor.run = flaky
  eng.add_request("a", [5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True))
  eng.step()
  eng.step()   # submits the failing dispatch
  eng._dispatcher.wait_idle()
  assert eng.usable()
  with pytest.raises(RuntimeError, match="injected"):
    eng.step()
  eng._dispatcher.wait_idle()
  assert calls["n"] == 2   # nothing was run after the failure
  eng.abort_all("error")
  eng.executor.run = run
  eng.shutdown()
