"""Automatic prefix caching (issue 28): full KV pages found again by their prefix's hash.

- The pool and the scheduler under random workloads with shared prefixes, aborts and preemption (hypothesis):
  reference counts never negative, no page both free and held, every cached page a reader reuses holds the
  KV of exactly the tokens it stands for (a simulated device writes each page's contents), everything free
  when idle.
- Outputs with cache hits are the outputs without (greedy and seeded), also after eviction, with n > 1,
  preemption, nanoflow mode and an fp8 KV cache; what is reported (num_cached_tokens, usage, metrics).
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nanoflow_jax.engine import Engine, EngineConfig
from nanoflow_jax.kv_cache import PagePool
from nanoflow_jax.model import load_model
from nanoflow_jax.sampling_params import SamplingParams
from nanoflow_jax.scheduler import Scheduler
from nanoflow_jax.sequence import Sequence

MAX_LEN = 64

# (arrival step, which shared prefix, its length, own tokens, max_tokens, abort at step)
request = st.tuples(st.integers(0, 20), st.integers(0, 2), st.integers(0, 40), st.integers(1, 12),
                    st.one_of(st.none(), st.integers(1, 20)), st.one_of(st.none(), st.integers(1, 50)))


class FakeHost:
  """The host tier as the scheduler sees it (lookup); the test moves the simulated pages' contents itself."""

  def __init__(self):
    self.store: dict = {}

  def lookup(self, keys):
    run = []
    for key in keys:
      if key[0] not in self.store or self.store[key[0]][0] != key:
        break
      run.append(key)
    return run

  def __len__(self):
    return len(self.store)


@settings(max_examples=60, deadline=None)
@given(reqs=st.lists(request, min_size=1, max_size=14), num_pages=st.integers(12, 50),
       page_size=st.sampled_from([1, 4, 8]), dense_batch=st.integers(8, 64), max_num_seqs=st.integers(1, 6),
       n=st.integers(1, 2), host=st.booleans())
