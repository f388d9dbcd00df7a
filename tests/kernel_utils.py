"""Running Mosaic GPU kernels on the CPU (interpret mode) in tests."""
import contextlib

import jax


@contextlib.contextmanager
def gpu_interpret():
  if jax.default_backend() == "gpu":
    yield
    return
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams, force_gpu_interpret_mode
  with force_gpu_interpret_mode(InterpretGPUParams()):
    yield
