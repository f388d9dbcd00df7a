"""RMSNorm with the residual add fused in (Triton, through jax-triton): h = x + residual; out = norm(h) *
scale, returning both (the next residual and the normalized input of the next GEMM) from one pass over
memory, computed as transformers does (normalize in fp32, cast back, then scale in the activation dtype).

Reference: `rms_norm_residual_reference` (models.layers.rms_norm), which the tests compare with in
Triton's interpreter. The grid is `num_sms` persistent programs over the rows. Not wired into the engine
yet: not measured on the GPU against the XLA fusion it would replace (kernel_bench --rms_norm).
"""
from __future__ import annotations

import numpy as np

try:
  import triton
  import triton.language as tl
except ImportError:
  triton = None


def rms_norm_residual_reference(x, residual, scale, eps: float):
  """x, residual [N, H] -> (x + residual, rms_norm(x + residual) * scale)."""
  from pallas_kernels.ops_reference import rms_norm
  h = x + residual
  return h, rms_norm(h, scale, eps)


if triton is not None:

  @triton.jit
  def _rms_norm_kernel(x_ptr, r_ptr, s_ptr, h_out, y_out, N: tl.constexpr, H: tl.constexpr, H_P2: tl.constexpr,
                       EPS: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, H_P2)
    m = cols < H
    scale = tl.load(s_ptr + cols, mask=m, other=0.0)
    for row in range(pid, N, NUM_PROGRAMS):
      off = row * H + cols            # N * H stays far below 2**31
      h = tl.load(x_ptr + off, mask=m, other=0.0) + tl.load(r_ptr + off, mask=m, other=0.0)
      tl.store(h_out + off, h, mask=m)
      hf = h.to(tl.float32)
      inv = 1.0 / tl.sqrt(tl.sum(hf * hf, 0) / H + EPS)
      y = (hf * inv).to(h.dtype) * scale.to(h.dtype)
      tl.store(y_out + off, y.to(y_out.dtype.element_ty), mask=m)


def _meta(shape, eps: float, num_sms: int) -> dict:
  n, h = shape
  return dict(N=n, H=h, H_P2=1 << (h - 1).bit_length(), EPS=float(eps), NUM_PROGRAMS=num_sms)


def rms_norm_residual(x, residual, scale, eps: float, *, num_sms: int, num_warps: int = 8):
  """The compiled kernel (GPU, jax-triton); arguments and results as the reference."""
  import jax
  import jax_triton as jt
  meta = _meta(x.shape, eps, num_sms)
  out = jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jt.triton_call(x, residual, scale.astype(x.dtype), kernel=_rms_norm_kernel, out_shape=(out, out),
                        grid=(num_sms,), num_warps=num_warps, num_stages=1, name="rms_norm_residual_triton", **meta)


def interpret_call(x, residual, scale, eps: float, *, num_sms: int):
  """The same kernel in Triton's interpreter (float32, numpy in and out): the tests' path."""
  import torch
  from pallas_kernels.triton_interpret import f32, interpreted
  h, y = torch.zeros(np.shape(x)), torch.zeros(np.shape(x))
  interpreted(_rms_norm_kernel)[(num_sms,)](f32(x), f32(residual), f32(scale), h, y,
                                            **_meta(np.shape(x), eps, num_sms))
  return h.numpy(), y.numpy()
