"""Which GPUs our Mosaic GPU kernels run on.

The GEMM (gemm.py, grouped_gemm.py) and the prefill attention (prefill_attention_mgpu.py) are built on
Hopper's warpgroup MMA (wgmma) and TMA: compute capability 9.x only. Ampere has neither, and Blackwell
(10.x) replaced wgmma with tcgen05. Elsewhere the engine runs XLA's dot and the Triton attention.
"""
from __future__ import annotations


def compute_capability(device=None) -> tuple[int, int] | None:
  """(major, minor) of a CUDA device (default: the first device), or None where the device has none (CPU)."""
  if device is None:
    import jax
    device = jax.devices()[0]
  cc = getattr(device, "compute_capability", None)
  if not cc:
    return None
  try:
    major, minor = (int(p) for p in str(cc).split(".")[:2])
  except ValueError:
    return None
  return major, minor


def wgmma_supported(device=None) -> bool:
  """True on Hopper (sm_90): the GPUs our Mosaic GPU kernels are written for."""
  cc = compute_capability(device)
  return cc is not None and cc[0] == 9


def mosaic_kernel_choices(gemm: str, mosaic_prefill: bool, on_gpu: bool, device=None) -> tuple[str, bool, str | None]:
  """The executor's GEMM choice and prefill kernel switch on this device: unchanged on a CPU (interpret
  mode and the references), on Hopper and on a GPU of unknown generation; on other GPUs XLA's dot and the
  Triton prefill, with the reason to log (None when nothing changed)."""
  cc = compute_capability(device) if on_gpu else None
  # A GPU that does not say its generation keeps the kernels: a wrong guess there would cost Hopper its
  # kernels silently, and a kernel that cannot run fails loudly at compile time.
  if cc is None or cc[0] == 9 or (gemm == "xla" and not mosaic_prefill):
    return gemm, mosaic_prefill, None
  return "xla", False, (f"compute capability {cc[0]}.{cc[1]}: the Mosaic GPU kernels (GEMM {gemm!r}, prefill "
                        f"attention) need Hopper (sm_90); running XLA's dot and the Triton prefill attention instead")
