"""nanoflow_jax/gc_policy.py: while an engine loop has work, Python's full collections are held off (they
stalled GPU steps for 0.4-0.6 s with thousands of requests in flight); young collections go on at the loop's
pace, and the collector is given back as it was when the last busy loop goes idle."""
import asyncio
import gc

import pytest

from nanoflow_jax import gc_policy
from nanoflow_jax.sampling_params import SamplingParams


@pytest.fixture
def collections():
  """The generations collected while the test runs, with thresholds so low that, left automatic, the collector
  would run full collections all the time."""
  seen = []
  cb = lambda phase, info: seen.append(info["generation"]) if phase == "start" else None
  thresholds, enabled = gc.get_threshold(), gc.isenabled()
  gc.set_threshold(5, 1, 1)
  gc.callbacks.append(cb)
  try:
    yield seen
  finally:
    gc.callbacks.remove(cb)
    gc.set_threshold(*thresholds)
    (gc.enable if enabled else gc.disable)()


def _garbage(n=2000):
  for _ in range(n):
    a = []
    a.append(a)    # a cycle: only the collector frees it


def test_busy_holds_off_automatic_collection_and_collects_young_ones_itself(collections):
  c = gc_policy.BusyCollector(young_every=4, full_every=10)
  c.busy()
  collections.clear()
  for _ in range(11):
    _garbage(200)
    c.busy()
  assert not gc.isenabled()
  assert collections == [1, 1, 2, 1]        # steps 4 and 8 young, 10 full, 12 young; nothing automatic
  c.idle()
  assert gc.isenabled()
  _garbage()
  assert collections.count(0) > 10          # automatic again


def test_the_collector_comes_back_only_when_the_last_busy_loop_is_idle(collections):
  a, b = gc_policy.BusyCollector(), gc_policy.BusyCollector()
  a.busy()
  b.busy()
  a.idle()
  assert not gc.isenabled()
  b.idle()
  b.idle()                                  # idle twice: no effect
  assert gc.isenabled()


def test_a_collector_disabled_by_the_caller_stays_disabled(collections):
  gc.disable()
  c = gc_policy.BusyCollector()
  c.busy()
  c.idle()
  assert not gc.isenabled()


def test_run_until_done_makes_no_automatic_full_collection(collections):
  """Without the policy these thresholds collect every generation dozens of times in this run."""
  from nanoflow_jax.llm import build_engine
  engine = build_engine("tiny", random_weights=True, dense_batch=64, num_pages=128, max_num_seqs=8)
  for i in range(8):
    engine.add_request(f"r{i}", [1, 2, 3, i], SamplingParams(max_tokens=12, ignore_eos=True))
  collections.clear()
  engine.run_until_done()
  assert 0 not in collections and 2 not in collections and gc.isenabled()   # automatic: gen 0 dozens of times
  assert [len(engine.pop_output(f"r{i}").outputs[0].token_ids) for i in range(8)] == [12] * 8


def test_a_failed_loop_gives_the_collector_back(collections):
  from nanoflow_jax.llm import build_engine
  engine = build_engine("tiny", random_weights=True, dense_batch=64, num_pages=128, max_num_seqs=8)
  engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=12, ignore_eos=True))

  def fail():
    raise RuntimeError("injected")
  with pytest.raises(RuntimeError, match="injected"):
    engine.run_until_done(progress=fail)
  assert gc.isenabled()
  engine.abort_all()


def test_the_server_thread_holds_the_collector_off_only_while_busy(collections):
  from nanoflow_jax.async_engine import AsyncEngine
  from nanoflow_jax.llm import build_engine
  engine = build_engine("tiny", random_weights=True, dense_batch=64, num_pages=128, max_num_seqs=8)
  ae = AsyncEngine(engine)
  during = []
  ae.on_step = lambda seconds: during.append(gc.isenabled())   # after each step, in the engine thread
  ae.start()
  try:
    async def one(rid):
      async for d in ae.generate(rid, [1, 2, 3], SamplingParams(max_tokens=40, ignore_eos=True)):
        last = d
      return last.num_output_tokens
    assert asyncio.run(one("a")) == 40
    asyncio.run(ae.drain(timeout=10))
  finally:
    ae.shutdown()
  assert len(during) >= 40 and not any(during)
  assert gc.isenabled()


def test_freeze_startup_heap_collects_startup_garbage_then_full_collections_skip_the_rest():
  """A started process's full collections walk only what it made since (the server's took ~250 ms each on the GPU
  machine, walking start-up's objects)."""
  import weakref

  class Node:
    pass
  dead = Node()
  dead.self = dead            # start-up garbage: a cycle already unreachable
  dead_ref = weakref.ref(dead)
  del dead
  alive = Node()
  alive.self = alive          # alive at start-up, unreachable later
  alive_ref = weakref.ref(alive)
  try:
    frozen = gc_policy.freeze_startup_heap()
    assert dead_ref() is None                       # collected before the freeze, not kept
    # the test process's modules and objects; a frozen object may still be freed by its count (a thread left by
    # an earlier test in this worker dropped two once), so the count after may be a little lower
    assert frozen >= gc.get_freeze_count() > max(1000, frozen - 100)
    del alive
    gc.collect()
    assert alive_ref() is not None                  # frozen: a full collection does not walk it
  finally:
    gc.unfreeze()
  gc.collect()
  assert alive_ref() is None
