"""A small step's fp8 GEMM in one kernel (Triton, through jax-triton): for a few rows (decode batches of <= 16),
the RMSNorm before it (qkv, gate_up), the per-token e4m3 quantization of its input, the e4m3 weight streamed
once, the scales, and o's and down's residual or gate_up's SiLU-and-multiply, where XLA runs ~4 kernels a GEMM
(session 21's batch-1 trace: ~17 a layer, 551 a step; issue 27). Not used by the engine yet: lab/fp8_gemm.py
times it beside XLA's forms (docs/history/perf-notes.md, session 22).

The math is W8A8's, as the engine's path computes it (ops_reference's rms_norm, quantize_rows and
scaled_fp8_dot), not W8A16's: a row's tokens come out the same at any batch size. Each program
owns BLOCK_N output columns (gate_up: BLOCK_N of gate and the same of up) and reads the few input rows three
times from L2 (the norm's sum of squares, the normed row's amax, then each K chunk quantized in registers as
the weight tiles stream past); the e4m3 values go to f16 (exact) for the dot, accumulated in f32.

Reference: `small_gemm_fp8_reference`, which the tests compare with in Triton's interpreter (float32, ROUND=0:
the interpreter's bf16 and e4m3 casts are not the GPU's).
"""
from __future__ import annotations

import numpy as np

from pallas_kernels import ops_reference

try:
  import triton
  import triton.language as tl
except ImportError:
  triton = None
else:
  from pallas_kernels.triton_shared import in_model_dtype

MAX_ROWS = 16          # the dot's smallest M: fewer rows are padded (masked) to it
BLOCK_N, BLOCK_K = 32, 256


def small_gemm_fp8_reference(x, w8, w_scale, *, norm_scale=None, eps: float = 1e-5, residual=None,
                             silu_mul: bool = False, out_dtype=None):
  """x [M, K] (model dtype); w8 [N, K] e4m3 (gate_up: N = 2I, gate rows then up rows); w_scale [N]; norm_scale
  [K] where an RMSNorm comes first; residual [M, N]; silu_mul: silu(gate) * up -> [M, I]. What the engine's
  layers compute without the kernel."""
  out_dtype = out_dtype or x.dtype
  h = ops_reference.rms_norm(x, norm_scale, eps) if norm_scale is not None else x
  a8, a_scale = ops_reference.quantize_rows(h)
  y = ops_reference.scaled_fp8_dot(a8, a_scale, w8, w_scale, out_dtype)
  if silu_mul:
    return ops_reference.silu_and_mul(y.reshape(y.shape[0], 2, -1))
  return y if residual is None else (y + residual).astype(out_dtype)


