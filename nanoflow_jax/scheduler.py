"""NanoFlow's batching policy: a fixed dense token budget per step, filled with every running decode
first and then prefill chunks (at most one partial prompt per step).

Admission looks ahead: a sequence enters only if the pool can hold the projected peak of all running
sequences with it. Each is expected to reach prompt + expected output (max_tokens when given, else the
running average of finished outputs) one token a step and to free its pages then; because sequences
finish at different steps, the peak of the total is lower than the sum of their individual peaks (which
is what admission summed before: it admitted ~20% fewer sequences on a constant 1024/512 workload).
When a decode still finds no free page, the most recently admitted sequence is preempted (its pages
freed; it is recomputed later) and the preemption is counted.
"""
from __future__ import annotations

import collections
import dataclasses
import logging

import numpy as np

from nanoflow_jax import prefix_cache
from nanoflow_jax.kv_cache import PagePool
from nanoflow_jax.sequence import Sequence, Status

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Chunk:
  """`length` tokens of `seq` starting at position `start`. `sample`: the chunk reaches the end of the
  known tokens, so its last position's logits are sampled."""
  seq: Sequence
  start: int
  length: int
  sample: bool
  decode: bool = False       # one already-counted output token fed back (not a prompt chunk)
  from_device: bool = False  # a decode whose input token is still on the device (sampled last step)


@dataclasses.dataclass
class Batch:
  chunks: list[Chunk]
  num_tokens: int
  reset_slots: list[int]     # slots that got a new sequence: clear their sampling state


