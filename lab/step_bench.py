"""One engine step, timed in each execution mode, against the optimal step time of the same run.

  PYTHONPATH=. python3 lab/step_bench.py --model=llama-3-8b --decodes=512 --context=1024 --prefill=1536

The batch is the dense-batch mix of the 1024-in/512-out workload: `decodes` sequences decoding at
`context`, plus one `prefill`-token prompt chunk (the step itself: launch/mixed_step.py). Variants:
sequential; nanoflow with both orders of the two-nano-batch template (generic-2: the prefill half's
attention beside the other half's GEMMs; decode-overlap: the decode rows' attention beside the prefill
rows' GEMMs; decode-overlap-o+gate_up: only their o and gate_up beside it, down after it on the whole GPU)
at several attention SM shares; the generic split without stream annotation (to separate the
cost of splitting from the gain of overlapping); the shipped config. Optimal = tokens x 2 x params / GEMM
peak.
"""
from __future__ import annotations

import itertools
import os

if __package__ in (None, ""):
  import _root  # noqa: F401  (the repository root on sys.path: lab/_root.py)

from absl import app, flags

from lab._report import report
from launch.mixed_step import MixedStep

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llama-3-8b", "Named shape (random weights) or checkpoint.")
flags.DEFINE_integer("decodes", 512, "Sequences decoding in the step.")
flags.DEFINE_integer("context", 1024, "Their context length.")
flags.DEFINE_integer("prefill", 1536, "Prefill tokens in the step.")
flags.DEFINE_integer("max_num_seqs", 0, "Sequence slots of the engine (default: the decodes + 1); the engine's "
                     "benchmarks run 1024.")
flags.DEFINE_integer("dense_batch", 0, "The executor's dense batch (its bucket ladder; default: the step's tokens). "
                     "The engine's (2048) gives a small step the bucket the engine runs it in.")
flags.DEFINE_list("attn_shares", ["16", "33", "48", "66"], "Attention SM shares to try in nanoflow mode.")
flags.DEFINE_list("kernels", ["pallas", "triton"],
                  "Kernel sets to time sequentially (executor.KERNEL_CHOICES); nanoflow variants use the last.")
flags.DEFINE_integer("iters", 10, "Steps per timing sample.")
flags.DEFINE_list("kv_cache_dtypes", ["auto"], "KV cache element types (auto, fp8) to time the sequential step "
                  "with; the other variants use the last.")
flags.DEFINE_list("gemms", ["mosaic_fused"], "GEMM choices (mosaic, mosaic_fused, xla: EngineConfig.gemm) to time the sequential "
                  "step with.")
flags.DEFINE_list("fp8_gemms", [], "Also time the sequential step with these fp8 GEMM choices (xla, xla_fused, mosaic: "
                  "EngineConfig.fp8_gemm; with --quantization=fp8).")
flags.DEFINE_list("templates", ["generic-2", "decode-overlap"], "Two-nano-batch templates to time at each "
                  "--attn_shares (runtime/plan.py: generic_default, decode_overlap; decode-overlap-o+gate_up: "
                  "the prefill rows' down after the decode attention, on the whole GPU).")
flags.DEFINE_multi_string("beside_attention", [], "Also time each nanoflow variant with these changes to the "
                          "decode attention's configuration where it runs beside the GEMMs, e.g. "
                          "programs_per_sm=4,prefetch_pages=1 (Executor beside_attention); may be repeated.")
flags.DEFINE_bool("nanoflow", True, "Also time the nano-batch variants (--attn_shares, the split, the shipped config).")
flags.DEFINE_bool("triton_prefill", False, "Also time the sequential step with prefill attention on the Triton "
                  "kernel where the Mosaic GPU one would run (bf16 caches).")
flags.DEFINE_bool("fused_rope_append", False, "Also time sequential steps with the fused RoPE + KV-append kernel.")
flags.DEFINE_enum("quantization", None, ["fp8"], "Weights and activations of the model (fp8: e4m3 W8A8, "
                  "nanoflow_jax/quantization.py); default: the model's dtype.")
flags.DEFINE_list("layer_unrolls", [], "Also time the sequential step with these layer_unroll values (the layer "
                  "count unrolls the whole scan, so XLA's command buffers can capture the step).")