if triton is not None:

  @triton.jit
  def _input_chunk(x_ptr, g_ptr, rows, rmask, k0, kk, inv, K: tl.constexpr, NORM: tl.constexpr,
                   ROUND: tl.constexpr, OUT_F16: tl.constexpr):
    """Columns k0 + kk of the input rows, normed as ops_reference.rms_norm where NORM (f32)."""
    kmask = k0 + kk < K
    m = rmask[:, None] & kmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * K + (k0 + kk)[None, :], mask=m, other=0.0).to(tl.float32)
    if NORM:
      g = tl.load(g_ptr + k0 + kk, mask=kmask, other=0.0).to(tl.float32)
      y = x * inv[:, None]
      if ROUND:   # normalized, cast to the model dtype, times the scale in the model dtype
        y = in_model_dtype(in_model_dtype(y, OUT_F16) * g[None, :], OUT_F16)
      else:
        y = y * g[None, :]
      return y
    return x

  @triton.jit
  def _small_gemm_fp8_kernel(x_ptr, g_ptr, w_ptr, ws_ptr, r_ptr, out_ptr, M: tl.constexpr, ROWS: tl.constexpr,
                             K: tl.constexpr, N: tl.constexpr, N_OUT: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr,
                             RESIDUAL: tl.constexpr, SILU_MUL: tl.constexpr, FP8_MAX: tl.constexpr,
                             MIN_SCALE: tl.constexpr, ROUND: tl.constexpr, OUT_F16: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    rmask = rows < M
    kk = tl.arange(0, BLOCK_K)
    nn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = nn < N_OUT
    inv = tl.zeros([ROWS], tl.float32)
    if NORM:   # the RMSNorm's sum of squares (over the raw rows)
      ss = tl.zeros([ROWS], tl.float32)
      for k0 in range(0, K, BLOCK_K):
        x = _input_chunk(x_ptr, g_ptr, rows, rmask, k0, kk, inv, K, False, ROUND, OUT_F16)
        ss += tl.sum(x * x, 1)
      inv = 1.0 / tl.sqrt(ss / K + EPS)
    amax = tl.zeros([ROWS], tl.float32)
    for k0 in range(0, K, BLOCK_K):   # the (normed) rows' amax: the per-token scale
      y = _input_chunk(x_ptr, g_ptr, rows, rmask, k0, kk, inv, K, NORM, ROUND, OUT_F16)
      amax = tl.maximum(amax, tl.max(tl.abs(y), 1))
    scale = tl.maximum(amax, MIN_SCALE) / FP8_MAX
    acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
    acc_up = tl.zeros([ROWS, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
      y = _input_chunk(x_ptr, g_ptr, rows, rmask, k0, kk, inv, K, NORM, ROUND, OUT_F16)
      q = tl.minimum(tl.maximum(y / scale[:, None], -FP8_MAX), FP8_MAX)
      if ROUND:   # e4m3, then f16 for the dot (exact); the interpreter's path stays float32
        q = q.to(tl.float8e4nv).to(tl.float16)
      kmask = k0 + kk < K
      wm = nmask[:, None] & kmask[None, :]
      w = tl.load(w_ptr + nn[:, None].to(tl.int64) * K + (k0 + kk)[None, :], mask=wm, other=0.0)
      w = w.to(q.dtype)
      acc += tl.dot(q, tl.trans(w))
      if SILU_MUL:   # the up half's columns, N_OUT rows further down the weight
        wu = tl.load(w_ptr + (nn + N_OUT)[:, None].to(tl.int64) * K + (k0 + kk)[None, :], mask=wm, other=0.0)
        acc_up += tl.dot(q, tl.trans(wu.to(q.dtype)))
    # The epilogue as scaled_fp8_dot: the unscaled product in the model dtype (the fp8 dot's output on the
    # GPU), times the row and channel scales, in the model dtype.
    ws = tl.load(ws_ptr + nn, mask=nmask, other=0.0)
    if ROUND:
      acc = in_model_dtype(acc, OUT_F16)
    y = acc * scale[:, None] * ws[None, :]
    if ROUND:
      y = in_model_dtype(y, OUT_F16)
    om = rmask[:, None] & nmask[None, :]
    if SILU_MUL:
      wsu = tl.load(ws_ptr + nn + N_OUT, mask=nmask, other=0.0)
      if ROUND:
        acc_up = in_model_dtype(acc_up, OUT_F16)
      u = acc_up * scale[:, None] * wsu[None, :]
      if ROUND:
        u = in_model_dtype(u, OUT_F16)
      y = y * tl.sigmoid(y) * u
    if RESIDUAL:
      y = y + tl.load(r_ptr + rows[:, None] * N_OUT + nn[None, :], mask=om, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * N_OUT + nn[None, :], y.to(out_ptr.dtype.element_ty), mask=om)


def _meta(m: int, k: int, n: int, *, norm: bool, eps: float, residual: bool, silu_mul: bool, round_: bool,
          out_f16: bool, block_n: int = BLOCK_N, block_k: int = BLOCK_K) -> tuple[int, dict]:
  if m > MAX_ROWS:
    raise ValueError(f"small_gemm_fp8 takes at most {MAX_ROWS} rows, got {m}")
  if silu_mul and (n % 2 or residual):
    raise ValueError("small_gemm_fp8's silu_mul takes gate and up rows (an even N) and no residual")
  n_out = n // 2 if silu_mul else n
  return -(-n_out // block_n), dict(M=m, ROWS=MAX_ROWS, K=k, N=n, N_OUT=n_out, BLOCK_N=block_n, BLOCK_K=block_k,
                                    NORM=int(norm), EPS=float(eps), RESIDUAL=int(residual), SILU_MUL=int(silu_mul),
                                    FP8_MAX=ops_reference.E4M3_MAX, MIN_SCALE=ops_reference.MIN_SCALE,
                                    ROUND=int(round_), OUT_F16=int(out_f16))


def small_gemm_fp8(x, w8, w_scale, *, norm_scale=None, eps: float = 1e-5, residual=None, silu_mul: bool = False,
                   num_warps: int = 4, num_stages: int = 4, block_n: int = BLOCK_N, block_k: int = BLOCK_K):
  """The compiled kernel (GPU, jax-triton; x bf16 or f16); arguments and result as the reference."""
  import jax
  import jax.numpy as jnp
  import jax_triton as jt
  m, k = x.shape
  n = w8.shape[0]
  programs, meta = _meta(m, k, n, norm=norm_scale is not None, eps=eps, residual=residual is not None,
                         silu_mul=silu_mul, round_=True, out_f16=x.dtype == jnp.float16, block_n=block_n,
                         block_k=block_k)
  dummy = jnp.zeros((1,), x.dtype)
  return jt.triton_call(x, dummy if norm_scale is None else norm_scale.astype(x.dtype), w8,
                        w_scale.astype(jnp.float32).reshape(-1), dummy if residual is None else residual,
                        kernel=_small_gemm_fp8_kernel, out_shape=jax.ShapeDtypeStruct((m, meta["N_OUT"]), x.dtype),
                        grid=(programs,), num_warps=num_warps, num_stages=num_stages, name="small_gemm_fp8_triton",
                        **meta)


def interpret_call(x, w, w_scale, *, norm_scale=None, eps: float = 1e-5, residual=None, silu_mul: bool = False,
                   block_n: int = 16, block_k: int = 32):
  """The same kernel in Triton's interpreter (float32 throughout, ROUND=0: no bf16 or e4m3 rounding; numpy in
  and out; w as float32 values): the tests' path."""
  import torch
  from pallas_kernels.triton_interpret import f32, interpreted
  m, k = np.shape(x)
  n = np.shape(w)[0]
  programs, meta = _meta(m, k, n, norm=norm_scale is not None, eps=eps, residual=residual is not None,
                         silu_mul=silu_mul, round_=False, out_f16=False, block_n=block_n, block_k=block_k)
  out = torch.zeros((m, meta["N_OUT"]))
  one = np.zeros(1, np.float32)
  interpreted(_small_gemm_fp8_kernel)[(programs,)](
      f32(x), f32(one if norm_scale is None else norm_scale), f32(w), f32(w_scale),
      f32(one if residual is None else residual), out, **meta)
  return out.numpy()
