"""MixedStep: one dense engine step of a decode/prefill mix, built through the real engine and timed in any
execution mode (used by lab/step_bench.py and launch/autosearch.py's measurement; no flags here, so
both can import it)."""
from __future__ import annotations

import contextlib


class MixedStep:
  """One dense step of the 1024/512 mix, built through the real engine: `decodes` sequences decoding at
  (at least) `context` plus a `prefill`-token prompt chunk. `time(plan, kernels, ...)` runs it."""

  def __init__(self, model, decodes: int, context: int, prefill: int, max_num_seqs: int = 0, dense_batch: int = 0):
    import numpy as np
    from nanoflow_jax.engine import Engine, EngineConfig
    from nanoflow_jax.sampling_params import SamplingParams
    self.model = model
    # The executor's dense batch decides its bucket ladder: a step of 4 decodes in an engine of dense batch
    # 2048 runs the 128-row bucket (the GEMM kernel's), in one of dense batch 4 the 16-row one (XLA's dot).
    self.dense = max(decodes + prefill, dense_batch)
    # The set-up prefills the decoding sequences in steps of its dense batch: the step's own, unless the
    # step has no prefill (then a small dense batch would make the set-up long and the contexts grow).
    setup_dense = self.dense if prefill else max(self.dense, 2048)
    # While the later prompts prefill, the first sequences already decode: they reach context + up to
    # decodes * context / dense tokens. None may finish before the step is formed (max_tokens covers it).
    grow = decodes * context // setup_dense + 64
    self.pages = (decodes * (context + grow) + prefill) // 16 + decodes + 64
    self.max_seqs = max(decodes + 1, max_num_seqs)   # the engine's sequence slots (rows sampled every step)
    # the set-up scans its layers: an unrolled step compiles for 30-120 s a bucket
    eng = Engine(model, EngineConfig(dense_batch=setup_dense, num_pages=self.pages, max_num_seqs=self.max_seqs, layer_loop="scan",
                                     max_model_len=max(context + grow, prefill) + 64, compilation_cache_dir=None))
    rng = np.random.default_rng(0)
    vocab = min(1000, model.config.vocab_size)
    for i in range(decodes):
      eng.add_request(f"d{i}", rng.integers(0, vocab, context - 1).tolist(),
                      SamplingParams(max_tokens=grow, ignore_eos=True, temperature=0, detokenize=False))
    while any(s.is_prefilling or not s.output_ids for s in eng.scheduler.running) or eng.scheduler.waiting:
      eng.step()
    if prefill:
      eng.add_request("p", rng.integers(0, vocab, prefill).tolist(),
                      SamplingParams(max_tokens=2, ignore_eos=True, temperature=0, detokenize=False))
    self.batch = eng.scheduler.schedule()
    self.decodes = sum(c.decode for c in self.batch.chunks)
    if self.decodes != decodes:
      raise SystemExit(f"the step has {self.decodes} decodes, not {decodes}: the set-up is wrong")
    contexts = [len(s.prompt_ids) + len(s.output_ids) for s in eng.scheduler.running if s.output_ids]
    self.describe = (f"{self.batch.num_tokens} tokens ({self.decodes} decodes at context {min(contexts)}-"
                     f"{max(contexts)} + {self.batch.num_tokens - self.decodes} prefill)")
    eng.executor.kv = eng.executor.params = None  # only its host state (page table, rows) is needed now
    self.engine = eng

  @contextlib.contextmanager
  def prepared(self, plan, kernels: str = "auto", annotate: bool = True, **executor_options):
    """Yields (run, args): `run(*args)` is one step of this batch in the given mode (an Executor for `plan`,
    None = sequential; executor_options: kv_dtype, fused_rope_append, ...). The executor's buffers go on
    exit."""
    import jax
    import numpy as np
    from nanoflow_jax.runtime.executor import Executor
    eng = self.engine
    ex = Executor(self.model, self.pages, 16, self.max_seqs, eng.max_model_len, self.dense, plan=plan,
                  kernels=kernels, **executor_options)
    ex.annotate = ex.annotate and annotate
    eng.executor = ex
    try:
      inp, _ = eng._build_inputs(self.batch)
      yield ex.run, (inp, jax.tree.map(np.copy, eng.sp))
    finally:
      ex.kv = ex.params = None
      eng.executor = None

  def time(self, plan, kernels: str = "auto", annotate: bool = True, iters: int = 10, trace_dir: str | None = None,
           timeline_png: str | None = None, **executor_options) -> float:
    """Median ms per step; with trace_dir, also a profiler trace of 3 steps (kernel time by kind printed,
    and the measured timeline drawn to timeline_png). executor_options: more Executor arguments (kv_dtype,
    fused_rope_append)."""
    import jax
    from nanoflow_jax.perf import median_seconds
    with self.prepared(plan, kernels, annotate, **executor_options) as (run, args):
      ms = 1e3 * median_seconds(run, *args, iters=iters, samples=5)
      if trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
          for _ in range(3):
            out = run(*args)
          jax.block_until_ready(out)
        from launch import trace_overlap
        latest = trace_overlap.latest_trace(trace_dir)
        trace_overlap.main(latest, steps=3)
        if timeline_png:
          trace_overlap.timeline_png(latest, timeline_png, title=f"measured: {plan.name if plan else 'sequential'}")
      return ms
