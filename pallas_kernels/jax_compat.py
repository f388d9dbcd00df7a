"""JAX version differences the kernels meet (0.10.2 here and in CI, 0.11.2 on the GPU machine). The
kernels sit below nanoflow_jax, so what they need lives here; nanoflow_jax/compat.py holds the rest and
re-exports these."""
from __future__ import annotations

import contextlib
import threading


def mosaic_kernel_aliased(body, out_type, mesh, input_output_aliases: dict, compiler_params, name: str):
  """A Mosaic GPU kernel (pl.kernel's) whose output aliases an input: `body(*inputs, out)` writes into the
  aliased buffer in place. pl.kernel aliases only mutable refs (jax.new_ref), and a ref cannot be discharged
  inside a stream annotation's compute_on (measured: "No state discharge rule ... compute_on"), so this
  calls the private function behind pl.kernel, whose signature is the same in jax 0.10.2 and 0.11."""
  from jax._src.pallas import mpmd
  return mpmd._mpmd_map([(mesh, body)], out_type, input_output_aliases=input_output_aliases,
                        compiler_params=compiler_params, name=name)


@contextlib.contextmanager
def gpu_interpret_mode(**params):
  """Mosaic GPU kernels run in Pallas's interpreter (the CPU tests, kernels="interpret"), with one addition:
  a wgmma operand handed over transposed (plgpu.transpose_ref; fp8 wgmma takes its B operand only K-major, so
  gemm_fp8 reads weight tiles [n, k] and transposes the ref). jax 0.10.2's interpreter reads operands
  through index transforms only, fails on the transpose inside its callback, and the other warpgroups then
  wait at their barriers forever. Here its wgmma callback reads such an operand without the transpose and
  the shared-memory read hands back the transposed tile (per thread: warpgroups run in threads).
  `params`: InterpretGPUParams' (logging_mode, to follow barriers)."""
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks, shared_memory
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams, force_gpu_interpret_mode
  from jax._src.state.types import TransposeTransform
  original_wgmma = gpu_callbacks.wgmma
  memory = shared_memory.GPUSharedMemory
  own_read = "get_buffer_content" in vars(memory)   # else inherited (jax 0.10.2)
  original_read = memory.get_buffer_content
  local = threading.local()

  def untransposed(transforms):
    """(transforms without a trailing 2-D transpose, whether there was one)."""
    if transforms and isinstance(transforms[-1], TransposeTransform):
      if tuple(transforms[-1].permutation) != (1, 0):
        raise NotImplementedError(f"interpret mode: wgmma operand permuted {transforms[-1].permutation}")
      return tuple(transforms[:-1]), True
    return transforms, False

  def wgmma(**kw):
    transposed = []
    for operand in ("a", "b"):
      kw[f"{operand}_transforms"], flipped = untransposed(kw[f"{operand}_transforms"])
      if flipped:
        transposed.append(gpu_callbacks.HostAllocationKey.from_array(kw[f"{operand}_allocation_key_as_array"]))
    local.transposed = transposed
    try:
      return original_wgmma(**kw)
    finally:
      local.transposed = []

  def read(self, key, *args, **kwargs):
    content, *rest = original_read(self, key, *args, **kwargs)
    if content is not None and key in getattr(local, "transposed", ()):
      content = content.T
    return (content, *rest)

  gpu_callbacks.wgmma, memory.get_buffer_content = wgmma, read
  try:
    with force_gpu_interpret_mode(InterpretGPUParams(**params)):
      yield
  finally:
    gpu_callbacks.wgmma = original_wgmma
    if own_read:
      memory.get_buffer_content = original_read
    else:
      del memory.get_buffer_content