flags.DEFINE_list("layer_loops", [], "Also time the sequential step with these layer loops (scan, unrolled; the "
                  "default is the engine's auto choice).")
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
  from nanoflow_jax.model import load_model
  from nanoflow_jax.engine import KV_CACHE_DTYPES
  from nanoflow_jax.perf import gemm_peak_tflops
  from nanoflow_jax.runtime import autosearch
  from nanoflow_jax.runtime.plan import BESIDE_ALL, decode_overlap, generic_default, with_beside_share
  from pallas_kernels.paged_attention import config_changes

  peak = gemm_peak_tflops()
  model = load_model(FLAGS.model, dtype="bfloat16", random_weights=True, quantization=FLAGS.quantization)
  step = MixedStep(model, FLAGS.decodes, FLAGS.context, FLAGS.prefill, FLAGS.max_num_seqs, FLAGS.dense_batch)
  print("step:", step.describe, flush=True)
  optimal_ms = step.batch.num_tokens * 2 * model.config.num_params() / (peak * 1e12) * 1e3
  base = generic_default(step.dense, getattr(jax.devices()[0], "core_count", 132) or 132)
  kernels = FLAGS.kernels[-1]
  kv_dtype = KV_CACHE_DTYPES[FLAGS.kv_cache_dtypes[-1]]
  # (name, plan, stream annotation, kernels, further Executor options)
  variants = [(f"sequential ({k}, gemm {g})", None, True, k, {"kv_dtype": kv_dtype, "gemm": g})
              for k in FLAGS.kernels for g in FLAGS.gemms]
  variants += [(f"sequential ({kernels}, KV {d})", None, True, kernels, {"kv_dtype": KV_CACHE_DTYPES[d]})
               for d in FLAGS.kv_cache_dtypes[:-1]]
  variants += [(f"sequential ({kernels}, layer_unroll {u})", None, True, kernels,
                {"kv_dtype": kv_dtype, "layer_unroll": int(u)}) for u in FLAGS.layer_unrolls]
  variants += [(f"sequential ({kernels}, layer_loop {v})", None, True, kernels,
                {"kv_dtype": kv_dtype, "layer_loop": v}) for v in FLAGS.layer_loops]
  variants += [(f"sequential ({kernels}, fp8 GEMM {g})", None, True, kernels,
                {"kv_dtype": kv_dtype, "fp8_gemm": g}) for g in FLAGS.fp8_gemms]
  if FLAGS.triton_prefill:
    variants.append((f"sequential, Triton prefill attention ({kernels})", None, True, kernels,
                     {"kv_dtype": kv_dtype, "mosaic_prefill": False}))
  if FLAGS.fused_rope_append:
    variants.append((f"sequential, fused rope+append ({kernels})", None, True, kernels,
                     {"fused_rope_append": True, "kv_dtype": kv_dtype}))
  besides = [config_changes(spec) for spec in FLAGS.beside_attention]   # refused before any timing if bad
  overlaps = [decode_overlap(step.dense, base.num_sms, FLAGS.decodes, beside=beside)
              for beside in (BESIDE_ALL, BESIDE_ALL[:2])]   # down beside the attention, or after it
  templates = [t for t in (base, *overlaps) if t.name in FLAGS.templates]
  unknown = set(FLAGS.templates) - {t.name for t in (base, *overlaps)}
  if unknown:
    raise app.UsageError(f"unknown --templates {sorted(unknown)}; known: {[t.name for t in (base, *overlaps)]}")
  for template, share in itertools.product(templates, FLAGS.attn_shares if FLAGS.nanoflow else []):
    plan = with_beside_share(template, int(share))
    beside = next(o.id for o in plan.ops if o.op == "attention" and o.sm_share < plan.num_sms)
    variants.append((f"nanoflow {plan.name} {plan.nano_batches} {beside} on {share} SMs ({kernels})", plan, True,
                     kernels, {"kv_dtype": kv_dtype}))
    for changes in besides:
      variants.append((f"nanoflow {plan.name} {plan.nano_batches} {beside} on {share} SMs, attention {changes} "
                       f"({kernels})", plan, True, kernels, {"kv_dtype": kv_dtype, "beside_attention": changes}))
  if FLAGS.nanoflow:
    variants.append((f"nanoflow split, no streams ({kernels})", base, False, kernels, {"kv_dtype": kv_dtype}))
  shipped = autosearch.shipped_config(model.config.name, jax.devices()[0], step.dense) if FLAGS.nanoflow else None
  if shipped is not None:
    variants.append((f"nanoflow shipped {shipped.name} {shipped.nano_batches} ({kernels})", shipped, True, kernels,
                     {"kv_dtype": kv_dtype}))

  rows, seq_ms = [], None
  for name, plan, annotate, kernels, options in variants:
    print(f"{name} ...", flush=True)
    slug = "".join(c if c.isalnum() else "_" for c in name)
    tdir = os.path.join(FLAGS.trace_dir, slug) if FLAGS.trace_dir else None
    # The measured timeline goes beside the table (gpu_steps.sh drops the raw traces).
    png = (f"{os.path.splitext(FLAGS.out)[0]}_timeline_{slug}.png"
           if tdir and FLAGS.out and plan is not None and len(plan.nano_batches) > 1 else None)
    ms = step.time(plan, kernels, annotate, FLAGS.iters, tdir, timeline_png=png, **options)
    seq_ms = seq_ms or ms
    rows.append(f"| {name} | {ms:.1f} | {100 * optimal_ms / ms:.1f}% | {seq_ms / ms:.3f} |")
    print(rows[-1], flush=True)
  table = "\n".join([f"{FLAGS.model}{' ' + FLAGS.quantization if FLAGS.quantization else ''}, {step.describe}, KV cache {FLAGS.kv_cache_dtypes[-1]} unless named, GEMM peak "
                     f"{peak:.0f} TFLOP/s, optimal step {optimal_ms:.1f} ms",
                     "", "| variant | step ms | % of optimal | speed-up vs sequential |", "|---|---|---|---|", *rows])
  report(table, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