def test_the_cache_never_hands_out_wrong_or_lost_pages(reqs, num_pages, page_size, dense_batch, max_num_seqs, n,
                                                        host):
  num_pages = max(num_pages, -(-MAX_LEN // page_size) + 1)
  pool = PagePool(num_pages, page_size, caching=True)
  if host:   # evicted pages go to a host tier and come back from it (their contents moved by the test)
    pool.host = FakeHost()
  sched = Scheduler(pool, dense_batch, max_num_seqs, MAX_LEN, default_expected_output=4)
  prefixes = [list(range(100 * k + 1, 100 * k + 41)) for k in range(3)]
  written: dict[int, dict[int, tuple]] = {}   # page -> offset -> (sequence, position) whose KV is there
  seqs, pending = [], []
  for step in range(3000):
    for i, (at, k, plen, own, max_tokens, _) in enumerate(reqs):
      if at == step:
        prompt = prefixes[k][:plen] + [1000 + i] * own
        for j in range(n):
          seq = Sequence(i * n + j, f"r{i}", j, prompt, SamplingParams(max_tokens=max_tokens, n=n), seed=0)
          seqs.append(seq)
          sched.add(seq)
    for seq in seqs:
      if reqs[seq.seq_id // n][5] == step:
        sched.finish(seq, "abort")
    batch = sched.schedule()
    if host:   # what the engine does before the step: evicted pages saved, uploads written
      for page, key in pool.evicted:
        pool.host.store[key[0]] = (key, dict(written.get(page, {})))
      for page, key in pool.uploads:
        written[page] = dict(pool.host.store[key[0]][1])
      pool.evicted, pool.uploads = [], []
    pool.check()
    held = [p for s in sched.running for p in s.pages]
    assert len(held) == len(set(held)) + pool.extra_holds
    assert all(not s.pages for s in sched.waiting)
    for c in batch.chunks if batch else []:
      s = c.seq
      for pos in range(c.start):          # the KV the chunk's attention reads: its own or cached pages
        src = written.get(s.pages[pos // page_size], {}).get(pos % page_size)
        assert src is not None, "a page read was never written"
        other, opos = src
        assert opos == pos and other.token_at(opos) == s.token_at(pos), "a cached page holds other tokens"
      for pos in range(c.start, c.start + c.length):
        written.setdefault(s.pages[pos // page_size], {})[pos % page_size] = (s, pos)
    for seq in pending:   # the previous step's tokens arrive now
      if seq.finished:
        continue
      seq.inflight -= 1
      seq.output_ids.append(7 + len(seq.output_ids) % 3)
      mt = seq.params.max_tokens
      if (mt is not None and len(seq.output_ids) >= mt) or seq.num_tokens >= MAX_LEN:
        sched.finish(seq, "length")
    pending = [c.seq for c in batch.chunks if c.sample] if batch else []
    pool.check()
    if not sched.has_work() and not pending and step > 21:
      break
  assert not sched.has_work(), "the workload did not drain"
  assert pool.num_free == pool.num_pages and pool.extra_holds == 0
  assert all(s.finished for s in seqs)


def test_pool_eviction_is_lru_and_cached_pages_count_as_free():
  pool = PagePool(4, 2, caching=True)
  a = pool.allocate(2)
  pool.register(a[0], (11, 0, (1, 2)))
  pool.register(a[1], (12, 11, (3, 4)))
  pool.free(a)
  assert pool.num_free == 4 and pool.num_cached == 2
  assert pool.acquire_cached([(11, 0, (1, 2)), (12, 11, (3, 4))]) == a
  assert pool.acquire_cached([(11, 0, (1, 2))]) == a[:1] and pool.extra_holds == 1
  assert pool.acquire_cached([(11, 0, (9, 9))]) == []          # same hash, other tokens: a miss
  pool.free(a)
  pool.free(a[:1])
  pool.check()
  pool.allocate(2)                                               # the free pages first
  assert pool.num_cached == 2 and pool.evictions == 0
  pool.allocate(1)                                               # then the least recently used cached page
  assert pool.evictions == 1 and pool.acquire_cached([(11, 0, (1, 2))]) == [a[0]]
  pool.check()


@pytest.fixture(scope="module")
def model():
  return load_model("tiny", dtype="float32", random_weights=True)


def _run(model, caching, rounds, num_pages=64, n=1, mode="sequential", kv="auto", temperature=0.0, dense=32,
         abort=None, page_size=16):
  """Two rounds of prompts sharing a 70-token prefix (the second round: each first-round prompt again)."""
  eng = Engine(model, EngineConfig(dense_batch=dense, num_pages=num_pages, max_num_seqs=4, mode=mode,
                                   kv_cache_dtype=kv, compilation_cache_dir=None, enable_prefix_caching=caching,
                                   page_size=page_size))
  rng = np.random.default_rng(0)
  shared = [int(t) for t in rng.integers(1, 250, 70)]
  prompts = [shared + [int(t) for t in rng.integers(1, 250, k)] for k in (5, 17, 40, 3)]
  out = []
  for r in range(rounds):
    for i, p in enumerate(prompts):
      eng.add_request(f"{r}-{i}", p, SamplingParams(max_tokens=6, n=n, temperature=temperature, seed=i,
                                                    ignore_eos=True))
    if abort is not None:
      eng.step()
      eng.abort(f"{r}-{abort}")
    eng.run_until_done()
    for i in range(len(prompts)):
      o = eng.pop_output(f"{r}-{i}")
      out.append(([c.token_ids for c in o.outputs], o.num_cached_tokens))
  eng.pool.check()
  assert eng.pool.num_free == eng.pool.num_pages   # everything free (or cached, evictable) when idle
  return out, eng


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_outputs_with_cache_hits_are_the_outputs_without(model, temperature):
  ref, _ = _run(model, False, 2, temperature=temperature)
  got, eng = _run(model, True, 2, temperature=temperature)
  assert [t for t, _ in got] == [t for t, _ in ref]
  assert all(c == 0 for _, c in ref)
  cached = [c for _, c in got]
  assert cached[0] == 0 and all(c >= 64 for c in cached[4:])   # the second round hits its own full pages
  assert eng.pool.hit_tokens == sum(cached) and eng.pool.queried_tokens == 2 * (75 + 87 + 110 + 73)


def test_hits_after_eviction_give_the_same_tokens(model):
  ref, _ = _run(model, False, 2, num_pages=10)
  got, eng = _run(model, True, 2, num_pages=10)   # 10 pages of 16: prompts evict each other's cached pages
  assert [t for t, _ in got] == [t for t, _ in ref]
  assert eng.pool.evictions > 0


def test_n_samples_share_the_prompt_and_aborts_keep_the_cache_sound(model):
  ref, _ = _run(model, False, 2, n=2, temperature=0.9, abort=1)
  got, eng = _run(model, True, 2, n=2, temperature=0.9, abort=1)
  assert [t for t, _ in got] == [t for t, _ in ref]
  assert got[0][1] == 0 and eng.pool.hit_tokens > 0


@pytest.mark.parametrize("mode,kv", [("nanoflow", "auto"), ("sequential", "fp8")])
def test_cache_hits_in_nanoflow_mode_and_with_an_fp8_cache(model, tmp_path, mode, kv):
  if mode == "nanoflow":   # the tiny CPU config splits the step in two nano-batches
    ref, _ = _run(model, False, 2, mode=mode, dense=64)
    got, _ = _run(model, True, 2, mode=mode, dense=64)
  else:
    ref, _ = _run(model, False, 2, kv=kv)
    got, _ = _run(model, True, 2, kv=kv)
  assert [t for t, _ in got] == [t for t, _ in ref]
  assert any(c for _, c in got)


def test_pages_of_64_tokens_with_an_fp8_cache(model):
  """Larger pages (the fp8 cache's candidate, session 22): the same tokens as 16-token pages without caching, and
  hits in whole 64-token pages (the shared 70-token prefix gives one)."""
  ref, _ = _run(model, False, 2, kv="fp8")
  got, eng = _run(model, True, 2, kv="fp8", page_size=64, num_pages=16)
  assert [t for t, _ in got] == [t for t, _ in ref]
  cached = [c for _, c in got]
  assert cached[1:4] == [64, 64, 64] and all(c % 64 == 0 and c >= 64 for c in cached[4:])


def test_the_last_prompt_token_is_computed_and_penalties_compute_every_token(model):
  eng = Engine(model, EngineConfig(dense_batch=32, num_pages=32, max_num_seqs=2, compilation_cache_dir=None))
  prompt = list(range(1, 65))   # exactly 4 pages of 16
  for rid, sp in (("a", SamplingParams(max_tokens=2, temperature=0)), ("b", SamplingParams(max_tokens=2, temperature=0)),
                  ("c", SamplingParams(max_tokens=2, temperature=0, repetition_penalty=1.3))):
    eng.add_request(rid, prompt, sp)
    eng.run_until_done()
  a, b, c = (eng.pop_output(r) for r in "abc")
  assert a.num_cached_tokens == 0 and b.num_cached_tokens == 48 and c.num_cached_tokens == 0
  assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_reset_prefix_cache_forgets_the_gpu_and_host_pages(model):
  """Three 70-token prompts on 10 GPU pages: the third evicts the first's pages to the host tier. After
  Engine.reset_prefix_cache the first computes everything again (no GPU or host hit), with the same tokens."""
  eng = _three_prompt_engine(model, True, 0.01, "thread")
  rng = np.random.default_rng(3)
  prompts = [[int(t) for t in rng.integers(1, 250, 70)] for _ in range(3)]
  out = []
  for rid, i in (("a", 0), ("b", 1), ("c", 2), ("d", 0)):
    if rid == "d":
      assert eng.pool.num_cached > 0 and len(eng.pool.host) > 0
      eng.reset_prefix_cache()
      assert eng.pool.num_cached == 0 and len(eng.pool.host) == 0
    eng.add_request(rid, prompts[i], SamplingParams(max_tokens=3, temperature=0))
    eng.run_until_done()
    out.append(eng.pop_output(rid))
  eng.pool.check()
  assert out[3].num_cached_tokens == 0 and eng.pool.host_hit_tokens == 0
  assert out[0].outputs[0].token_ids == out[3].outputs[0].token_ids


def test_prefix_caching_can_be_turned_off(model):
  got, eng = _run(model, False, 2)
  assert eng.pool.num_cached == 0 and eng.pool.hit_tokens == 0


def _three_prompt_engine(model, caching, host_gb, copy="put"):
  return Engine(model, EngineConfig(dense_batch=32, num_pages=10, max_num_seqs=1, compilation_cache_dir=None,
                                    enable_prefix_caching=caching, host_kv_cache_gb=host_gb, host_kv_copy=copy))


@pytest.mark.parametrize("copy", ["put", "thread", "jit"])
def test_the_host_tier_gives_back_evicted_prefixes_bit_exact(model, copy):
  """10 GPU pages, three 70-token prompts taking turns: each evicts the others' cached pages, which go to the host
  tier; when a prompt comes again its pages come back from the host, byte for byte, and its tokens are those of a
  run without any cache (seeded sampling)."""
  rng = np.random.default_rng(1)
  prompts = [[int(t) for t in rng.integers(1, 250, 70)] for _ in range(3)]
  order = [0, 1, 2, 0, 1, 2]

  def run(eng, snapshot=None):
    out = []
    for j, i in enumerate(order):
      eng.add_request(f"r{j}", prompts[i], SamplingParams(max_tokens=4, temperature=0.9, seed=j, ignore_eos=True))
      eng.run_until_done()
      o = eng.pop_output(f"r{j}")
      out.append((o.outputs[0].token_ids, o.num_cached_tokens))
      if snapshot is not None:
        k, v = (np.asarray(a) for a in eng.executor.kv)
        for page, key in list(eng.pool._key_of.items()):   # every cached page's bytes, by its key
          snapshot.setdefault(key[0], []).append((k[:, :, page].copy(), v[:, :, page].copy(), page))
    eng.pool.check()
    return out
  ref = run(_three_prompt_engine(model, False, 0))
  seen: dict = {}
  eng = _three_prompt_engine(model, True, 0.01, copy)
  assert eng.pool.host.copy == copy
  got = run(eng, seen)
  assert [t for t, _ in got] == [t for t, _ in ref]
  assert [c for _, c in got][:3] == [0, 0, 0] and all(c > 0 for _, c in got[3:])
  assert eng.pool.host_hit_tokens == sum(c for _, c in got[3:]) and eng.pool.host.loaded > 0
  for copies in seen.values():   # a page's bytes are the same wherever (and whenever) that key was cached
    for k, v, _ in copies[1:]:
      np.testing.assert_array_equal(k, copies[0][0])
      np.testing.assert_array_equal(v, copies[0][1])
  assert any(len({page for _, _, page in c}) > 1 for c in seen.values())   # some went to the host and came back
  assert not any(b.on_device for b in eng.pool.host._blocks.values())   # idle: every block in host memory
  tier = eng.pool.host
  copier = set(tier._copier._threads) if tier._copier is not None else set()   # (ThreadPoolExecutor's own)
  assert bool(copier) == (copy == "thread")
  eng.shutdown()   # the tier lets its blocks go and its copy thread stop
  assert len(tier) == 0 and tier.held_pages == 0 and not tier.host_arrays()
  assert not any(t.is_alive() for t in copier)


@pytest.mark.parametrize("copy", ["put", "thread", "jit"])
def test_warm_up_compiles_the_host_tiers_copies_and_leaves_the_cache_alone(model, copy):
  """After Engine.warm_up nothing of the host tier compiles while serving (session 25's H200 run compiled a gather
  and a scatter per block size inside its timed run), and the tier's warm-up wrote nothing into the cache and took
  (and let go) the tier's whole size in host memory, so that serving does not wait for its pinning. 12
  pages: a cache shape no other test compiles for."""
  import jax.numpy as jnp
  from nanoflow_jax import host_kv
  rng = np.random.default_rng(5)
  k0, v0 = (rng.standard_normal((2, 2, 14, 4, 8)).astype(np.float32) for _ in range(2))
  tier = host_kv.HostKVTier(16, copy, block_pages=4)
  kv = tier.warm_up((jnp.asarray(k0), jnp.asarray(v0)))
  assert tier.pool_fill_bytes == 16 * 2 * k0[:, :, 0].nbytes and len(tier) == 0   # the tier's size, let go
  np.testing.assert_array_equal(np.asarray(kv[0]), k0)
  np.testing.assert_array_equal(np.asarray(kv[1]), v0)
  eng = Engine(model, EngineConfig(dense_batch=32, num_pages=12, max_num_seqs=1, compilation_cache_dir=None,
                                   host_kv_cache_gb=0.01, host_kv_copy=copy))
  eng.warm_up()
  assert eng.pool.num_cached == 0 and len(eng.pool.host) == 0   # the warm-up's prompts are nobody's prefix
  fns = (host_kv._block_to_host, host_kv._scatter_from_host) if copy == "jit" else (host_kv._block_of,
                                                                                    host_kv._scatter)
  compiled = [f._cache_size() for f in fns]
  prompts = [[int(t) for t in rng.integers(1, 250, 90)] for _ in range(3)]
  for j, i in enumerate([0, 1, 2, 0, 1, 2]):
    eng.add_request(f"r{j}", prompts[i], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    eng.run_until_done()
    eng.pop_output(f"r{j}")
  assert eng.pool.host.saved > 0 and eng.pool.host.loaded > 0
  assert [f._cache_size() for f in fns] == compiled


def test_the_host_tier_under_tensor_parallelism():
  """TP 2 on CPU devices (tests/host_tier_tp_worker.py): pages sharded over the devices' KV heads go to host memory
  with the same sharding and come back; greedy tokens equal the same TP engine's without any cache."""
  import json
  import os
  import subprocess
  import sys
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "host_tier_tp_worker.py")
  r = subprocess.run([sys.executable, worker], capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  ref = out["ref"]
  for copy in ("thread", "put", "jit"):   # the jit copy mode moves the sharded block inside the gather's executable
    host = out[f"host-{copy}"]
    assert host["kv_devices"] == 2 and host["tokens"] == ref["tokens"]
    assert host["cached"][:3] == [0, 0, 0] and all(c > 0 for c in host["cached"][3:])
    assert host["host_loaded"] > 0 and host["host_hit_tokens"] > 0
    assert host["host_page_devices"] == [2] and set(host["host_kinds"]) <= {"pinned_host", "unpinned_host"}


def test_the_host_tier_needs_prefix_caching(model):
  with pytest.raises(ValueError, match="enable_prefix_caching"):
    _three_prompt_engine(model, False, 1.0)


def test_host_tier_refuses_an_unknown_copy_mode():
  from nanoflow_jax import host_kv
  with pytest.raises(ValueError, match="'dma'.*put, thread, jit"):
    host_kv.HostKVTier(8, copy="dma")
  with pytest.raises(ValueError, match="host_kv_copy.*'dma'"):   # before any model loads
    EngineConfig(host_kv_copy="dma").validate()
  with pytest.raises(ValueError, match="host_kv_cache_gb=1e\\+06 is more than 80% of this machine's"):
    EngineConfig(host_kv_cache_gb=1e6).validate()
  with pytest.raises(ValueError, match="host_kv_cache_gb must be >= 0"):
    EngineConfig(host_kv_cache_gb=-1).validate()


@pytest.mark.parametrize("copy", ["put", "thread", "jit"])
def test_host_tier_pages_round_trip_through_host_memory(copy):
  """Three pages saved (one block, padded to four inside), kept in a JAX host memory kind, the cache then cleared,
  and the pages written back elsewhere: byte for byte, the other pages untouched; the same with each copy mode
  (device_put inline, on a thread of its own, inside the gather's and scatter's executables)."""
  import jax
  import jax.numpy as jnp
  from nanoflow_jax import host_kv
  rng = np.random.default_rng(3)
  shape = (2, 2, 10, 16, 8)   # layers, KV heads, pages, page size, head dim
  k0, v0 = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
  tier = host_kv.HostKVTier(capacity_pages=16, copy=copy)
  keys = [(h, 0, (h,)) for h in (11, 12, 13)]
  tier.save((jnp.asarray(k0), jnp.asarray(v0)), [3, 5, 7], keys)
  assert len(tier.host_arrays()) == 1 and tier.held_pages == 4
  assert {a.sharding.memory_kind for a in tier.host_arrays()} <= {"pinned_host", "unpinned_host"}
  tier.land()
  if copy == "jit":   # the copy was inside the gather's executable: nothing of the block stays on the device
    assert tier.host_arrays()[0].sharding.memory_kind == "pinned_host"
  kv = (jnp.zeros(shape), jnp.zeros(shape))
  assert tier.lookup(keys) == keys
  k1, v1 = tier.load(kv, [0, 1, 2], keys)
  np.testing.assert_array_equal(np.asarray(k1)[:, :, :3], k0[:, :, [3, 5, 7]])
  np.testing.assert_array_equal(np.asarray(v1)[:, :, :3], v0[:, :, [3, 5, 7]])
  assert not np.asarray(k1)[:, :, 3:].any() and not np.asarray(v1)[:, :, 3:].any()
  assert jax.tree.leaves(k1)[0].dtype == jnp.float32 and tier.loaded == 3


@pytest.mark.parametrize("copy", ["put", "thread"])
def test_saved_blocks_go_to_host_memory_one_step_later(copy):
  """A put to host memory returns when its copy is done, so a block is put there only once the step dispatched
  after its gather has been read (the engine calls settle() after each read): put at save, it would wait for the
  step in flight. Blocks not yet settled are loaded from the device, and settle(everything=True) (nothing in
  flight) puts them all."""
  import jax.numpy as jnp
  from nanoflow_jax import host_kv
  shape = (2, 2, 8, 4, 8)
  kv = (jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape), jnp.ones(shape))
  tier = host_kv.HostKVTier(capacity_pages=32, copy=copy)
  key = lambda h: (h, 0, (h,))
  device_kind = next(iter(kv[0].devices())).default_memory().kind
  kinds = lambda: [b._array.sharding.memory_kind if b.on_device else "host" for b in tier._blocks.values()]
  tier.save(kv, [0, 1], [key(0), key(1)])       # before step 1
  tier.settle()                                  # step 0's results read: nothing gathered before step 0
  assert kinds() == [device_kind]
  tier.save(kv, [2], [key(2)])                   # before step 2
  tier.settle()                                  # step 1's results read: the first block's gather is done
  assert kinds() == ["host", device_kind]
  k1, _ = tier.load((jnp.zeros(shape), jnp.zeros(shape)), [5, 6], [key(2), key(0)])
  np.testing.assert_array_equal(np.asarray(k1)[:, :, [5, 6]], np.asarray(kv[0])[:, :, [2, 0]])
  assert tier.moved_back == 2                    # the first block came back; the second was read on the device
  tier.settle(everything=True)
  assert kinds() == ["host", "host"] and tier.save_seconds > 0 and tier.load_seconds > 0


@pytest.mark.parametrize("copy", ["put", "thread", "jit"])
def test_host_tier_blocks_split_load_across_blocks_and_go_by_lru(copy):
  """Pages go to the host in blocks of at most block_pages; a load takes pages from several blocks, in any order,
  each to its own GPU page; a page saved again is read from its newest block; the bound counts the blocks'
  pages and drops the least recently used block whole (a lookup renews a block)."""
  import jax.numpy as jnp
  from nanoflow_jax import host_kv
  rng = np.random.default_rng(4)
  shape = (2, 2, 24, 4, 8)
  k0, v0 = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
  kv0 = (jnp.asarray(k0), jnp.asarray(v0))
  tier = host_kv.HostKVTier(capacity_pages=12, copy=copy)
  assert tier.block_pages == 8
  key = lambda h: (h, 0, (h,))
  tier.save(kv0, list(range(10)), [key(h) for h in range(10)])   # blocks of 8 and 2 pages
  assert [a.shape[3] for a in tier.host_arrays()] == [8, 2] and tier.held_pages == 10
  tier.save(kv0, [20], [key(3)])   # key 3 again, other bytes: the newest copy counts (not settled yet: its
  want = [9, 3, 0, 7]              # block is read on the device, where it still is, in copy modes put and thread)
  k1, v1 = tier.load((jnp.zeros(shape), jnp.zeros(shape)), [23, 22, 21, 20], [key(h) for h in want])
  src = [9, 20, 0, 7]
  np.testing.assert_array_equal(np.asarray(k1)[:, :, [23, 22, 21, 20]], k0[:, :, src])
  np.testing.assert_array_equal(np.asarray(v1)[:, :, [23, 22, 21, 20]], v0[:, :, src])
  assert not np.asarray(k1)[:, :, :20].any() and tier.loaded == 4
  # whole blocks copied back: keys 8-9's, keys 0-7's, and key 3's newest in copy mode jit (its gather put it there)
  assert tier.moved_back == 2 + 8 + (copy == "jit")
  assert tier.lookup([key(0)]) == [key(0)]   # renews the first block: the 2-page one is now the oldest
  tier.save(kv0, [11], [key(50)])          # 8 + 2 + 1 + 1 = 12 pages: within the bound
  assert tier.dropped == 0 and tier.held_pages == 12
  tier.save(kv0, [12], [key(51)])          # 13: the least recently used block (pages 8, 9) goes
  assert tier.dropped == 2 and tier.held_pages == 11 and len(tier) == 10
  assert tier.lookup([key(9)]) == []
  tier.save(kv0, list(range(13, 21)), [key(h) for h in range(60, 68)])   # 8 more: key 3's block, then the 8 go
  assert [tier.lookup([key(h)]) == [] for h in (3, 0, 50, 51, 60)] == [True, True, False, False, False]
  assert tier.held_pages == 10 and tier.dropped == 2 + 1 + 7 and len(tier) == 10   # key 3 had left the 8
