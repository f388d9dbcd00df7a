"""Page-pool and batching invariants of the scheduler under random workloads (hypothesis), with the
device simulated one step late as the engine drives it."""
from hypothesis import given, settings, strategies as st

from nanoflow_jax.kv_cache import PagePool
from nanoflow_jax.sampling_params import SamplingParams
from nanoflow_jax.scheduler import Scheduler
from nanoflow_jax.sequence import Sequence

MAX_LEN = 64

request = st.tuples(st.integers(0, 30),                  # arrival step
                    st.integers(1, 40),                  # prompt length
                    st.one_of(st.none(), st.integers(1, 30)),  # max_tokens
                    st.one_of(st.none(), st.integers(1, 60)))  # abort at step


def _check(sched: Scheduler, pool: PagePool, batch, max_num_seqs, dense_batch):
  owned = [p for s in list(sched.running) + list(sched.waiting) for p in s.pages]
  assert len(owned) == len(set(owned)), "a page owned twice"
  assert len(owned) + pool.num_free == pool.num_pages
  assert all(not s.pages for s in sched.waiting), "a waiting sequence holds pages"
  assert len(sched.running) <= max_num_seqs
  for s in sched.running:
    assert len(s.pages) * pool.page_size >= s.num_computed
  slots = [s.slot for s in sched.running]
  assert len(slots) == len(set(slots)) and None not in slots
  if batch is not None:
    assert batch.num_tokens <= dense_batch
    partial = [c for c in batch.chunks if not c.sample]
    assert len(partial) <= 1, "more than one partial prompt in a step"
    seqs = [c.seq for c in batch.chunks]
    assert len(seqs) == len(set(seqs))


@settings(max_examples=60, deadline=None)
@given(reqs=st.lists(request, min_size=1, max_size=12), num_pages=st.integers(16, 60),
       page_size=st.sampled_from([1, 4, 16]), dense_batch=st.integers(8, 96), max_num_seqs=st.integers(1, 6))
def test_pool_invariants_under_random_workloads(reqs, num_pages, page_size, dense_batch, max_num_seqs):
  num_pages = max(num_pages, -(-MAX_LEN // page_size))  # a request must always fit alone
  pool = PagePool(num_pages, page_size)
  sched = Scheduler(pool, dense_batch, max_num_seqs, MAX_LEN, default_expected_output=4)
  seqs = []
  pending = []
  step = 0
  while step < 2000:
    for i, (at, plen, max_tokens, _) in enumerate(reqs):
      if at == step:
        seq = Sequence(i, f"r{i}", 0, list(range(plen)), SamplingParams(max_tokens=max_tokens), seed=0)
        seqs.append(seq)
        sched.add(seq)
    for seq in seqs:
      abort_at = reqs[seq.seq_id][3]
      if abort_at == step:
        sched.finish(seq, "abort")
    batch = sched.schedule()
    _check(sched, pool, batch, max_num_seqs, dense_batch)
    for seq in pending:  # the previous step's tokens arrive now
      if seq.finished:
        continue
      seq.inflight -= 1
      seq.output_ids.append(7)
      mt = seq.params.max_tokens
      if (mt is not None and len(seq.output_ids) >= mt) or seq.num_tokens >= MAX_LEN:
        sched.finish(seq, "length")
    pending = [c.seq for c in batch.chunks if c.sample] if batch else []
    _check(sched, pool, None, max_num_seqs, dense_batch)
    step += 1
    if not sched.has_work() and not pending and step > 31:
      break
  assert not sched.has_work(), "the workload did not drain"
  assert pool.num_free == pool.num_pages
  for seq in seqs:
    assert seq.finished
    mt = seq.params.max_tokens
    if seq.finish_reason == "length" and mt is not None and len(seq.prompt_ids) + mt <= MAX_LEN:
      assert len(seq.output_ids) == mt


def test_admission_by_projected_peak_admits_more_and_never_preempts_known_lengths():
  """Requests of 64 prompt + 32 output tokens (24 pages of 4 at their peak) arriving two a step into 240
  pages: summing individual peaks would cap the batch at 10 sequences. Since they finish at different
  steps, the projected peak lets more run at once, and with known lengths none is ever preempted."""
  pool = PagePool(240, 4)
  sched = Scheduler(pool, dense_batch=256, max_num_seqs=64, max_model_len=256)
  seqs, pending, most = [], [], 0
  for step in range(3000):
    if step < 60:
      for j in range(2):
        seq = Sequence(len(seqs), f"r{len(seqs)}", 0, list(range(64)), SamplingParams(max_tokens=32), seed=0)
        seqs.append(seq)
        sched.add(seq)
    batch = sched.schedule()
    _check(sched, pool, batch, 64, 256)
    assert pool.num_used == sum(len(s.pages) for s in sched.running)   # every page in use is a running one's
    most = max(most, len(sched.running))
    for seq in pending:
      if seq.finished:
        continue
      seq.inflight -= 1
      seq.output_ids.append(7)
      if len(seq.output_ids) >= 32:
        sched.finish(seq, "length")
    pending = [c.seq for c in batch.chunks if c.sample] if batch else []
    if not sched.has_work() and not pending:
      break
  assert all(s.finished and len(s.output_ids) == 32 for s in seqs)
  assert sched.num_preemptions == 0
  assert most >= 12, most   # 12 in this simulation; summing individual peaks would allow 10


def test_admission_checks_the_projection_of_running_plus_candidate():
  """Admission keeps the running sequences' projection across one schedule() and appends each admitted
  sequence's (instead of rebuilding it per candidate, O(running) each): every check it makes must equal
  the projection projected_peak_pages builds from scratch for the running sequences and the candidate,
  here through preemptions (unknown output lengths) and admissions of several sequences a step."""
  from unittest import mock
  from nanoflow_jax import scheduler as scheduler_module
  import numpy as np
  real = scheduler_module._peak_pages
  pool = PagePool(60, 4)
  sched = Scheduler(pool, dense_batch=48, max_num_seqs=12, max_model_len=64, default_expected_output=3)
  checks = []

  def spy(cur, peak, held, page_size):
    cand = sched.waiting[0]
    expect = sched._projection(sched.running + [cand])
    for a, b in zip((cur, peak, held), expect):
      np.testing.assert_array_equal(a, b)
    checks.append(len(sched.running))
    return real(cur, peak, held, page_size)

  rng = np.random.default_rng(3)
  seqs, pending = [], []
  with mock.patch.object(scheduler_module, "_peak_pages", spy):
    for step in range(3000):
      if step < 40:
        for _ in range(int(rng.integers(0, 4))):
          mt = None if rng.random() < 0.4 else int(rng.integers(1, 20))
          seq = Sequence(len(seqs), f"r{len(seqs)}", 0, list(range(int(rng.integers(1, 30)))),
                         SamplingParams(max_tokens=mt), seed=0)
          seqs.append(seq)
          sched.add(seq)
      batch = sched.schedule()
      for seq in pending:
        if seq.finished:
          continue
        seq.inflight -= 1
        seq.output_ids.append(7)
        if (seq.params.max_tokens and len(seq.output_ids) >= seq.params.max_tokens) or seq.num_tokens >= 64:
          sched.finish(seq, "length")
      pending = [c.seq for c in batch.chunks if c.sample] if batch else []
      if step >= 40 and not sched.has_work() and not pending:
        break
  assert all(s.finished for s in seqs)
  assert len(checks) > 20 and max(checks) >= 3, checks   # admissions beside several running sequences
  assert sched.num_preemptions > 0
