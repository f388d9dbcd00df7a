"""pallas_kernels/hardware.py: the Mosaic GPU kernels only where wgmma is (Hopper), XLA's dot elsewhere."""
import types

from pallas_kernels import hardware


def _dev(cc):
  return types.SimpleNamespace(compute_capability=cc) if cc is not None else types.SimpleNamespace()


def test_compute_capability_and_wgmma():
  assert hardware.compute_capability(_dev("9.0")) == (9, 0)
  assert hardware.compute_capability(_dev("12.1")) == (12, 1)
  assert hardware.compute_capability(_dev(None)) is None and hardware.compute_capability(_dev("x")) is None
  assert hardware.wgmma_supported(_dev("9.0"))
  for cc in ("8.0", "8.9", "10.0", None):   # Ampere, Ada, Blackwell, no GPU
    assert not hardware.wgmma_supported(_dev(cc)), cc
  assert hardware.compute_capability() is None   # this machine's CPU device


def test_mosaic_kernel_choices_fall_back_off_hopper_only():
  assert hardware.mosaic_kernel_choices("mosaic_fused", True, True, _dev("9.0")) == ("mosaic_fused", True, None)
  assert hardware.mosaic_kernel_choices("mosaic", True, False, _dev(None)) == ("mosaic", True, None)   # CPU
  gemm, prefill, why = hardware.mosaic_kernel_choices("mosaic_fused", True, True, _dev("8.0"))
  assert (gemm, prefill) == ("xla", False) and "compute capability 8.0" in why and "Hopper" in why
  assert hardware.mosaic_kernel_choices("xla", False, True, _dev("8.0")) == ("xla", False, None)
  assert hardware.mosaic_kernel_choices("xla", True, True, _dev("10.0"))[:2] == ("xla", False)
  # a GPU that does not say its generation keeps the kernels (Hopper must never lose them to a guess)
  assert hardware.mosaic_kernel_choices("mosaic_fused", True, True, _dev(None)) == ("mosaic_fused", True, None)
