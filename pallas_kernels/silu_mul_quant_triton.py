"""The fp8 MLP's middle in one pass (Triton, through jax-triton): from the gate_up GEMM's unscaled fp8 product
to the down GEMM's e4m3 input. Per row: the output scales applied (token scale x channel scale, rounded to the
model dtype as scaled_fp8_dot rounds them), silu(gate) * up in fp32 rounded to the model dtype, the row's amax
and the per-token e4m3 quantization (ops_reference.silu_and_mul and quantize_rows, which the model runs
without the kernel). XLA runs this as two passes (session 21's trace of the 8B fp8 step: the
scale-and-activation 0.042 ms a layer, the row amax 0.060 ms: 3.1% and 4.4% of the step; issue 26 asks for
the fusion past 2%); here the product is read once and only the e4m3 result and the row scales are written.

Reference: `silu_mul_quant_reference`, which the tests compare with in Triton's interpreter. The interpreter's
bf16 and e4m3 casts are not the GPU's (it truncates), so the CPU tests run with ROUND=0 (float32 throughout,
the scaled values before their cast); the GPU test compares the rounded result. The grid: one program per
row up to triton_shared.PROGRAMS_PER_SM per SM (then each walks several), each row taken in chunks of CHUNK columns twice
(its amax, then its quantization).
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


def silu_mul_quant_reference(acc, a_scale, w_scale, out_dtype):
  """acc [M, 2I] (the fp8 dot's unscaled product, [gate | up]), a_scale [M, 1], w_scale [2I] -> (e4m3 [M, I],
  float32 scale [M, 1]): what the engine computes without the kernel."""
  import jax.numpy as jnp
  y = (acc.astype(jnp.float32) * a_scale * w_scale.reshape(1, -1)).astype(out_dtype)
  return ops_reference.quantize_rows(ops_reference.silu_and_mul(y.reshape(y.shape[0], 2, -1)))


if triton is not None:

  @triton.jit
  def _activation(acc_ptr, ws_ptr, row, a_s, cols, m, I: tl.constexpr, ROUND: tl.constexpr, OUT_F16: tl.constexpr):
    """silu(gate) * up of one row's columns `cols`, scaled and rounded as the reference."""
    off = row * 2 * I + cols          # M * 2I stays far below 2**31 for the step's rows
    g = tl.load(acc_ptr + off, mask=m, other=0.0).to(tl.float32) * a_s * tl.load(ws_ptr + cols, mask=m, other=0.0)
    u = tl.load(acc_ptr + off + I, mask=m, other=0.0).to(tl.float32) * a_s * tl.load(ws_ptr + I + cols, mask=m,
                                                                                       other=0.0)
    if ROUND:   # the scaled product in the model dtype, as scaled_fp8_dot returns it
      g, u = in_model_dtype(g, OUT_F16), in_model_dtype(u, OUT_F16)
    h = g * tl.sigmoid(g) * u
    if ROUND:   # silu_and_mul's result in the model dtype
      h = in_model_dtype(h, OUT_F16)
    return h

  @triton.jit
  def _silu_mul_quant_kernel(acc_ptr, as_ptr, ws_ptr, q_out, s_out, M: tl.constexpr, I: tl.constexpr,
                             CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                             FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, ROUND: tl.constexpr,
                             OUT_F16: tl.constexpr):
    # A row in chunks of CHUNK columns, twice: the amax, then the quantization, the activation recomputed
    # (a whole 14336-wide row in registers spills; the second read of the row's 57 KB comes from L2).
    pid = tl.program_id(0)
    for row in range(pid, M, NUM_PROGRAMS):
      a_s = tl.load(as_ptr + row).to(tl.float32)
      amax = 0.0
      for c in range(NUM_CHUNKS):
        cols = c * CHUNK + tl.arange(0, CHUNK)
        m = cols < I
        h = _activation(acc_ptr, ws_ptr, row, a_s, cols, m, I, ROUND, OUT_F16)
        amax = tl.maximum(amax, tl.max(tl.where(m, tl.abs(h), 0.0), 0))
      scale = tl.maximum(amax, MIN_SCALE) / FP8_MAX
      for c in range(NUM_CHUNKS):
        cols = c * CHUNK + tl.arange(0, CHUNK)
        m = cols < I
        h = _activation(acc_ptr, ws_ptr, row, a_s, cols, m, I, ROUND, OUT_F16)
        q = tl.minimum(tl.maximum(h / scale, -FP8_MAX), FP8_MAX)
        tl.store(q_out + row * I + cols, q.to(q_out.dtype.element_ty), mask=m)
      tl.store(s_out + row, scale)


CHUNK = 2048   # columns a program holds at once: 8 per thread of 8 warps


def _meta(shape, programs: int, round_: bool, out_f16: bool, chunk: int = CHUNK) -> dict:
  m, two_i = shape
  i = two_i // 2
  chunk = min(chunk, 1 << (i - 1).bit_length())
  return dict(M=m, I=i, CHUNK=chunk, NUM_CHUNKS=-(-i // chunk), NUM_PROGRAMS=programs,
              FP8_MAX=ops_reference.E4M3_MAX, MIN_SCALE=ops_reference.MIN_SCALE, ROUND=int(round_),
              OUT_F16=int(out_f16))


def silu_mul_quant(acc, a_scale, w_scale, out_dtype, *, num_sms: int, num_warps: int = 8):
  """The compiled kernel (GPU, jax-triton); arguments and results as the reference."""
  import jax
  import jax.numpy as jnp
  import jax_triton as jt
  m, two_i = acc.shape
  meta = _meta(acc.shape, row_programs(m, num_sms), True, jnp.dtype(out_dtype) == jnp.float16)
  out = (jax.ShapeDtypeStruct((m, two_i // 2), ops_reference.E4M3), jax.ShapeDtypeStruct((m, 1), jnp.float32))
  return jt.triton_call(acc, a_scale.astype(jnp.float32).reshape(m, 1), w_scale.astype(jnp.float32).reshape(-1),
                        kernel=_silu_mul_quant_kernel, out_shape=out, grid=(meta["NUM_PROGRAMS"],),
                        num_warps=num_warps, num_stages=1, name="silu_mul_quant_triton", **meta)


def interpret_call(acc, a_scale, w_scale, *, num_sms: int, chunk: int = CHUNK):
  """The same kernel in Triton's interpreter (float32, no rounding to bf16 or e4m3: ROUND=0; numpy in and out):
  the tests' path. Returns (the scaled values before their e4m3 cast [M, I], scale [M, 1])."""
  import torch
  from pallas_kernels.triton_interpret import f32, interpreted
  m, two_i = np.shape(acc)
  q, s = torch.zeros((m, two_i // 2)), torch.zeros((m, 1))
  interpreted(_silu_mul_quant_kernel)[(num_sms,)](f32(acc), f32(np.reshape(a_scale, -1)), f32(w_scale), q, s,
                                                  **_meta((m, two_i), num_sms, False, False, chunk))
  return q.numpy(), s.numpy()
