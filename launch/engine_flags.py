"""The engine's command-line flags and process set-up, shared by serve.py and benchmark.py."""
from __future__ import annotations

import os

from absl import app, flags, logging

FLAGS = flags.FLAGS
# host_kv.COPY_MODES, spelled here because this module is imported before JAX may start (tests/test_cli.py checks
# that the two agree).
HOST_KV_COPY_MODES = ("put", "thread", "jit")


def define(max_num_seqs: int) -> None:
  flags.DEFINE_string("model", "tiny", "Checkpoint directory (converted or Hugging Face) or a named shape.")
  flags.DEFINE_bool("random_weights", False, "Random weights of the model's shape (benchmarks).")
  flags.DEFINE_string("dtype", None, "bfloat16 or float32 (default: bfloat16 on GPU, float32 on CPU).")
  flags.DEFINE_integer("dense_batch", None, "Tokens per engine step (default: 2048 on GPU, 256 on CPU).")
  flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
  flags.DEFINE_integer("num_pages", None, "KV pages (default: from --kv_memory_fraction of free memory).")
  flags.DEFINE_float("kv_memory_fraction", 0.9, "Share of free device memory for the KV cache.")
  flags.DEFINE_integer("max_model_len", None, "Longest prompt + output (default: the model's).")
  flags.DEFINE_integer("max_num_seqs", max_num_seqs, "Sequences running at once.")
  flags.DEFINE_enum("mode", "sequential", ["sequential", "nanoflow"], "Step execution mode.")
  flags.DEFINE_string("pipeline_config", None, "PipelineConfig JSON for --mode=nanoflow, or 'generic' for the "
                      "generic split (default: the shipped config, else generic).")
  flags.DEFINE_enum("kernels", "auto", ["auto", "reference", "pallas", "triton"],
                    "Step kernels: pallas (Mosaic GEMMs + Pallas attention), triton (same GEMMs + Triton attention "
                    "through jax-triton), reference (jnp); auto: triton on a GPU where jax-triton imports, else "
                    "pallas; reference on the CPU.")
  flags.DEFINE_enum("gemm", "mosaic_fused", ["mosaic_fused", "mosaic", "xla"],
                    "GEMMs on the kernel paths: mosaic_fused (our SM-share kernel, the SiLU-and-multiply fused into "
                    "gate_up's epilogue), mosaic (the same, unfused) or xla (XLA's dot).")
  flags.DEFINE_enum("fp8_gemm", "xla", ["xla", "xla_fused", "mosaic"],
                    "fp8 weights' GEMMs on the kernel paths: xla (XLA's fp8 dot, cuBLASLt), xla_fused (the same, with "
                    "each activation quantization fused into its producer: the RMSNorms, and gate_up's scales with "
                    "SiLU-and-multiply, as Triton kernels) "
                    "or mosaic (ours: the scales, the residual and gate_up's SiLU-and-multiply in its epilogue); "
                    "the others are being measured against xla.")
  flags.DEFINE_enum("prefill_attention", "auto", ["auto", "triton"],
                    "Prefill attention on the kernel paths: auto = the warp-specialized Mosaic GPU kernel where it "
                    "takes the KV cache (bf16/f16, Hopper; 1.8x the Triton one), else the Triton one; triton = "
                    "always the Triton one.")
  flags.DEFINE_integer("tp", 1, "Tensor parallelism: devices the model is sharded over.")
  flags.DEFINE_integer("layer_unroll", 1, "Decoder layers per iteration of the step's layer scan. With 2, a "
                       "layer's last ops (under TP: its last all-reduce) and the next layer's first ops of "
                       "another nano-batch are in one computation, where XLA may overlap them (longer compile).")
  flags.DEFINE_bool("enable_prefix_caching", True, "Automatic prefix caching: full KV pages are found again by a "
                    "hash of their prefix, so a prompt that shares a cached prefix computes only the rest "
                    "(--noenable_prefix_caching or --enable_prefix_caching=false turns it off).")
  flags.DEFINE_float("host_kv_cache_gb", 0.0, "Host memory (GB) for the KV pages the GPU's prefix cache evicts: a "
                     "prompt whose prefix is there gets it copied back instead of recomputed (0: off).")
  flags.DEFINE_enum("host_kv_copy", "thread", list(HOST_KV_COPY_MODES), "How the host tier's bytes move: "
                    "thread (device_put on a thread of its own, the step after the gather), put (that device_put "
                    "from the engine's thread) or jit (the copy inside the gather's and scatter's own executables); "
                    "lab/prefix_bench.py compares them in the engine (host_kv.py).")
  flags.DEFINE_integer("small_step_attention", 0, "Steps of at most this many tokens run their attention as the "
                       "Pallas kernel, which XLA's command buffers record with the rest of the step (the Triton "
                       "kernel's jax-triton calls split them); 0: off (measured slower on an H100: the host's "
                       "dispatch of one large graph costs more; issue 27).")
  flags.DEFINE_bool("split_decode_keys", True, "Small decode steps share each sequence's keys over several "
                    "programs of the attention (Triton, or the Pallas kernel of --small_step_attention) and merge "
                    "them (flash-decoding: a batch-1 decode otherwise walks its keys on 8 programs); measured -4 to "
                    "-14% a step at batch 1-32 on an H100 (issue 27).")
  flags.DEFINE_bool("small_gemm", False, "Steps of at most 16 rows run each GEMM's whole op (the RMSNorm, with fp8 "
                    "weights the per-token quantization and the scales, the GEMM, the residual or SiLU-and-multiply) "
                    "as one Pallas kernel, which XLA's command buffers record; off (measured slower than XLA's GEMMs "
                    "in the step on an H100; issue 27).")
  flags.DEFINE_bool("overlap_dispatch", False, "Dispatch each step on a thread of its own, beside the host's reading "
                    "of the last step and scheduling of the next: the host's time per step becomes the longer of "
                    "the two instead of their sum, and tokens reach clients one dispatch sooner (issue 27; +0.96% on "
                    "a loaded H200, light load being measured).")
  flags.DEFINE_enum("layer_loop", "auto", ["auto", "scan", "unrolled", "hybrid"], "The step's decoder layers: "
                    "scan = one loop over the stacked weights (compiled once); unrolled = every layer in the step, "
                    "each with weights of its own (XLA's dot reads them in place, command buffers take the whole "
                    "step; longer compiles); hybrid = steps below 512 tokens unrolled, larger ones scanned; auto = "
                    "for fp8 weights on a GPU unrolled (XLA's fp8 dot) or hybrid (--fp8_gemm=mosaic), else scan.")
  flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "bfloat16", "float16", "float32", "fp8"],
                    "KV cache element type: auto = the model's; fp8 (e4m3, no scales) halves the cache's bytes: "
                    "twice the tokens fit and decode attention reads half as much.")
  flags.DEFINE_enum("quantization", None, ["none", "fp8"], "Weights and activations: fp8 = e4m3 weights with a scale "
                    "per output channel, activations quantized per token (W8A8), from a bf16/fp16 checkpoint at load; "
                    "an FP8 checkpoint (compressed-tensors, fbgemm_fp8) runs as fp8 by itself.")
  flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0 (jax.distributed).")
  flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (one per host).")
  flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def prepare_process(nanoflow: bool) -> bool:
  """Before JAX starts a backend: GPU memory fraction, multi-host join, command buffers for nanoflow where
  its plan splits the step. Returns whether this process joined a multi-host job."""
  from nanoflow_jax import compat, distributed
  compat.configure_gpu_memory()
  gpus = compat.gpu_count_before_backend() if FLAGS.host_kv_cache_gb > 0 else 0   # (nvidia-smi once)
  if compat.configure_host_memory(FLAGS.host_kv_cache_gb, gpus=gpus):
    logging.info("host KV tier: JAX's pinned host pool (%s GB) reserved when its backend starts",
                 os.environ[compat.PINNED_HOST_LIMIT_VAR])
  elif gpus:
    logging.info("host KV tier: JAX's pinned host pool grows as the tier fills (not reserved at start: set %s "
                 "to reserve it)", compat.PINNED_HOST_PREALLOCATE_VAR)
  try:
    multi = distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if nanoflow and streams_needed():
    compat.enable_concurrent_command_buffers(FLAGS.tp)
  return multi


