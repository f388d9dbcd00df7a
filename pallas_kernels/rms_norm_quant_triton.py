"""RMSNorm fused with the next fp8 GEMM's per-token e4m3 quantization (Triton, through jax-triton): the
normalized row (ops_reference.rms_norm: normalized in fp32, cast to the model dtype, times the scale in the
model dtype) is never written; only its e4m3 values and the row's scale are (ops_reference.quantize_rows).
Before qkv and gate_up in the fp8 model: XLA runs each as a norm pass, an amax pass and a divide-and-cast pass
(session 21's trace of the 8B fp8 step: with the other small fusions, ~1.3 ms of the 43.6 ms step).

Reference: `rms_norm_quant_reference`, which the tests compare with in Triton's interpreter (float32, ROUND=0:
the interpreter's bf16 and e4m3 casts are not the GPU's). The grid: one program per row up to
triton_shared.PROGRAMS_PER_SM per SM; a row (the hidden size, 4096 for the 8B) is held whole.
"""
from __future__ import annotations

import numpy as np

from pallas_kernels import ops_reference
from pallas_kernels.triton_shared import row_programs

try:
  import triton
  import triton.language as tl
except ImportError:
  triton = None
else:
  from pallas_kernels.triton_shared import in_model_dtype


def rms_norm_quant_reference(x, scale, eps: float):
  """x [M, H] -> (e4m3 [M, H], float32 scale [M, 1]): what the model computes without the kernel."""
  return ops_reference.quantize_rows(ops_reference.rms_norm(x, scale, eps))


if triton is not None:

  @triton.jit
  def _rms_norm_quant_kernel(x_ptr, w_ptr, q_out, s_out, M: tl.constexpr, H: tl.constexpr, H_P2: tl.constexpr,
                             EPS: tl.constexpr, NUM_PROGRAMS: tl.constexpr, FP8_MAX: tl.constexpr,
                             MIN_SCALE: tl.constexpr, ROUND: tl.constexpr, OUT_F16: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, H_P2)
    m = cols < H
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)   # (the scale, already in the model dtype)
    for row in range(pid, M, NUM_PROGRAMS):
      xf = tl.load(x_ptr + row * H + cols, mask=m, other=0.0).to(tl.float32)
      y = xf / tl.sqrt(tl.sum(xf * xf, 0) / H + EPS)
      if ROUND:   # normalized, cast to the model dtype, times the scale in the model dtype
        y = in_model_dtype(in_model_dtype(y, OUT_F16) * w, OUT_F16)
      else:
        y = y * w
      amax = tl.max(tl.where(m, tl.abs(y), 0.0), 0)
      scale = tl.maximum(amax, MIN_SCALE) / FP8_MAX
      q = tl.minimum(tl.maximum(y / scale, -FP8_MAX), FP8_MAX)
      tl.store(q_out + row * H + cols, q.to(q_out.dtype.element_ty), mask=m)
      tl.store(s_out + row, scale)


def _meta(shape, eps: float, programs: int, round_: bool, out_f16: bool) -> dict:
  m, h = shape
  return dict(M=m, H=h, H_P2=1 << (h - 1).bit_length(), EPS=float(eps), NUM_PROGRAMS=programs,
              FP8_MAX=ops_reference.E4M3_MAX, MIN_SCALE=ops_reference.MIN_SCALE, ROUND=int(round_),
              OUT_F16=int(out_f16))


def rms_norm_quant(x, scale, eps: float, *, num_sms: int, num_warps: int = 8):
  """The compiled kernel (GPU, jax-triton; x bf16 or f16); arguments and results as the reference."""
  import jax
  import jax.numpy as jnp
  import jax_triton as jt
  m, h = x.shape
  meta = _meta(x.shape, eps, row_programs(m, num_sms), True, x.dtype == jnp.float16)
  out = (jax.ShapeDtypeStruct((m, h), ops_reference.E4M3), jax.ShapeDtypeStruct((m, 1), jnp.float32))
  return jt.triton_call(x, scale.astype(x.dtype), kernel=_rms_norm_quant_kernel, out_shape=out,
                        grid=(meta["NUM_PROGRAMS"],), num_warps=num_warps, num_stages=1, name="rms_norm_quant_triton",
                        **meta)


def interpret_call(x, scale, eps: float, *, num_sms: int):
  """The same kernel in Triton's interpreter (float32, ROUND=0; numpy in and out): the tests' path. Returns
  (the scaled values before their e4m3 cast [M, H], scale [M, 1])."""
  import torch
  from pallas_kernels.triton_interpret import f32, interpreted
  m, h = np.shape(x)
  q, s = torch.zeros((m, h)), torch.zeros((m, 1))
  interpreted(_rms_norm_quant_kernel)[(num_sms,)](f32(x), f32(scale), q, s,
                                                  **_meta((m, h), eps, num_sms, False, False))
  return q.numpy(), s.numpy()
