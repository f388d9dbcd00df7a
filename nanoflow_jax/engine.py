"""The host loop: schedule, dispatch, and read results one step late.

`step()` forms and dispatches step i, then reads the tokens of step i-1 (which the device finished
while step i was being formed), appends them, detokenizes, applies stop rules and frees what finished.
A decode whose input token is still on the device takes it from the device-side state directly.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import random
import time
from typing import Callable, NamedTuple

import jax
import numpy as np

from nanoflow_jax import compat, dispatch_thread, distributed, gc_policy, kv_cache, sampler, structured
from nanoflow_jax.model import Model
from nanoflow_jax.outputs import CompletionOutput, Delta, Logprob, RequestMetrics, RequestOutput
from nanoflow_jax.runtime.plan import GENERIC_CONFIG
from nanoflow_jax.runtime.executor import FP8_GEMM_CHOICES, GEMM_CHOICES, KIND_PROMPT, LAYER_LOOPS, KIND_REFED_OUTPUT, Executor, StepInputs
from nanoflow_jax.sampling_params import MAX_BANNED_IDS, SamplingParams
from nanoflow_jax.scheduler import Batch, Scheduler
from nanoflow_jax.sequence import Sequence
from nanoflow_jax.tokenizer import IncrementalDetokenizer
from pallas_kernels.paged_attention import query_blocks

log = logging.getLogger(__name__)

# The sampler kinds Engine.warm_up compiles beside the greedy one its requests use: greedy with log-probabilities,
# temperature sampling, and top_p or top_k sampling, each with and without log-probabilities (penalties, grammars,
# logit_bias and top_k with top_p in one step compile at their first use).
# With log-probabilities: up to sampler.TOPK_KERNEL_MAX_K of them (more compile at their first use).
WARM_SAMPLER_MODES = (
    [sampler.Modes(penalized=False, all_greedy=g, truncation=False, logprobs=lp, many_logprobs=False if lp else None)
     for g, lp in ((True, True), (False, False), (False, True))] +
    [sampler.Modes(penalized=False, all_greedy=False, truncation=True, logprobs=lp, by_rank=k, by_mass=not k,
                   many_logprobs=False if lp else None)
     for k in (False, True) for lp in (False, True)])

MODES = ("sequential", "nanoflow")
KV_CACHE_DTYPES = {"auto": None, "bfloat16": "bfloat16", "float16": "float16", "float32": "float32",
                   "fp8": "float8_e4m3fn"}


PREFILL_ATTENTION_CHOICES = ("auto", "triton")


@dataclasses.dataclass
class EngineConfig:
  dense_batch: int = 512
  page_size: int = 16
  num_pages: int | None = None            # None: from kv_memory_fraction of free memory
  kv_memory_fraction: float = 0.9
  max_num_seqs: int = 64
  max_model_len: int | None = None        # None: the model's max_position_embeddings
  mode: str = "sequential"
  kernels: str = "auto"                   # auto: our kernels on GPU (Triton attention where jax-triton
                                          # imports), jnp references elsewhere; see executor.KERNEL_CHOICES
  gemm: str = "mosaic_fused"              # GEMMs on the kernel paths: mosaic_fused (ours, SiLU-and-multiply in
                                          # gate_up's epilogue), mosaic (ours, unfused) or xla (XLA's dot)
  fp8_gemm: str = "xla"                   # fp8 weights' GEMMs on the kernel paths: xla (XLA's fp8 dot) or mosaic
                                          # (ours: scales, residual and SiLU-and-multiply in the epilogue)
  prefill_attention: str = "auto"         # auto: the Mosaic GPU prefill kernel where it takes the KV cache
                                          # (bf16/f16, Hopper), else Triton's; triton: always Triton's
  pipeline_config: str | None = None      # PipelineConfig JSON for mode nanoflow, or "generic" (default: shipped)
  tensor_parallel: int = 1                # the model must be loaded sharded over the same devices
  fused_rope_append: bool = False         # RoPE + KV append as one kernel (not yet measured: off)
  layer_unroll: int = 1                   # decoder layers per iteration of the layer scan: with 2, one
                                          # layer's tail and the next one's head are in one computation
  enable_prefix_caching: bool = True      # full KV pages found again by their prefix (prefix_cache.py)
  host_kv_cache_gb: float = 0.0           # > 0: pages the GPU evicts kept in host memory (host_kv.py)
  host_kv_copy: str = "thread"            # how the host tier's bytes move: thread, put or jit (host_kv.py)
  layer_loop: str = "auto"                # scan (stacked weights, compiled once), unrolled (every layer in the
                                          # step with weights of its own: no copies for XLA's dot, command
                                          # buffers over the step), hybrid (steps below 512 tokens unrolled,
                                          # larger ones scanned) or auto (on a GPU, fp8 weights: unrolled on
                                          # XLA's fp8 dot, hybrid on ours; else scan; executor.py)
  small_step_attention: int = 0           # steps of at most this many tokens: the attention as the Pallas
                                          # kernel, which XLA's command buffers record (executor.py); 0: off
  split_decode_keys: bool = True          # small decode steps share each sequence's keys over several programs
                                          # (flash-decoding; -4 to -14% a step at batch 1-32, H100)
  small_gemm: bool = False                # steps of <= 16 rows run each GEMM's whole op (norm, the fp8 weights'
                                          # quantization, GEMM, epilogue) as one kernel (not yet measured: off)
  kv_cache_dtype: str = "auto"            # auto (the model's dtype), bfloat16, float16, float32 or fp8
                                          # (float8_e4m3fn, no scales: half the bytes of bf16)
  compilation_cache_dir: str | None = os.path.expanduser("~/.cache/nanoflow_jax/jax_cache")
  overlap_dispatch: bool = False          # each step dispatched on a thread of its own while the host reads the
                                          # last step and schedules the next (dispatch_thread.py; H200, 1024/512
                                          # fp8: +0.96%; light load not yet measured on a GPU: off)

  def validate(self):
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
    if self.dense_batch < 1 or self.page_size < 1 or self.max_num_seqs < 1:
      raise ValueError("dense_batch, page_size and max_num_seqs must be >= 1")
    if self.layer_unroll < 1:
      raise ValueError(f"layer_unroll must be >= 1, got {self.layer_unroll}")
    if self.layer_loop not in LAYER_LOOPS:
      raise ValueError(f"layer_loop must be one of {LAYER_LOOPS}, got {self.layer_loop!r}")
    if not 0 < self.kv_memory_fraction <= 1:
      raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
    if self.gemm not in GEMM_CHOICES:
      raise ValueError(f"gemm must be one of {GEMM_CHOICES}, got {self.gemm!r}")
    if self.fp8_gemm not in FP8_GEMM_CHOICES:
      raise ValueError(f"fp8_gemm must be one of {FP8_GEMM_CHOICES}, got {self.fp8_gemm!r}")
    if self.prefill_attention not in PREFILL_ATTENTION_CHOICES:
      raise ValueError(f"prefill_attention must be one of {PREFILL_ATTENTION_CHOICES}, got {self.prefill_attention!r}")
    if self.kv_cache_dtype not in KV_CACHE_DTYPES:
      raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
    from nanoflow_jax.host_kv import COPY_MODES
    if self.host_kv_copy not in COPY_MODES:
      raise ValueError(f"host_kv_copy must be one of {COPY_MODES}, got {self.host_kv_copy!r}")
    if self.host_kv_cache_gb < 0:
      raise ValueError(f"host_kv_cache_gb must be >= 0, got {self.host_kv_cache_gb}")
    physical = compat.physical_memory_gb()
    if physical and self.host_kv_cache_gb > HOST_KV_MAX_SHARE * physical:
      raise ValueError(f"host_kv_cache_gb={self.host_kv_cache_gb:g} is more than {HOST_KV_MAX_SHARE:.0%} of this "
                       f"machine's {physical:.0f} GB of memory (pinned pages cannot be swapped out)")


HOST_KV_MAX_SHARE = 0.8   # of the machine's memory, at most, for the host KV tier: the process needs the rest


class RequestError(ValueError):
  """A request the engine cannot take (too long, bad ids); nothing else is affected."""


@dataclasses.dataclass
class _Request:
  request_id: str
  prompt: str | None
  prompt_ids: list[int]
  seqs: list[Sequence]
  on_delta: Callable[[Delta], None] | None


class StepRecord(NamedTuple):
  dispatched_at: float      # time.perf_counter() when the dispatch call returned
  tokens: int               # scheduled tokens (decodes + prefill)
  bucket: int               # the compiled step size they were padded to
  decodes: int
  decode_context: int       # summed context of the decoding sequences (KV rows attention reads)


@dataclasses.dataclass
class EngineStats:
  steps: int = 0
  tokens: int = 0
  host_seconds: float = 0.0       # the engine thread's time: scheduling, input building, dispatch (unless on
                                  # its own thread: overlap_dispatch), output processing
  wait_seconds: float = 0.0       # blocked on the device's results (and with overlap_dispatch, on the dispatch)
  schedule_seconds: float = 0.0   # parts of host_seconds
  build_seconds: float = 0.0
  dispatch_seconds: float = 0.0   # (with overlap_dispatch: the dispatch thread's time, not part of host_seconds)
  process_seconds: float = 0.0
  prompt_tokens: int = 0
  generated_tokens: int = 0
  # When a list (benchmarks set it), one StepRecord per dispatched step: what the step held and when its
  # dispatch returned. The loop runs one step ahead and waits for each step's results, so where the
  # device is the bottleneck the gaps between dispatches are the device's step times.
  step_records: list | None = None

  @property
  def host_ms_per_step(self) -> float:
    return 1e3 * self.host_seconds / max(self.steps, 1)


class Engine:
  def __init__(self, model: Model, config: EngineConfig | None = None):
    self.config = c = config or EngineConfig()
    c.validate()
    if c.compilation_cache_dir:
      jax.config.update("jax_compilation_cache_dir", c.compilation_cache_dir)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    mesh = None
    if c.tensor_parallel > 1:
      from nanoflow_jax import parallel
      mesh = parallel.make_mesh(c.tensor_parallel)
    plan = None
    if c.mode == "nanoflow":
      from nanoflow_jax.runtime import plan as plan_lib
      on_gpu = jax.default_backend() == "gpu"
      num_sms = jax.devices()[0].core_count if on_gpu else 132
      from nanoflow_jax.runtime import autosearch
      generic = c.pipeline_config == GENERIC_CONFIG
      shipped = None if generic else autosearch.shipped_config(
          model.config.name, jax.devices()[0], c.dense_batch, c.tensor_parallel,
          autosearch.weights_variant(model.config.quantization is not None))
      if c.pipeline_config and not generic:
        plan = plan_lib.PipelineConfig.load(c.pipeline_config)
      elif shipped is not None:
        plan = shipped
        log.info("mode=nanoflow: shipped pipeline config %s (nano-batches %s)%s", plan.name, plan.nano_batches,
                 "; the auto-search found no split faster than the whole batch, so the step runs it in order"
                 if len(plan.nano_batches) == 1 else "")
      else:
        plan = plan_lib.generic_default(c.dense_batch, num_sms, tp=c.tensor_parallel)
        log.info("mode=nanoflow: %s; using the generic default (%s: nano-batches %s)",
                 "asked for" if generic else "no pipeline config given", plan.name, plan.nano_batches)
    self.model = model
    self.tokenizer = model.tokenizer
    cfg = model.config
    self.max_model_len = min(c.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    self.executor = Executor(model, c.num_pages, c.page_size, c.max_num_seqs, self.max_model_len, c.dense_batch,
                             kernels=c.kernels, kv_memory_fraction=c.kv_memory_fraction, plan=plan, mesh=mesh,
                             kv_dtype=KV_CACHE_DTYPES[c.kv_cache_dtype], fused_rope_append=c.fused_rope_append,
                             gemm=c.gemm, layer_unroll=c.layer_unroll, layer_loop=c.layer_loop,
                             mosaic_prefill=c.prefill_attention == "auto",
                             small_step_attention=c.small_step_attention, fp8_gemm=c.fp8_gemm,
                             split_decode_keys=c.split_decode_keys, small_gemm=c.small_gemm)
    num_pages = self.executor.num_pages
    self.pool = kv_cache.PagePool(num_pages, c.page_size, caching=c.enable_prefix_caching)
    if c.host_kv_cache_gb > 0:
      if not c.enable_prefix_caching:
        raise ValueError("host_kv_cache_gb keeps evicted prefix-cache pages: it needs enable_prefix_caching")
      from nanoflow_jax import host_kv
      compat.check_pinned_host_fits(next(iter(self.executor.kv[0].devices())).platform, c.host_kv_cache_gb)
      per_page = kv_cache.page_bytes(cfg, c.page_size, self.executor.kv_dtype)
      self.pool.host = host_kv.HostKVTier(max(1, int(c.host_kv_cache_gb * 2**30 // per_page)), c.host_kv_copy)
      log.info("host KV tier: %d pages (%.1f GB)", self.pool.host.capacity_pages, c.host_kv_cache_gb)
    tokens_fit = num_pages * c.page_size
    if tokens_fit < self.max_model_len:
      # A sequence the cache can never hold would preempt itself forever (a livelock that starves every
      # other request): the longest sequence must fit. A length the user asked for is refused; the
      # model's own default is lowered, and the log says so.
      if c.max_model_len is not None:
        raise ValueError(f"max_model_len {self.max_model_len} does not fit in the KV cache ({num_pages} pages of "
                         f"{c.page_size} = {tokens_fit} tokens): lower max_model_len to at most {tokens_fit}, or "
                         "give the cache more pages (num_pages, kv_memory_fraction)")
      log.warning("max_model_len lowered from the model's %d to %d: the KV cache (%d pages of %d tokens) holds "
                  "no longer sequence", self.max_model_len, tokens_fit, num_pages, c.page_size)
      self.max_model_len = tokens_fit
    log.info("KV cache: %d pages of %d tokens = %d tokens; concurrency at max_model_len %d: %.2f",
             num_pages, c.page_size, tokens_fit, self.max_model_len, tokens_fit / self.max_model_len)
    self.scheduler = Scheduler(self.pool, c.dense_batch, c.max_num_seqs, self.max_model_len)
    self.page_table = np.zeros((c.max_num_seqs, self.executor.page_table_cols), np.int32)
    self._table_len = np.zeros(c.max_num_seqs, np.int64)   # pages of each slot's sequence written to its row
    self.sp = sampler.SamplingArrays.empty(c.max_num_seqs)
    self.eos_ids = tuple(self.tokenizer.eos_ids if self.tokenizer else cfg.eos_token_ids)
    self.requests: dict[str, _Request] = {}
    self.stats = EngineStats()
    self._pending = None           # (Future of (device outputs, prompt-logprob outputs), [(seq, slot)],
                                   # prompt-logprob rows) in flight
    self._dispatcher = dispatch_thread.Dispatcher() if c.overlap_dispatch else None
    self._lp_entries: list = []
    self._seq_ids = itertools.count()
    # Seeds of unseeded requests. In a multi-host job every process runs the same step on its share of the
    # devices and must feed it the same inputs, so the generator starts from process 0's seed everywhere.
    self._rng = random.Random(distributed.shared_seed())

  # --- requests ---------------------------------------------------------------------------------
  def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None,
                  on_delta: Callable[[Delta], None] | None = None) -> None:
    if request_id in self.requests:
      raise RequestError(f"request id {request_id!r} is already in use")
    params.validate()
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
      raise RequestError("the prompt is empty")
    vocab = self.model.config.vocab_size
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
      raise RequestError(f"prompt token ids must lie in [0, {vocab})")
    if len(prompt_ids) >= self.max_model_len:
      raise RequestError(f"the prompt has {len(prompt_ids)} tokens; max_model_len is {self.max_model_len}, "
                         "which must leave room for at least one generated token")
    longest = min(len(prompt_ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
    if self.pool.pages_for(longest) > self.pool.num_pages:   # it would preempt itself forever
      raise RequestError(f"prompt + max_tokens ({longest} tokens) needs more KV pages than the whole cache holds "
                         f"({self.pool.num_pages} pages of {self.pool.page_size} tokens)")
    bad = [t for t in params.stop_token_ids if t >= vocab]
    if bad:
      raise RequestError(f"stop_token_ids must lie in [0, {vocab}), got {bad[0]}")
    bad = [t for t in (params.logit_bias or {}) if t >= vocab]
    if bad:
      raise RequestError(f"logit_bias token ids must lie in [0, {vocab}), got {bad[0]}")
    matchers = [None] * params.n
    if params.structured_outputs is not None:   # compiled once per request, checked before anything is queued
      if self.tokenizer is None:
        raise RequestError("structured output needs the model's tokenizer")
      try:
        grammar = structured.grammar_for(params.structured_outputs)
        matchers = [structured.Matcher(self.tokenizer, vocab, grammar) for _ in range(params.n)]
      except structured.StructuredOutputError as e:
        raise RequestError(str(e)) from e
    seqs = []
    for i in range(params.n):
      seed = params.seed if params.seed is not None else self._rng.getrandbits(32)
      seq = Sequence(next(self._seq_ids), request_id, i, prompt_ids, params, seed=(seed * 1000003 + i) % (1 << 32))
      if self.tokenizer is not None and params.detokenize:
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
      seq.matcher = matchers[i]
      if params.prompt_logprobs is not None:
        seq.prompt_logprobs = [None] * len(prompt_ids)
      seqs.append(seq)
      self.scheduler.add(seq)
    self.requests[request_id] = _Request(request_id, prompt, prompt_ids, seqs, on_delta)
    self.stats.prompt_tokens += len(prompt_ids) * params.n

  def abort(self, request_id: str, reason: str = "abort") -> None:
    """Stops a request (its pages and slot are freed at once); the caller gets a final delta."""
    req = self.requests.get(request_id)
    if req is None:
      return
    for seq in req.seqs:
      if not seq.finished:
        self._finish(seq, reason)
        self._emit(req, seq, [], [])

  def seed_unseeded(self, seed: int) -> None:
    """Requests without a seed draw theirs from this one from now on (reproducible runs, vLLM's --seed)."""
    self._rng.seed(seed)

  def discard(self, request_id: str) -> None:
    """Aborts the request and forgets it (no output kept): a client gone, or a request half added."""
    self.abort(request_id)
    if request_id in self.requests:
      self.pop_output(request_id)

  def abort_all(self, reason: str = "abort") -> None:
    failed = self._dispatcher is not None and self._dispatcher.failed
    self.drain()   # (whatever is in flight ends first; its results are dropped with _pending)
    for rid in list(self.requests):
      self.abort(rid, reason)
    self._pending = None
    if failed:
      # A step that failed on the dispatch thread did so after the engine went on: pages registered in the
      # prefix cache meanwhile (a request aborted in between, say) may not have been written.
      self.pool.forget_unheld()

  def reset_prefix_cache(self) -> None:
    """Forgets every cached prefix no request holds, on the GPU and in the host tier (as vLLM's
    reset_prefix_cache; pages that running requests hold stay theirs, and cached)."""
    self.pool.forget_unheld()
    if self.pool.host is not None:
      self.pool.host.clear()

  def usable(self) -> bool:
    """Whether the device state survives (a step that failed after donating its buffers loses it)."""
    if self._dispatcher is not None:   # (waits for the steps in flight; a failure among them stays to be raised)
      self._dispatcher.wait_idle()
    ex = self.executor
    state = (ex.kv, ex.last_tokens, ex.counts, ex.prompt_mask)
    return all(x is not None and not x.is_deleted() for x in jax.tree.leaves(state))

  def has_work(self) -> bool:
    return self.scheduler.has_work() or self._pending is not None

  def pop_output(self, request_id: str) -> RequestOutput:
    """The request's output; a finished request is forgotten by the engine."""
    req = self.requests[request_id]
    out = RequestOutput(
        request_id, req.prompt, req.prompt_ids,
        [CompletionOutput(s.index, s.text, list(s.output_ids), s.finish_reason, s.stop_reason,
                          list(s.output_logprobs) if s.params.logprobs is not None else None) for s in req.seqs],
        finished=all(s.finished for s in req.seqs),
        metrics=[RequestMetrics(s.arrival_time, s.first_token_time, s.finish_time, s.num_preemptions)
                 for s in req.seqs],
        num_cached_tokens=req.seqs[0].num_cached_tokens, prompt_logprobs=req.seqs[0].prompt_logprobs)
    if out.finished:
      del self.requests[request_id]
    return out

  # --- the loop ---------------------------------------------------------------------------------
  def step(self) -> None:
    t0 = time.perf_counter()
    threaded = self._dispatcher is not None
    # (with a dispatch thread the compiles happen there, beside this thread's work)
    compile0 = 0.0 if threaded else sum(self.executor.compile_seconds.values())
    st = self.stats
    self._raise_dispatch_failure()
    batch = self.scheduler.schedule()
    if threaded and (self.pool.evicted or self.pool.uploads):
      self._dispatcher.wait_idle()   # the host tier reads and writes the cache the steps in flight write
      self._raise_dispatch_failure()
    self._move_host_pages()
    t1 = time.perf_counter()
    st.schedule_seconds += t1 - t0
    dispatched = None
    if batch is not None:
      inp, sampled = self._build_inputs(batch)
      t2 = time.perf_counter()
      st.build_seconds += t2 - t1
      record = None
      if st.step_records is not None:
        decodes = sum(1 for ch in batch.chunks if ch.decode)
        record = (batch.num_tokens, inp.tokens.shape[0], decodes,
                  sum(ch.start + ch.length for ch in batch.chunks if ch.decode))
      # Copies: on the CPU a numpy argument may be aliased, and the host rows change next step.
      job = functools.partial(self._dispatch, inp, jax.tree.map(np.copy, self.sp),
                              self._extras(sampled, len(inp.sample_slots)), bool(self._lp_entries), record)
      pending = self._dispatcher.submit(job) if threaded else dispatch_thread.completed(job)
      dispatched = (pending, sampled, self._lp_entries)
      st.steps += 1
      st.tokens += batch.num_tokens
    wait = 0.0
    if self._pending is not None:
      pending, sampled, lp_entries = self._pending
      tw = time.perf_counter()
      self._pending = None   # (read once: a failure here is not raised again)
      outs, prompt_lp = pending.result()
      tokens, lp, top_lp, top_ids = jax.device_get(outs)
      if lp_entries:
        self._prompt_logprobs(lp_entries, *jax.device_get(prompt_lp))
      wait = time.perf_counter() - tw
      self._process(sampled, tokens, lp, top_lp, top_ids)
      st.process_seconds += time.perf_counter() - tw - wait
    self._pending = dispatched
    if self.pool.host is not None:   # blocks gathered before the step just read go to host memory (host_kv.py)
      self.pool.host.settle(everything=dispatched is None)
    self.stats.wait_seconds += wait
    compiling = 0.0 if threaded else sum(self.executor.compile_seconds.values()) - compile0
    self.stats.host_seconds += time.perf_counter() - t0 - wait - compiling

  def _dispatch(self, inp: StepInputs, sp, extras: dict, prompt_logprobs: bool, record: tuple | None):
    """The executor's calls for one step (on the dispatch thread where there is one): (device outputs, prompt
    log-probability outputs or ())."""
    t = time.perf_counter()
    outs = self.executor.run(inp, sp, extras)
    prompt_lp = self.executor.prompt_logprobs if prompt_logprobs else ()
    done = time.perf_counter()
    self.stats.dispatch_seconds += done - t
    if record is not None:
      self.stats.step_records.append(StepRecord(done, *record))
    return outs, prompt_lp

  def _raise_dispatch_failure(self) -> None:
    """A step that failed on the dispatch thread: its error raised here, before anything else is decided."""
    if self._dispatcher is None or not self._dispatcher.failed:
      return
    if self._pending is not None:
      pending, self._pending = self._pending[0], None
      pending.result()
    raise RuntimeError("a step failed on the dispatch thread (its error was raised before)")

  def drain(self) -> None:
    """Waits for the steps on the dispatch thread (none without one): the executor's state is then this
    thread's to read or change."""
    if self._dispatcher is not None:
      self._dispatcher.drain()

  def _move_host_pages(self) -> None:
    """The host KV tier's moves the schedule asked for, dispatched before the step: the cached pages it evicted
    go to host memory (read before the step overwrites them), and the pages it took from the host are written."""
    pool = self.pool
    if pool.host is None:
      return
    ex = self.executor
    if pool.evicted:
      pool.host.save(ex.kv, [p for p, _ in pool.evicted], [k for _, k in pool.evicted])
      pool.evicted = []
    if pool.uploads:
      ex.kv = pool.host.load(ex.kv, [p for p, _ in pool.uploads], [k for _, k in pool.uploads])
      pool.uploads = []

  def _build_inputs(self, batch: Batch) -> tuple[StepInputs, list[tuple[Sequence, int]]]:
    """The step's host arrays. Decode rows (one token each, most of a step's chunks) are gathered in
    Python lists and written in bulk; prefill chunks by slices. Per-row numpy writes cost ~12 ms a step
    at 2048 sequences (session 9)."""
    ex, c = self.executor, self.config
    n = ex.bucket(batch.num_tokens)
    r, ps = c.max_num_seqs, c.page_size
    tokens = np.zeros(n, np.int32)
    from_device = np.zeros(n, np.bool_)
    positions = np.zeros(n, np.int32)
    slots = np.zeros(n, np.int32)
    kv_pages = np.full(n, self.pool.num_pages, np.int32)
    kinds = np.zeros(n, np.int32)
    sample_mask = np.zeros(r, np.bool_)
    reset = np.full(min(r, n), r, np.int32)   # each new sequence has a chunk in the step: at most min(R, N)
    reset[:len(batch.reset_slots)] = batch.reset_slots
    self._table_len[batch.reset_slots] = 0     # a new sequence in the slot: its row is rewritten from page 0
    new_slots = set(batch.reset_slots)
    sampled: list[tuple[Sequence, int]] = []
    d_rows, d_pos, d_slots, d_pages, f_rows, t_rows, t_ids, s_rows = [], [], [], [], [], [], [], []
    self._lp_entries = []   # prompt_logprobs: (sequence, prompt position) per row of inp.lp_rows
    lp_rows, lp_targets = [], []
    cur = 0
    for ch in batch.chunks:
      seq, length, slot = ch.seq, ch.length, ch.seq.slot
      written = self._table_len[slot]
      if written < len(seq.pages):   # only the pages added since the row was last written
        self.page_table[slot, written:len(seq.pages)] = seq.pages[written:]
        self._table_len[slot] = len(seq.pages)
      if ch.decode:
        d_rows.append(cur)
        d_pos.append(ch.start)
        d_slots.append(slot)
        d_pages.append(seq.pages[ch.start // ps])
        if ch.from_device:   # its input is the token sampled last step, still on the device
          f_rows.append(cur)
        else:
          t_rows.append(cur)
          t_ids.append(seq.token_at(ch.start))
      else:
        s = slice(cur, cur + length)
        pos = np.arange(ch.start, ch.start + length, dtype=np.int32)
        positions[s] = pos
        slots[s] = slot
        kv_pages[s] = self.page_table[slot, pos // ps]
        all_ids = seq.prompt_ids if ch.start + length <= len(seq.prompt_ids) else seq.prompt_ids + seq.output_ids
        tokens[s] = all_ids[ch.start:ch.start + length]
        # prompt tokens feed the repetition mask; re-fed outputs (after preemption) the counts
        kinds[s] = np.where(pos < len(seq.prompt_ids), KIND_PROMPT, KIND_REFED_OUTPUT)
        if seq.params.prompt_logprobs is not None:   # row j predicts the prompt token after its position
          for j in range(min(length, len(seq.prompt_ids) - 1 - ch.start)):
            self._lp_entries.append((seq, ch.start + j + 1))
            lp_rows.append(cur + j)
            lp_targets.append(seq.prompt_ids[ch.start + j + 1])
      if slot in new_slots:
        self._set_static_row(seq, slot)
      if ch.sample:
        s_rows.append(cur + length - 1)
        sample_mask[slot] = True
        sampled.append((seq, slot))
      cur += length
    if d_rows:
      positions[d_rows] = d_pos
      slots[d_rows] = d_slots
      kv_pages[d_rows] = d_pages
      from_device[f_rows] = True
      tokens[t_rows] = t_ids
    self._set_step_rows(sampled)
    kv_offsets = (positions % ps).astype(np.int32)   # (padding rows: position 0, offset 0)
    # The sampled rows, in `sampled` order (the outputs come back in it): at most one per slot and per token.
    sample_rows = np.zeros(min(r, n), np.int32)
    sample_slots = np.full(min(r, n), r, np.int32)
    sample_rows[:len(s_rows)] = s_rows
    sample_slots[:len(sampled)] = [slot for _, slot in sampled]
    decode_only = all(ch.decode for ch in batch.chunks) and ex.decode_only_variant(n)
    inp = StepInputs(tokens, from_device, positions, slots, kv_pages, kv_offsets, kinds, self.page_table.copy(),
                     sample_rows, sample_slots, sample_mask, reset,
                     _attention_blocks(batch, ex.nano_sizes(n), ex.attention_for(n)[1], decode_only))
    if lp_rows:   # the bucket's size: one shape per bucket
      inp.lp_rows, inp.lp_targets = np.zeros(n, np.int32), np.zeros(n, np.int32)
      inp.lp_rows[:len(lp_rows)], inp.lp_targets[:len(lp_targets)] = lp_rows, lp_targets
    return inp, sampled

  def _extras(self, sampled, rows: int) -> dict:
    """The sampler's per-row inputs that only some steps need: the allowed tokens of each sampled row where a
    grammar constrains one (structured output; every token for the others: those sequences have no token in
    flight, the scheduler waits for it), and logit_bias as [rows, K] ids and values (K a power of two)."""
    extras = {}
    if any(seq.matcher is not None for seq, _ in sampled):
      mask = np.full((rows, structured.Matcher.words(self.model.config.vocab_size)), -1, np.int32)
      for i, (seq, _) in enumerate(sampled):
        if seq.matcher is not None:
          seq.matcher.fill_bitmask(mask[i])
      extras["bitmask"] = mask
    most = max((len(seq.params.logit_bias or ()) for seq, _ in sampled), default=0)
    if most:
      k = 1 << (most - 1).bit_length()   # few widths, few compiles
      ids, values = np.full((rows, k), -1, np.int32), np.zeros((rows, k), np.float32)
      for i, (seq, _) in enumerate(sampled):
        for j, (t, v) in enumerate((seq.params.logit_bias or {}).items()):
          ids[i, j], values[i, j] = t, v
      extras.update(bias_ids=ids, bias_values=values)
    return extras

  def _set_static_row(self, seq: Sequence, row: int) -> None:
    p, sp = seq.params, self.sp
    sp.temperature[row] = p.temperature
    sp.top_k[row] = min(max(p.top_k, 0), self.model.config.vocab_size)   # k >= vocab keeps every token
    sp.top_p[row] = p.top_p
    sp.min_p[row] = p.min_p
    sp.repetition_penalty[row] = p.repetition_penalty
    sp.presence_penalty[row] = p.presence_penalty
    sp.frequency_penalty[row] = p.frequency_penalty
    sp.seed[row] = seq.seed
    # top alternatives only where asked: logprobs=0 (the sampled token's own log-probability, which every row
    # gets; what benchmark clients ask) would otherwise pay the vocabulary's top-K, 5.1 ms at 512 rows (H100)
    sp.num_logprobs[row] = p.logprobs or 0

  def _set_step_rows(self, sampled: list[tuple[Sequence, int]]) -> None:
    """Per sampled row: which output token it draws, and the ids banned while min_tokens is not reached."""
    if not sampled:
      return
    sp = self.sp
    rows = [row for _, row in sampled]
    index = [len(seq.output_ids) + seq.inflight - 1 for seq, _ in sampled]   # which output token this is
    sp.step[rows] = index
    sp.banned[rows] = -1
    for (seq, row), i in zip(sampled, index):
      if i < seq.params.min_tokens:
        ban = (() if seq.params.ignore_eos else self.eos_ids) + tuple(seq.params.stop_token_ids)
        sp.banned[row, :len(ban)] = ban[:MAX_BANNED_IDS]

  def _prompt_logprobs(self, entries, target_lp, top_lp, top_ids) -> None:
    for i, (seq, pos) in enumerate(entries):
      k = seq.params.prompt_logprobs
      top = {int(t): float(v) for t, v in zip(top_ids[i, :k], top_lp[i, :k])}
      seq.prompt_logprobs[pos] = Logprob(seq.prompt_ids[pos], float(target_lp[i]), top)

  def _process(self, sampled, tokens, lp, top_lp, top_ids) -> None:
    """A step samples at most one token per sequence: append it, apply stop rules, emit its delta."""
    now = time.monotonic()
    for i, (seq, _) in enumerate(sampled):   # output row i is the i-th sampled sequence's
      if seq.finished:
        continue  # a request that stopped while this step was in flight
      seq.inflight -= 1
      tok = int(tokens[i])
      seq.output_ids.append(tok)
      self.stats.generated_tokens += 1
      if seq.first_token_time is None:
        seq.first_token_time = now
      logprobs = []
      if seq.params.logprobs is not None:
        k = seq.params.logprobs
        logprobs.append(Logprob(tok, float(lp[i]),
                                {int(t): float(v) for t, v in zip(top_ids[i, :k], top_lp[i, :k])}))
        seq.output_logprobs.extend(logprobs)
      self._advance_text(seq, tok)
      if seq.matcher is not None:
        seq.matcher.consume(tok)
        if seq.matcher.done or seq.matcher.error:   # the grammar is complete (or broke): nothing may follow
          self._finish(seq, "stop")
      if not seq.finished:
        self._check_stop(seq, tok)
      req = self.requests.get(seq.request_id)
      if req is not None:
        self._emit(req, seq, [tok], logprobs)

  def _advance_text(self, seq: Sequence, tok: int) -> None:
    if seq.detokenizer is not None:
      seq.new_text = seq.detokenizer.push(tok)
      seq.text += seq.new_text

  def _check_stop(self, seq: Sequence, tok: int) -> None:
    p = seq.params
    n_out = len(seq.output_ids)
    if n_out >= p.min_tokens:
      if not p.ignore_eos and tok in self.eos_ids:
        return self._finish(seq, "stop")
      if tok in p.stop_token_ids:
        seq.stop_reason = tok
        return self._finish(seq, "stop")
      if p.stop and seq.new_text:
        longest = max(len(s) for s in p.stop)
        start = max(0, len(seq.text) - len(seq.new_text) - longest + 1)
        hits = [(seq.text.find(s, start), s) for s in p.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
          i, s = min(hits)
          seq.text = seq.text[:i + (len(s) if p.include_stop_str_in_output else 0)]
          seq.stop_reason = s
          return self._finish(seq, "stop")
    if p.max_tokens is not None and n_out >= p.max_tokens:
      return self._finish(seq, "length")
    if seq.num_tokens >= self.max_model_len:
      return self._finish(seq, "length")

  def _finish(self, seq: Sequence, reason: str) -> None:
    if seq.detokenizer is not None and reason in ("stop", "length") and not isinstance(seq.stop_reason, str):
      seq.text += seq.detokenizer.flush()   # (a stop string's cut keeps nothing after it)
    seq.finish_time = time.monotonic()
    self.scheduler.finish(seq, reason)

  def _emit(self, req: _Request, seq: Sequence, toks: list[int], lps: list[Logprob]) -> None:
    if seq.finished:
      upto = len(seq.text)
    else:  # hold back a tail that may be the start of a stop string
      upto = len(seq.text) - _stop_prefix_len(seq.text, seq.params.stop)
    text = seq.text[seq.emitted:upto] if upto > seq.emitted else ""
    seq.emitted = max(seq.emitted, upto)
    if req.on_delta is not None:
      req.on_delta(Delta(req.request_id, seq.index, text, toks, lps if seq.params.logprobs is not None else None,
                         seq.finish_reason, seq.stop_reason, len(req.prompt_ids), len(seq.output_ids),
                         seq.num_cached_tokens or 0, seq.prompt_logprobs if seq.finished else None))

  def shutdown(self) -> None:
    """Drops the device state (KV cache, sampling state) so another engine can take the memory."""
    self.abort_all()
    if self._dispatcher is not None:
      self._dispatcher.close()
      self._dispatcher = None
    if self.pool.host is not None:   # its blocks' pinned memory, and its copy thread
      self.pool.host.close()
    ex = self.executor
    ex.kv = ex.params = ex.last_tokens = ex.counts = ex.prompt_mask = None
    ex._compiled.clear()

  # --- offline driving ----------------------------------------------------------------------------
  def run_until_done(self, progress=None) -> None:
    collector = gc_policy.BusyCollector()   # no full collections stalling steps (gc_policy.py)
    try:
      while self.has_work():
        collector.busy()
        self.step()
        if progress is not None:
          progress()
    finally:
      collector.idle()

  def warm_up(self) -> None:
    """Compiles every bucket: a request of each bucket's size, alone, so that its prompt fills exactly that
    bucket (its decode steps use the smallest). Each prompt repeats a token of its own: with prefix caching, a
    prompt that began like the one before would compute only its new tail, and its bucket would compile later
    (session 16: 41 s of the 2048 bucket's compile fell inside a timed run). The counters that /metrics reports
    are left as they were: a warmed-up server has served nothing yet, and its prefix cache holds nothing."""
    stats, pool = dataclasses.replace(self.stats), self.pool
    counters = (pool.queried_tokens, pool.hit_tokens, pool.host_hit_tokens, pool.evictions,
                self.scheduler.num_preemptions)
    params = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0, detokenize=False)
    for i, b in enumerate(self.executor.buckets):
      self.add_request(f"warm-up-{i}", [2 + i] * min(b, self.max_model_len - 2), params)
      self.run_until_done()
      self.pop_output(f"warm-up-{i}")
    # The decode-only variants of the small buckets (those the requests above did not decode in): compiled,
    # not run, from a step of padding rows.
    for b in self.executor.buckets:
      if self.executor.decode_only_variant(b):
        self.executor.compile(self._padding_decode_inputs(b))
    # The sampler's common kinds beside the warm-up's greedy one (chat clients sample with top-p, benchmark
    # clients and evaluations ask log-probabilities): session 26's server compiled them at its first requests.
    self.executor.compile_samplers(WARM_SAMPLER_MODES, self.sp)
    if self.pool.host is not None:   # the host tier's gathers and scatters, one of each per block size
      self.executor.kv = self.pool.host.warm_up(self.executor.kv)
    self.reset_prefix_cache()   # the warm-up's prompts are nobody's prefix
    self.stats = stats
    (pool.queried_tokens, pool.hit_tokens, pool.host_hit_tokens, pool.evictions,
     self.scheduler.num_preemptions) = counters

  def _padding_decode_inputs(self, n: int) -> StepInputs:
    """A decode-only step of `n` padding rows (what it writes is dropped): the shapes of bucket n's decode-only
    variant."""
    ex, r = self.executor, self.config.max_num_seqs
    s = min(r, n)
    decodes = Batch(chunks=[_PADDING_DECODE] * n, num_tokens=n, reset_slots=[])
    zeros = lambda k: np.zeros(k, np.int32)
    return StepInputs(zeros(n), np.zeros(n, np.bool_), zeros(n), zeros(n), np.full(n, self.pool.num_pages, np.int32),
                      zeros(n), zeros(n), np.zeros_like(self.page_table), zeros(s), np.full(s, r, np.int32),
                      np.zeros(r, np.bool_), np.full(s, r, np.int32),
                      _attention_blocks(decodes, ex.nano_sizes(n), ex.attention_for(n)[1], decode_only=True))


class _Chunk(NamedTuple):
  length: int
  decode: bool


_PADDING_DECODE = _Chunk(1, True)   # what _attention_blocks reads of a chunk, for a step of padding rows


def _attention_blocks(batch: Batch, sizes: list[int], attention_configs: tuple[dict, dict],
                      decode_only: bool = False) -> tuple:
  """Query blocks for the attention kernel, per nano-batch (rows relative to it): decodes (laid out
  first) in blocks of the decode config's block_q, prefill chunks in blocks of the prefill config's. A
  chunk that straddles a nano-batch boundary is cut there. decode_only (a step of decodes alone, in a bucket
  with a decode-only variant: Executor.decode_only_variant): the prefill blocks empty, so that the variant
  compiled for it makes no prefill attention call."""
  decode_cfg, prefill_cfg = attention_configs
  out, chunks = [], [(ch.length, ch.decode) for ch in batch.chunks]
  ci, off = 0, 0   # the chunk being cut and how much of it was taken
  for size in sizes:
    dec, pre, cur = [], [], 0
    while ci < len(chunks) and cur < size:
      length, is_decode = chunks[ci]
      take = min(length - off, size - cur)
      (dec if is_decode else pre).append((cur, take))
      cur, off = cur + take, off + take
      if off == length:
        ci, off = ci + 1, 0
    d = query_blocks([1] * len(dec), size, decode_cfg["block_q"])
    p_start, p_len, p_count = query_blocks([t for _, t in pre], size, prefill_cfg["block_q"])
    p_start[:p_count] += len(dec)  # decodes come first within the nano-batch
    if decode_only:
      p_start, p_len = p_start[:0], p_len[:0]
    out.append(((d[0], d[1], np.array([d[2]], np.int32)), (p_start, p_len, np.array([p_count], np.int32))))
  return tuple(out)


def _stop_prefix_len(text: str, stops: list[str]) -> int:
  """Length of the longest tail of `text` that is a proper prefix of a stop string."""
  best = 0
  for s in stops:
    for k in range(min(len(s) - 1, len(text)), best, -1):
      if text.endswith(s[:k]):
        best = k
        break
  return best
