"""One engine step, timed in each execution mode, against the optimal step time of the same run.

  PYTHONPATH=. python3 launch/step_bench.py --model=llama-3-8b --decodes=512 --context=1024 --prefill=1536

The batch is the dense-batch mix of the 1024-in/512-out workload: `decodes` sequences decoding at
`context`, plus one `prefill`-token prompt chunk. Variants: sequential; nanoflow with the generic
two-nano-batch config at several attention SM shares; the same split without stream annotation (to
separate the cost of splitting from the gain of overlapping). Optimal = tokens x 2 x params / GEMM peak.
"""
from __future__ import annotations

import copy
import glob
import os
import statistics
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llama-3-8b", "Named shape (random weights) or checkpoint.")
flags.DEFINE_integer("decodes", 512, "Sequences decoding in the step.")
flags.DEFINE_integer("context", 1024, "Their context length.")
flags.DEFINE_integer("prefill", 1536, "Prefill tokens in the step.")
flags.DEFINE_list("attn_shares", ["16", "33", "48", "66"], "Attention SM shares to try in nanoflow mode.")
flags.DEFINE_list("kernels", ["pallas", "triton"],
                  "Kernel sets to time sequentially (executor.KERNEL_CHOICES); nanoflow variants use the last.")
flags.DEFINE_integer("iters", 10, "Steps per timing sample.")
flags.DEFINE_string("out", None, "Write the table (markdown) here.")
flags.DEFINE_string("trace_dir", None, "Write a profiler trace (perfetto) of 3 steps of each variant here, and "
                    "print its kernel time by kind (launch/trace_overlap.py).")