def streams_needed() -> bool:
  """Whether --mode=nanoflow will split the step into nano-batches here (else it runs the sequential
  schedule, and the stream flags would only slow it: autosearch.nanoflow_splits)."""
  from nanoflow_jax import compat
  from nanoflow_jax.runtime import autosearch
  return autosearch.nanoflow_splits(FLAGS.model, FLAGS.dense_batch, FLAGS.tp, FLAGS.pipeline_config,
                                    compat.gpu_name_before_backend(), FLAGS.quantization)


def engine_kwargs() -> dict:
  """build_engine's arguments from the flags (mode excepted: the benchmark runs several)."""
  return dict(dtype=FLAGS.dtype, random_weights=FLAGS.random_weights, dense_batch=FLAGS.dense_batch,
              page_size=FLAGS.page_size, num_pages=FLAGS.num_pages, kv_memory_fraction=FLAGS.kv_memory_fraction,
              max_num_seqs=FLAGS.max_num_seqs, max_model_len=FLAGS.max_model_len, kernels=FLAGS.kernels,
              gemm=FLAGS.gemm, prefill_attention=FLAGS.prefill_attention,
              pipeline_config=FLAGS.pipeline_config, tensor_parallel=FLAGS.tp, kv_cache_dtype=FLAGS.kv_cache_dtype,
              layer_unroll=FLAGS.layer_unroll, layer_loop=FLAGS.layer_loop, quantization=FLAGS.quantization,
              enable_prefix_caching=FLAGS.enable_prefix_caching, host_kv_cache_gb=FLAGS.host_kv_cache_gb,
              host_kv_copy=FLAGS.host_kv_copy, small_step_attention=FLAGS.small_step_attention,
              fp8_gemm=FLAGS.fp8_gemm,
              overlap_dispatch=FLAGS.overlap_dispatch, split_decode_keys=FLAGS.split_decode_keys,
              small_gemm=FLAGS.small_gemm)


