"""Differences between the JAX versions we run on (0.10.x on CPU/CI, 0.11.x on the GPU machine), and
process-level GPU settings that must be made before JAX initializes its backends."""
from __future__ import annotations

import os

from pallas_kernels.jax_compat import gpu_interpret_mode, mosaic_kernel_aliased  # noqa: F401 (the kernels' own, re-exported)


def configure_gpu_memory(fraction: float = 0.95) -> None:
  """JAX preallocates 75% of GPU memory by default; the engine sizes the KV cache from what is really
  free, so let JAX take nearly all of it. No effect once a backend is up, or on the CPU."""
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(fraction))


# JAX's GPU client allocates host memory arrays (the host KV tier's pinned blocks) from a pool of pinned memory
# bounded by this variable, read when the client starts (XLA's gpu_helpers.cc; 64 GB when unset, 16 GB when the
# pool is preallocated). Unless preallocated, the pool grows on demand in regions of doubling size, each pinned by
# the CUDA driver when first needed (seconds for the GB-sized ones).
PINNED_HOST_LIMIT_VAR = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
PINNED_HOST_PREALLOCATE_VAR = "XLA_PJRT_GPU_HOST_MEMORY_PREALLOCATE"
PINNED_HOST_DEFAULT_GB = 64
PINNED_HOST_PREALLOCATED_DEFAULT_GB = 16
PINNED_HOST_HEADROOM_GB = 8   # beyond the host tier: the client's own staging buffers