class Scheduler:
  def __init__(self, pool: PagePool, dense_batch: int, max_num_seqs: int, max_model_len: int,
               default_expected_output: int = 256):
    self.pool = pool
    self.dense_batch = dense_batch
    self.max_num_seqs = max_num_seqs
    self.max_model_len = max_model_len
    self.waiting: collections.deque[Sequence] = collections.deque()
    self.running: list[Sequence] = []          # in admission order
    self.free_slots = list(range(max_num_seqs - 1, -1, -1))
    self.num_preemptions = 0
    self._finished_outputs = 0
    self._finished_count = 0
    self._default_expected = default_expected_output
    self.caching = pool.caching
    # Sequences with chunks in the last batch: their newly full pages are registered in the prefix cache at
    # the next schedule(), when that batch has been dispatched (a step that reads them comes after it).
    self._written: list[Sequence] = []

  # --- bookkeeping ------------------------------------------------------------------------------
  def add(self, seq: Sequence) -> None:
    self.waiting.append(seq)

  def has_work(self) -> bool:
    return bool(self.waiting or self.running)

  def expected_output(self, seq: Sequence) -> int:
    if seq.params.max_tokens is not None:
      return seq.params.max_tokens
    if self._finished_count:
      return max(1, self._finished_outputs // self._finished_count)
    return self._default_expected

  def projected_peak_pages(self, extra: Sequence | None = None) -> int:
    """The most pages the running sequences (and `extra`) will hold at once from now on, if each decodes
    one token a step up to its expected length and frees its pages when done."""
    seqs = self.running + ([extra] if extra is not None else [])
    return _peak_pages(*self._projection(seqs), self.pool.page_size)

  def _projection(self, seqs: list[Sequence]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sequence: tokens now (cur), tokens at its expected end (peak) and pages held now: what
    _peak_pages projects from."""
    cur = np.fromiter((max(s.num_tokens, s.num_computed) for s in seqs), np.int64, len(seqs))
    peak = np.fromiter((min(len(s.prompt_ids) + self.expected_output(s), self.max_model_len) for s in seqs),
                       np.int64, len(seqs))
    held = np.fromiter((len(s.pages) for s in seqs), np.int64, len(seqs))
    return cur, peak, held

  def release(self, seq: Sequence, cache: bool = True) -> None:
    """Frees the sequence's pages and slot (on finish, abort, error or preemption). Its full pages stay in
    the prefix cache, unless `cache` is False (a failed step may not have written them)."""
    if seq.pages:
      if cache:
        self._register(seq)
      else:
        self.pool.forget(seq.pages)
      self.pool.free(seq.pages)
      seq.pages = []
    if seq.slot is not None:
      self.free_slots.append(seq.slot)
      seq.slot = None
    if seq.status is Status.RUNNING:
      self.running.remove(seq)

  def finish(self, seq: Sequence, reason: str) -> None:
    if seq.finished:
      return
    if seq.status is Status.WAITING and seq in self.waiting:   # (aborted before it ran)
      self.waiting.remove(seq)
    self.release(seq, cache=reason != "error")
    seq.status, seq.finish_reason = Status.FINISHED, reason
    self._finished_outputs += len(seq.output_ids)
    self._finished_count += 1

  def _preempt(self, seq: Sequence) -> None:
    log.info("preempting %s (recompute): KV pool exhausted", seq.request_id)
    self.release(seq)
    seq.status = Status.WAITING
    seq.num_computed = 0
    seq.num_registered = 0
    seq.num_preemptions += 1
    self.num_preemptions += 1
    self.waiting.appendleft(seq)

  def _grow(self, seq: Sequence, num_tokens: int) -> bool:
    """Makes seq's pages cover `num_tokens` positions; False if the pool is short."""
    need = self.pool.pages_for(num_tokens) - len(seq.pages)
    if need <= 0:
      return True
    if need > self.pool.num_free:
      return False
    seq.pages.extend(self.pool.allocate(need))
    return True

  def wants_token(self, seq: Sequence) -> bool:
    """Whether another output token may be scheduled (max_tokens and max_model_len, pending included)."""
    produced = len(seq.output_ids) + seq.inflight
    if seq.params.max_tokens is not None and produced >= seq.params.max_tokens:
      return False
    return len(seq.prompt_ids) + produced < self.max_model_len

  # --- the prefix cache -------------------------------------------------------------------------
  def _register(self, seq: Sequence) -> None:
    """Registers seq's full pages whose KV a dispatched step writes and whose tokens are known."""
    if not self.caching:
      return
    upto = min(seq.num_computed, seq.num_tokens)
    n = min(upto // self.pool.page_size, len(seq.pages))
    if n <= seq.num_registered:
      return
    prefix_cache.extend_keys(seq.page_keys, seq.token_at, n * self.pool.page_size, self.pool.page_size)
    for j in range(seq.num_registered, n):
      self.pool.register(seq.pages[j], seq.page_keys[j])
    seq.num_registered = n

  def _reuse_cached(self, seq: Sequence) -> None:
    """A sequence about to be admitted takes the longest cached run of its full pages; its prefill starts
    after them. The last known token is always computed (its logits are sampled). Sequences with penalties
    compute every token: the device learns the prompt's and outputs' tokens for them from the tokens fed."""
    p = seq.params
    if (not self.caching or seq.num_computed or seq.pages or p.repetition_penalty != 1.0
        or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.prompt_logprobs is not None):
      return
    ps = self.pool.page_size
    usable = (seq.num_tokens - 1) // ps
    prefix_cache.extend_keys(seq.page_keys, seq.token_at, usable * ps, ps)
    seq.pages = self.pool.acquire_cached(seq.page_keys[:usable])
    host = self.pool.host
    if host is not None and len(seq.pages) < usable:   # the run goes on in host memory: copied back, not computed
      run = host.lookup(seq.page_keys[len(seq.pages):usable])[:max(self.pool.num_free - 1, 0)]
      if run:
        pages = self.pool.allocate(len(run))
        for page, key in zip(pages, run):
          self.pool.register(page, key)
          self.pool.uploads.append((page, key))
        seq.pages += pages
        seq.host_pages = pages
        seq.from_host = len(run) * ps
    seq.num_computed = len(seq.pages) * ps
    seq.num_registered = len(seq.pages)

  def _sibling_prefilling(self, seq: Sequence) -> bool:
    """Whether an earlier sample of seq's request is still computing the prompt they share: seq then waits
    for its pages (one prefill for the n samples instead of n)."""
    if not self.caching or seq.index == 0 or seq.num_cached_tokens is not None:
      return False
    full = (len(seq.prompt_ids) - 1) // self.pool.page_size
    return any(s.request_id == seq.request_id and s.num_registered < full for s in self.running)

  # --- one step ---------------------------------------------------------------------------------
  def schedule(self) -> Batch | None:
    budget = self.dense_batch
    chunks: list[Chunk] = []
    reset: list[int] = []
    for seq in self._written:
      if seq.status is Status.RUNNING:
        self._register(seq)

    # 1. Every running decode, oldest first; on a full pool, preempt the newest.
    for seq in list(self.running):
      if (seq.status is not Status.RUNNING or seq.num_uncomputed != 1 or not self.wants_token(seq)
          or budget == 0):
        continue
      if seq.matcher is not None and seq.inflight:   # its next mask needs the token still on its way
        continue
      pos = seq.num_computed
      while not self._grow(seq, pos + 1):
        victim = self.running[-1]
        self._preempt(victim)
        if victim is seq:
          break
      if seq.status is not Status.RUNNING:
        continue
      chunks.append(Chunk(seq, pos, 1, sample=True, decode=True, from_device=pos >= seq.num_tokens))
      seq.num_computed += 1
      seq.inflight += 1
      budget -= 1

    # 2. Prefill chunks: running prompts first, then admissions in FIFO order.
    for seq in self.running:
      if budget and seq.is_prefilling:
        budget -= self._prefill_chunk(seq, budget, chunks)
    # The running sequences' projection, once; each admission appends its own (per admission it was
    # O(running) Python, ~8 ms a step with 2048 running and 8000 waiting).
    proj = None
    while budget and self.waiting and self.free_slots and len(self.running) < self.max_num_seqs:
      seq = self.waiting[0]
      if seq.inflight:  # preempted while a token was on its way: wait for it
        break
      if self._sibling_prefilling(seq):
        break
      self._reuse_cached(seq)
      if self.running:
        proj = proj if proj is not None else self._projection(self.running)
        with_seq = [np.append(a, b) for a, b in zip(proj, self._projection([seq]))]
        # (pages shared through the prefix cache are counted once per holder: the pool's extra holds)
        if _peak_pages(*with_seq, self.pool.page_size) > self.pool.num_pages + self.pool.extra_holds:
          self._unreuse(seq)
          break
      if self.pool.num_free == 0:   # (its last page is never a cached one)
        self._unreuse(seq)
        break
      self.waiting.popleft()
      if seq.num_cached_tokens is None:   # its first admission: what the prefix cache gave its prompt
        seq.num_cached_tokens = seq.num_computed
        self.pool.queried_tokens += len(seq.prompt_ids)
        self.pool.hit_tokens += seq.num_computed
        self.pool.host_hit_tokens += seq.from_host
      seq.status = Status.RUNNING
      seq.slot = self.free_slots.pop()
      reset.append(seq.slot)
      self.running.append(seq)
      budget -= self._prefill_chunk(seq, budget, chunks)
      if proj is not None:   # the admitted sequence as it now stands (its chunk's pages)
        proj = [np.append(a, b) for a, b in zip(proj, self._projection([seq]))]

    self._written = [c.seq for c in chunks]
    if not chunks:
      return None
    return Batch(chunks, self.dense_batch - budget, reset)

  def _unreuse(self, seq: Sequence) -> None:
    """Gives back the cached pages a sequence took, when it is not admitted after all."""
    if seq.pages:
      # the pages it took from the host are not filled now: not cached (pages it shares keep their uploads)
      self.pool.forget(seq.host_pages)
      self.pool.free(seq.pages)
      seq.pages, seq.num_computed, seq.num_registered = [], 0, 0
      seq.from_host, seq.host_pages = 0, []

  def _prefill_chunk(self, seq: Sequence, budget: int, chunks: list[Chunk]) -> int:
    start = seq.num_computed
    length = min(seq.num_uncomputed, budget)
    # Shrink to the pages we can get (the pool may be short when predictions were wrong).
    while length > 0 and not self._grow(seq, start + length):
      length = (len(seq.pages) + self.pool.num_free) * self.pool.page_size - start
    if length <= 0:
      return 0
    sample = start + length == seq.num_tokens
    chunks.append(Chunk(seq, start, length, sample=sample))
    seq.num_computed += length
    seq.inflight += sample
    return length


def _peak_pages(cur: np.ndarray, peak: np.ndarray, held: np.ndarray, page_size: int) -> int:
  """The projected peak of Scheduler.projected_peak_pages from its per-sequence arrays (_projection)."""
  if not len(cur):
    return 0
  now = int(np.maximum(held, -(-cur // page_size)).sum())
  rem = np.maximum(peak - cur, 0)
  order = np.argsort(-rem, kind="stable")      # the longest-lived first
  cur, rem = cur[order], rem[order]
  alive = np.arange(1, len(cur) + 1)
  # Just before the k-th longest-lived finishes (tau = rem_k - 1 steps ahead) the first k still hold
  # pages, each at most (cur + tau) / page_size + 1 of them.
  tau = np.maximum(rem - 1, 0)
  ahead = (np.cumsum(cur) + alive * tau) // page_size + alive
  return int(max(int(ahead.max()), now))