# vLLM's names for our flags (`vllm serve` users' scripts run as they are); values map where vLLM's differ.
# (vLLM's --async-scheduling schedules the next step while the GPU runs this one; ours already does, and its
# nearest switch takes the dispatch off the engine's thread as well.)
VLLM_NAMES = {"tensor-parallel-size": "tp", "tp": "tp", "gpu-memory-utilization": "kv_memory_fraction",
              "max-num-batched-tokens": "dense_batch", "block-size": "page_size", "async-scheduling": "overlap_dispatch"}
VLLM_VALUES = {"kv_cache_dtype": {"fp8_e4m3": "fp8"}}
VLLM_LISTS = ("served-model-name",)   # flags vLLM takes as several values: `--served-model-name a b`


def vllm_argv(argv: list[str]) -> list[str]:
  """argv with vLLM's spellings turned into ours: dashes for underscores (`--max-model-len`), vLLM's names
  (VLLM_NAMES), `--no-x` for `--nox`, `--flag value` for `--flag=value` where our flag takes a value, and a
  list flag's several values joined. Anything unknown is left for absl to refuse by name."""
  out, i = [argv[0]], 1
  while i < len(argv):
    arg = argv[i]
    i += 1
    if not arg.startswith("--") or arg == "--" or ("_" in arg.split("=")[0] and "-" not in arg[2:].split("=")[0]):
      out.append(arg)
      continue
    name, eq, value = arg[2:].partition("=")
    negated = name.startswith("no-")
    base = name[3:] if negated else name
    ours = VLLM_NAMES.get(base, base.replace("-", "_"))
    if ours not in FLAGS:
      out.append(arg)
      continue
    if negated:
      out.append(f"--no{ours}")
      continue
    is_bool = isinstance(FLAGS[ours].value, bool) or FLAGS[ours].flag_type() == "bool"
    if not eq and not is_bool and i < len(argv):   # `--flag value`
      value, eq = argv[i], "="
      i += 1
      if base in VLLM_LISTS:
        while i < len(argv) and not argv[i].startswith("-"):
          value += "," + argv[i]
          i += 1
    value = VLLM_VALUES.get(ours, {}).get(value, value)
    out.append(f"--{ours}={value}" if eq else f"--{ours}")
  return out