def main(argv):
  del argv
  import logging
  logging.basicConfig(level=logging.WARNING)
  from nanoflow_jax import compat
  compat.configure_gpu_memory()
  compat.enable_concurrent_command_buffers()
  import jax
  import numpy as np
  from nanoflow_jax.perf import gemm_peak_tflops
  from nanoflow_jax.engine import Engine, EngineConfig
  from nanoflow_jax.model import load_model
  from nanoflow_jax.runtime.executor import Executor
  from nanoflow_jax.runtime.plan import generic_default
  from nanoflow_jax.sampling_params import SamplingParams

  peak = gemm_peak_tflops()
  model = load_model(FLAGS.model, dtype="bfloat16", random_weights=True)
  dense = FLAGS.decodes + FLAGS.prefill
  # While the later prompts prefill, the first sequences already decode: they reach context + up to
  # decodes * context / dense tokens. None may finish before the step is formed (max_tokens covers it).
  grow = FLAGS.decodes * FLAGS.context // dense + 64
  pages = (FLAGS.decodes * (FLAGS.context + grow) + FLAGS.prefill) // 16 + FLAGS.decodes + 64
  eng = Engine(model, EngineConfig(dense_batch=dense, num_pages=pages, max_num_seqs=FLAGS.decodes + 1,
                                   max_model_len=max(FLAGS.context + grow, FLAGS.prefill) + 64,
                                   compilation_cache_dir=None))
  # Bring `decodes` sequences to the decode phase at (at least) `context`, then form the mixed step.
  rng = np.random.default_rng(0)
  for i in range(FLAGS.decodes):
    eng.add_request(f"d{i}", rng.integers(0, min(1000, model.config.vocab_size), FLAGS.context - 1).tolist(),
                    SamplingParams(max_tokens=grow, ignore_eos=True, temperature=0, detokenize=False))
  while any(s.is_prefilling or not s.output_ids for s in eng.scheduler.running) or eng.scheduler.waiting:
    eng.step()
  eng.add_request("p", rng.integers(0, min(1000, model.config.vocab_size), FLAGS.prefill).tolist(),
                  SamplingParams(max_tokens=2, ignore_eos=True, temperature=0, detokenize=False))
  batch = eng.scheduler.schedule()
  decodes = sum(c.decode for c in batch.chunks)
  if decodes != FLAGS.decodes:
    raise SystemExit(f"the step has {decodes} decodes, not {FLAGS.decodes}: the set-up is wrong")
  print(f"step: {sum(c.decode for c in batch.chunks)} decodes + {batch.num_tokens - sum(c.decode for c in batch.chunks)}"
        f" prefill tokens = {batch.num_tokens}")
  optimal_ms = batch.num_tokens * 2 * model.config.num_params() / (peak * 1e12) * 1e3

  base = generic_default(dense, getattr(jax.devices()[0], "core_count", 132) or 132)
  kernels = FLAGS.kernels[-1]
  variants = [(f"sequential ({k})", None, True, k) for k in FLAGS.kernels]
  for share in FLAGS.attn_shares:
    plan = copy.deepcopy(base)
    for op in plan.ops:
      if op.id == "attention@1":
        op.sm_share = int(share)
      elif op.id in ("o@0", "gate_up@0", "down@0"):
        op.sm_share = plan.num_sms - int(share)
    plan.validate()
    variants.append((f"nanoflow attn@1 on {share} SMs ({kernels})", plan, True, kernels))
  variants.append((f"nanoflow split, no streams ({kernels})", base, False, kernels))
  from nanoflow_jax.runtime import autosearch
  shipped = autosearch.shipped_config(model.config.name, jax.devices()[0], dense)
  if shipped is not None:
    variants.append((f"nanoflow shipped {shipped.name} {shipped.nano_batches} ({kernels})", shipped, True, kernels))

  eng.executor.kv = eng.executor.params = None  # only its host state (page table, rows) is needed now
  rows = []
  seq_ms = None
  for name, plan, annotate, kernels in variants:
    print(f"{name} ...", flush=True)
    ex = Executor(model, pages, 16, FLAGS.decodes + 1, eng.max_model_len, dense, plan=plan, kernels=kernels)
    ex.annotate = ex.annotate and annotate
    eng.executor = ex
    inp, _ = eng._build_inputs(batch)
    sp = jax.tree.map(np.copy, eng.sp)
    jax.block_until_ready(ex.run(inp, sp))
    samples = []
    for _ in range(5):
      t = time.perf_counter()
      for _ in range(FLAGS.iters):
        out = ex.run(inp, sp)
      jax.block_until_ready(out)
      samples.append((time.perf_counter() - t) / FLAGS.iters * 1e3)
    ms = statistics.median(samples)
    if FLAGS.trace_dir:
      tdir = os.path.join(FLAGS.trace_dir, "".join(c if c.isalnum() else "_" for c in name))
      with jax.profiler.trace(tdir, create_perfetto_trace=True):
        for _ in range(3):
          out = ex.run(inp, sp)
        jax.block_until_ready(out)
      from launch import trace_overlap
      for trace in glob.glob(os.path.join(tdir, "**", "*perfetto_trace.json.gz"), recursive=True):
        trace_overlap.main(trace, steps=3)
    seq_ms = seq_ms or ms
    rows.append(f"| {name} | {ms:.1f} | {100 * optimal_ms / ms:.1f}% | {seq_ms / ms:.3f} |")
    print(rows[-1], flush=True)
    ex.kv = ex.params = None
    del ex, out
    eng.executor = None
  contexts = [len(s.prompt_ids) + len(s.output_ids) for s in eng.scheduler.running if s.output_ids]
  table = "\n".join([f"{FLAGS.model}, {batch.num_tokens} tokens ({decodes} decodes at context {min(contexts)}-"
                     f"{max(contexts)} + {batch.num_tokens - decodes} prefill), GEMM peak {peak:.0f} TFLOP/s, optimal step {optimal_ms:.1f} ms",
                     "", "| variant | step ms | % of optimal | speed-up vs sequential |", "|---|---|---|---|", *rows])
  print(table)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  app.run(main)