def _env_true(name: str) -> bool:
  return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def configure_host_memory(host_kv_cache_gb: float, gpus: int | None = None, memory_gb: float | None = None) -> bool:
  """JAX's GPU client pins host memory for a host KV tier of `host_kv_cache_gb` (and its own staging) when it
  starts, all of it, so that the tier's pool does not grow while serving. Why: session 27's online run with the
  tier stalled the engine 0.5 and 2.5 s at two points (every request in flight then had its first token late),
  the pattern of the pool's doubling regions being pinned as the tier filled. Recent XLA preallocates one such
  pool per GPU and one for staging (se_gpu_pjrt_client.cc), so this happens only where (GPUs + 1) pools fit in
  80% of the machine's memory (`gpus`, `memory_gb`: nvidia-smi's count and physical memory unless given); else
  the limit alone is raised where the default is too small, and the pool grows as before. No effect once a
  backend is up, or where the user set the pool's size or preallocation. Returns whether it preallocates."""
  if (host_kv_cache_gb <= 0 or PINNED_HOST_LIMIT_VAR in os.environ or PINNED_HOST_PREALLOCATE_VAR in os.environ
      or backends_started()):   # (set now, the variables would describe a pool the client does not have)
    return False
  pool = int(-(-(host_kv_cache_gb + PINNED_HOST_HEADROOM_GB) // 1))
  gpus = gpu_count_before_backend() if gpus is None else gpus
  memory_gb = physical_memory_gb() if memory_gb is None else memory_gb
  if gpus and memory_gb and (gpus + 1) * pool <= 0.8 * memory_gb:
    os.environ[PINNED_HOST_LIMIT_VAR] = str(pool)
    os.environ[PINNED_HOST_PREALLOCATE_VAR] = "true"
    return True
  if pool > PINNED_HOST_DEFAULT_GB:
    os.environ[PINNED_HOST_LIMIT_VAR] = str(pool)
  return False


def backends_started() -> bool:
  """Whether JAX's backends are up (environment variables read at their start no longer matter)."""
  from jax._src import xla_bridge   # (no public API says this; present in 0.10 and 0.11)
  started = getattr(xla_bridge, "backends_are_initialized", None)
  return started() if started is not None else True   # (unknown: leave the client's settings alone)


def check_pinned_host_fits(platform: str, host_kv_cache_gb: float) -> None:
  """Raises ValueError where a GPU client's pinned host memory (what configure_host_memory set, or XLA's default,
  less its own headroom) cannot hold a host KV tier of `host_kv_cache_gb`: at start, not at the save that would
  fail while serving."""
  default = PINNED_HOST_PREALLOCATED_DEFAULT_GB if _env_true(PINNED_HOST_PREALLOCATE_VAR) else PINNED_HOST_DEFAULT_GB
  limit = float(os.environ.get(PINNED_HOST_LIMIT_VAR, default)) - PINNED_HOST_HEADROOM_GB
  if platform == "gpu" and host_kv_cache_gb > limit:
    raise ValueError(f"host_kv_cache_gb={host_kv_cache_gb:g} is more than the {limit:g} GB of pinned host memory "
                     f"JAX's GPU client allows here: set {PINNED_HOST_LIMIT_VAR} before JAX starts (serve.py and "
                     f"benchmark.py set it from --host_kv_cache_gb)")


def physical_memory_gb() -> float | None:
  """This machine's memory in GB (None where the OS does not say)."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError, AttributeError):
    return None


def _nvidia_smi(args: list[str]) -> str:
  """nvidia-smi's output for `args`, without starting JAX's backend; "" without nvidia-smi, or where it fails."""
  import shutil
  import subprocess
  if not shutil.which("nvidia-smi"):
    return ""
  try:
    r = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return ""
  return r.stdout if r.returncode == 0 else ""


def nvidia_smi_query(fields: list[str]) -> list[str] | None:
  """GPU 0's values of nvidia-smi's `--query-gpu` fields (no units), read without starting JAX's backend;
  None without nvidia-smi or a GPU, or where nvidia-smi refuses a field."""
  out = _nvidia_smi([f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", "-i", "0"]).strip()
  line = out.splitlines()[0] if out else ""
  return [v.strip() for v in line.split(",")] if line else None


def gpu_count_before_backend() -> int:
  """GPUs this process will see (nvidia-smi's list, narrowed by CUDA_VISIBLE_DEVICES), read without starting JAX's
  backend; 0 without nvidia-smi or a GPU."""
  listed = sum(1 for line in _nvidia_smi(["-L"]).splitlines() if line.startswith("GPU "))
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None and listed:
    return min(listed, len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")]))
  return listed


def gpu_name_before_backend() -> str | None:
  """The first GPU's name as nvidia-smi gives it ("NVIDIA H200"), read without starting JAX's backend (the
  process-level settings here are chosen before it starts); None without nvidia-smi or a GPU."""
  values = nvidia_smi_query(["name"])
  return (values[0] or None) if values else None


def coordination_store():
  """The multi-host job's key-value store: the coordination service `jax.distributed.initialize` starts
  (key_value_set, blocking_key_value_get, key_value_delete on strings). Private in jax: the client object
  behind jax.distributed, the same in 0.10.2 and 0.11. None outside a multi-host job."""
  from jax._src import distributed
  return distributed.global_state.client


def compute_on(f, compute_type: str):
  """Stream annotation: `compute_on` in jax >= 0.11.2, `compute_on2` before."""
  import jax
  from jax.experimental import compute_on as co
  fn = getattr(co, "compute_on2", None) or co.compute_on
  return fn(f, compute_type=compute_type, out_memory_spaces=jax.memory.Space.Device)


COMMAND_BUFFER_FLAGS = ("--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL "
                        "--xla_gpu_command_buffer_scheduling_mode=CONCURRENT --xla_gpu_graph_min_graph_size=1")
# XLA's latency-hiding scheduler (on by default in jax 0.11.2) placed the stream-annotated decode attention
# after the GEMM it should run beside (measured: decode-overlap step 0.81x of sequential with it, 0.90x
# without; docs/history/perf-notes.md, session 6). Under tensor parallelism the same scheduler is what overlaps
# the asynchronous all-reduces, so it stays on there.
NO_LATENCY_HIDING_FLAG = "--xla_gpu_enable_latency_hiding_scheduler=false"


def enable_concurrent_command_buffers(tensor_parallel: int = 1) -> None:
  """Nano-ops on different streams overlap only under XLA's command buffers in CONCURRENT mode
  (measured: without them chained stream-annotated calls run one after another). Must run before JAX
  initializes the GPU backend; the engine calls it for mode="nanoflow". On one device it also turns off
  the latency-hiding scheduler, unless XLA_FLAGS already says how to set it."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_gpu_command_buffer_scheduling_mode" not in flags:
    flags = (flags + " " + COMMAND_BUFFER_FLAGS).strip()
  if tensor_parallel == 1 and "xla_gpu_enable_latency_hiding_scheduler" not in flags:
    flags = (flags + " " + NO_LATENCY_HIDING_FLAG).strip()
  os.environ["XLA_FLAGS"] = flags


STREAM_ANNOTATION_OPTIONS = {"xla_gpu_experimental_stream_annotation": True}
# XLA merges independent all-reduces into one (its combiner): two nano-batches' all-reduces would then
# wait for each other, and the later nano-batch's GEMM, which is the overlap the plan asks for. Seen on
# the CPU (a tuple all-reduce of down@0's and o@1's partial sums); on the GPU this option turns it off.
SEPARATE_COLLECTIVES_OPTIONS = {"xla_gpu_all_reduce_combine_threshold_bytes": 0}


def host_memory_kind(device) -> str:
  """Where the host KV tier keeps pages: the device's pinned host memory (page-locked: the DMA engines copy it
  without staging), else its unpinned host memory; both are JAX memory kinds in 0.10.2 (CPU) and 0.11.2 (GPU)."""
  kinds = [m.kind for m in device.addressable_memories()]
  for kind in ("pinned_host", "unpinned_host"):
    if kind in kinds:
      return kind
  raise ValueError(f"{device} has no host memory kind (it has {kinds}): the host KV tier cannot run on it")


def compile_with_options(lowered, options: dict):
  """lowered.compile(options), or without them where this XLA does not know one of them (a compile option is
  a DebugOptions field, and those come and go between versions); the options here only tune speed."""
  import logging
  try:
    return lowered.compile(options)
  except Exception as e:   # (XLA raises its own error types, differing by version, for an unknown option)
    if not any(name in str(e) for name in options):
      raise
    logging.getLogger(__name__).warning("compiling without %s: %s", sorted(options), str(e).splitlines()[0][:200])
    return lowered.compile()
