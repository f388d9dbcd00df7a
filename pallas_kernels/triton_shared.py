"""What several Triton kernels share on the GPU path: rounding to the model dtype as the unfused ops write it,
and how many programs a kernel over rows (or tokens) launches. (What they share to run in Triton's interpreter
is triton_interpret.py.)"""
from __future__ import annotations

try:
  import triton
  import triton.language as tl
except ImportError:
  triton = None

# Programs per SM for the kernels over rows (silu_mul_quant, rms_norm_quant): a program walks its rows one after
# another and each row's loads wait on the last, so the rows in flight at once are what hides the memory
# latency. One program per SM kept ~16 rows of a 2048-row step in turn on each: latency-bound. 8 of 8 warps
# fill an SM.
PROGRAMS_PER_SM = 8


def row_programs(rows: int, num_sms: int, per_sm: int = PROGRAMS_PER_SM) -> int:
  """Programs of a row kernel: one per row, up to `per_sm` per SM (then each walks several rows)."""
  return max(1, min(rows, num_sms * per_sm))


if triton is not None:

  @triton.jit
  def in_model_dtype(x, OUT_F16: tl.constexpr):
    """float32 x rounded to the model dtype (f16 or bf16) and back: the unfused ops write it so."""
    if OUT_F16:
      return x.to(tl.float16).to(tl.float32)
    return x.to(tl.bfloat16).to(tl.float32)
