"""A small step's fp8 GEMM op in one kernel that XLA compiles itself (Pallas, Triton lowering): for the 16 rows of
a small decode bucket, the RMSNorm before it (qkv, gate_up), the per-token e4m3 quantization of its input, the
e4m3 weight streamed once, the scales, and o's and down's residual or gate_up's SiLU-and-multiply.

Why a second form of small_gemm_fp8_triton.py: that one is a jax-triton call, a legacy custom call, which XLA's
command buffers never record (lab/gpu_aot.py's census: a batch-1 step with it is 267 host launches). A
pallas_call becomes an XLA kernel like any fusion, so a small step made of these stays one CUDA graph, and each
GEMM op is one graph node instead of XLA's 3-5 (issue 27; docs/history/perf-notes.md, session 23).

The math is the engine's W8A8 path's (`small_gemm_fp8_reference`: ops_reference's rms_norm, quantize_rows and
scaled_fp8_dot): each program owns BLOCK_N output columns (gate_up: BLOCK_N of gate and the same of up, two views
of one weight), and reads the rows three times from L2 (the norm's sum of squares, the normed rows' amax, then
each K chunk quantized in registers as its weight tile streams past). e4m3 values go to f16 (exact) for the dot,
accumulated in f32; `round_product`: the product rounded to the model dtype first, as cuBLASLt's fp8 GEMM writes
it on the GPU (the reference's fp8_dot accumulates to f32 elsewhere). In interpret mode (CPU tests) the casts are
the real ones, so the kernel is compared with the reference closely.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import ops_reference
from pallas_kernels.small_gemm import operands
from pallas_kernels.small_gemm_fp8_triton import MAX_ROWS, small_gemm_fp8_reference  # noqa: F401 (callers)

# Each program streams its BLOCK_N weight rows through num_stages K tiles in flight. o and down have fewer
# programs (128) than the H200 has SMs, so an SM's bytes in flight are one program's: 3 x 32 x 512 = 48 KB, about
# what ~4 TB/s needs at ~1.5 us of latency over 132 SMs (Little's law; 256-wide tiles keep half that). A guess
# until lab/fp8_gemm.py's tiling sweep on the GPU.
BLOCK_N, BLOCK_K = 32, 512


def _kernel(x_ref, g_ref, w_ref, wu_ref, ws_ref, wsu_ref, r_ref, o_ref, *, k: int, block_k: int, norm: bool,
            eps: float, residual: bool, silu_mul: bool, round_product: bool):
  dt = x_ref.dtype
  chunks = k // block_k

  def rows(c, inv, normed=norm):
    """K chunk c of the input rows (f32), normed as ops_reference.rms_norm where `normed`."""
    x = x_ref[:, pl_ds(c * block_k, block_k)].astype(jnp.float32)
    if not normed:
      return x
    g = g_ref[pl_ds(c * block_k, block_k)]
    return (g[None, :].astype(dt) * (x * inv[:, None]).astype(dt)).astype(jnp.float32)

  m = x_ref.shape[0]
  inv = jnp.zeros((m,), jnp.float32)
  if norm:
    ss = jax.lax.fori_loop(0, chunks, lambda c, s: s + jnp.sum(jnp.square(rows(c, inv, False)), axis=1),
                           jnp.zeros((m,), jnp.float32))
    inv = jax.lax.rsqrt(ss / k + eps)
  amax = jax.lax.fori_loop(0, chunks, lambda c, a: jnp.maximum(a, jnp.max(jnp.abs(rows(c, inv)), axis=1)),
                           jnp.zeros((m,), jnp.float32))
  scale = jnp.maximum(amax, ops_reference.MIN_SCALE) / ops_reference.E4M3_MAX

  def dot(q, w_view, c):
    w = w_view[:, pl_ds(c * block_k, block_k)].astype(jnp.float16)
    return jax.lax.dot_general(q, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

  def step(c, accs):
    q = jnp.clip(rows(c, inv) / scale[:, None], -ops_reference.E4M3_MAX, ops_reference.E4M3_MAX)
    q = q.astype(ops_reference.E4M3).astype(jnp.float16)
    acc, acc_up = accs
    return acc + dot(q, w_ref, c), (acc_up + dot(q, wu_ref, c) if silu_mul else acc_up)

  n = o_ref.shape[1]
  acc, acc_up = jax.lax.fori_loop(0, chunks, step, (jnp.zeros((m, n), jnp.float32), jnp.zeros((m, n), jnp.float32)))

  def scaled(a, ws):   # scaled_fp8_dot's epilogue: (product) x row scale x channel scale, in the model dtype
    if round_product:
      a = a.astype(dt).astype(jnp.float32)
    return (a * scale[:, None] * ws[None, :]).astype(dt).astype(jnp.float32)
  y = scaled(acc, ws_ref[...])
  if silu_mul:   # ops_reference.silu_and_mul: gate and up in the model dtype, the product in f32
    y = jax.nn.sigmoid(y) * y * scaled(acc_up, wsu_ref[...])
  if residual:
    y = y.astype(dt).astype(jnp.float32) + r_ref[...].astype(jnp.float32)
  o_ref[...] = y.astype(o_ref.dtype)


def pl_ds(start, size):
  from jax.experimental import pallas as pl
  return pl.ds(start, size)


def small_gemm_fp8(x, w8, w_scale, *, norm_scale=None, eps: float = 1e-5, residual=None, silu_mul: bool = False,
                   round_product: bool | None = None, interpret: bool = False, block_n: int = BLOCK_N,
                   block_k: int = BLOCK_K, num_warps: int = 4, num_stages: int = 3):
  """x [M <= 16, K] (model dtype); w8 [N, K] e4m3 (gate_up: N = 2I, gate rows then up rows); w_scale [N];
  norm_scale [K]; residual [M, N]; silu_mul -> [M, I]: as `small_gemm_fp8_reference`. round_product: None = as
  the reference on this backend (rounded on a GPU). Unjitted (legal inside a stream-annotated computation)."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plt
  m = x.shape[0]
  n_out, xp, g, res = operands("small_gemm_fp8", x, w8.shape[0], norm_scale, residual, silu_mul, block_n, block_k)
  if round_product is None:
    round_product = jax.default_backend() == "gpu"
  k, rows = x.shape[1], MAX_ROWS
  ws = w_scale.astype(jnp.float32).reshape(-1)
  up = n_out // block_n if silu_mul else 0   # the up half's column blocks start there
  whole = lambda shape: pl.BlockSpec(shape, lambda j: (0,) * len(shape))
  kernel = functools.partial(_kernel, k=k, block_k=block_k, norm=norm_scale is not None, eps=eps,
                             residual=residual is not None, silu_mul=silu_mul, round_product=round_product)
  out = pl.pallas_call(
      kernel, grid=(n_out // block_n,),
      in_specs=[whole((rows, k)), whole(g.shape),
                pl.BlockSpec((block_n, k), lambda j: (j, 0)), pl.BlockSpec((block_n, k), lambda j: (j + up, 0)),
                pl.BlockSpec((block_n,), lambda j: (j,)), pl.BlockSpec((block_n,), lambda j: (j + up,)),
                pl.BlockSpec((rows, block_n), lambda j: (0, j if residual is not None else 0))],
      out_specs=pl.BlockSpec((rows, block_n), lambda j: (0, j)),
      out_shape=jax.ShapeDtypeStruct((rows, n_out), x.dtype),
      interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      name="small_gemm_fp8",
  )(xp, g, w8, w8, ws, ws, res)
  return out[:m] if m < rows else out
