"""A small step's bf16 GEMM op in one kernel XLA compiles itself (Pallas, Triton lowering): for the 16 rows of a small
decode bucket, the RMSNorm before it (qkv, gate_up), the GEMM on the bf16 (or f16) weight streamed once, and o's
and down's residual or gate_up's SiLU-and-multiply. small_gemm_fp8.py's sibling for unquantized weights: in a
small step that is one graph node for XLA's 2-3 (the norm's fusion, the GEMM, the residual's add or the
activation's), and the step stays one CUDA graph (issue 27; docs/history/perf-notes.md, session 23).

The math is the engine's layers' (`small_gemm_reference`: ops_reference.rms_norm, the f32-accumulating linear whose
result is cast to the model dtype, silu_and_mul, the residual added in the model dtype). Each program owns BLOCK_N
output columns (gate_up: BLOCK_N of gate and the same of up, two views of one weight [K, 2I]) and reads the rows
twice from L2 (the norm's sum of squares, then each K chunk normed in registers as its weight tile streams past).
In interpret mode it equals the reference bit for bit once XLA keeps every cast (tests/test_small_gemm.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import ops_reference

MAX_ROWS = 16          # the dot's smallest M: fewer rows are padded to it
# A bf16 tile is twice an e4m3 one: 256-wide K tiles keep small_gemm_fp8's 48 KB in flight a program.
BLOCK_N, BLOCK_K = 32, 256


def small_gemm_reference(x, w, *, norm_scale=None, eps: float = 1e-5, residual=None, silu_mul: bool = False):
  """x [M, K]; w [K, N] in x's dtype (gate_up: N = 2I, gate columns then up columns); norm_scale [K] where an
  RMSNorm comes first; residual [M, N]; silu_mul: silu(gate) * up -> [M, I]. What the engine's layers compute
  without the kernel."""
  h = ops_reference.rms_norm(x, norm_scale, eps) if norm_scale is not None else x
  y = jnp.einsum("mk,kn->mn", h, w, preferred_element_type=jnp.float32).astype(x.dtype)
  if silu_mul:
    return ops_reference.silu_and_mul(y.reshape(y.shape[0], 2, -1))
  return y if residual is None else y + residual


def _kernel(x_ref, g_ref, w_ref, wu_ref, r_ref, o_ref, *, k: int, block_k: int, norm: bool, eps: float,
            residual: bool, silu_mul: bool):
  from jax.experimental import pallas as pl
  dt = x_ref.dtype
  chunks = k // block_k
  m, n = o_ref.shape

  def rows(c, inv, normed=norm):
    """K chunk c of the input rows in the model dtype, normed as ops_reference.rms_norm where `normed`."""
    x = x_ref[:, pl.ds(c * block_k, block_k)]
    if not normed:
      return x
    g = g_ref[pl.ds(c * block_k, block_k)]
    return g[None, :].astype(dt) * (x.astype(jnp.float32) * inv[:, None]).astype(dt)

  inv = jnp.zeros((m,), jnp.float32)
  if norm:
    ss = jax.lax.fori_loop(
        0, chunks, lambda c, s: s + jnp.sum(jnp.square(rows(c, inv, False).astype(jnp.float32)), axis=1),
        jnp.zeros((m,), jnp.float32))
    inv = jax.lax.rsqrt(ss / k + eps)

  def dot(h, w_view, c):
    return jnp.dot(h, w_view[pl.ds(c * block_k, block_k), :], preferred_element_type=jnp.float32)

  def step(c, accs):
    h = rows(c, inv)
    acc, acc_up = accs
    return acc + dot(h, w_ref, c), (acc_up + dot(h, wu_ref, c) if silu_mul else acc_up)

  acc, acc_up = jax.lax.fori_loop(0, chunks, step, (jnp.zeros((m, n), jnp.float32), jnp.zeros((m, n), jnp.float32)))
  y = acc.astype(dt)   # linear's result, in the model dtype
  if silu_mul:   # ops_reference.silu_and_mul: the product in f32
    g = y.astype(jnp.float32)
    y = (jax.nn.sigmoid(g) * g * acc_up.astype(dt).astype(jnp.float32)).astype(dt)
  if residual:
    y = y + r_ref[...]
  o_ref[...] = y.astype(o_ref.dtype)


def tiles_for(n_out: int, k: int, block_n: int = BLOCK_N, block_k: int = BLOCK_K) -> tuple[int, int] | None:
  """(block_n, block_k) no larger than the given ones that divide the output columns and K (powers of two from
  16), or None where none does (the caller then runs the reference). Both small-step kernels' choice."""
  bn = next((b for b in (block_n, 16) if b <= block_n and n_out % b == 0), None)
  bk = next((b for b in (block_k, 256, 128, 64, 32, 16) if b <= block_k and k % b == 0), None)
  return None if bn is None or bk is None else (bn, bk)


def operands(name: str, x, n: int, norm_scale, residual, silu_mul: bool, block_n: int, block_k: int):
  """What both small-step kernels check and pad before their call: x [M, K] with M <= MAX_ROWS, N weight columns
  (gate_up: gate then up), tiles that divide. Returns (n_out, x, norm scale, residual), the rows padded to
  MAX_ROWS and the absent operands as small placeholders the kernel does not read."""
  m, k = x.shape
  if m > MAX_ROWS:
    raise ValueError(f"{name} takes at most {MAX_ROWS} rows, got {m}")
  if silu_mul and (n % 2 or residual is not None):
    raise ValueError(f"{name}'s silu_mul takes gate and up halves (an even N) and no residual")
  n_out = n // 2 if silu_mul else n
  if n_out % block_n or k % block_k:
    raise ValueError(f"{name} tiles N {n_out} by {block_n} and K {k} by {block_k}: they must divide")
  pad = lambda a: jnp.pad(a, ((0, MAX_ROWS - m), (0, 0))) if m < MAX_ROWS else a
  g = norm_scale.astype(x.dtype) if norm_scale is not None else jnp.zeros((block_k,), x.dtype)
  res = pad(residual) if residual is not None else jnp.zeros((MAX_ROWS, block_n), x.dtype)
  return n_out, pad(x), g, res


def small_gemm(x, w, *, norm_scale=None, eps: float = 1e-5, residual=None, silu_mul: bool = False,
               interpret: bool = False, block_n: int = BLOCK_N, block_k: int = BLOCK_K, num_warps: int = 4,
               num_stages: int = 3):
  """The kernel; arguments and result as small_gemm_reference (x bf16 or f16, M <= 16). Unjitted (legal inside a
  stream-annotated computation)."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plt
  m, k = x.shape
  if w.shape[0] != k or w.dtype != x.dtype:
    raise ValueError(f"small_gemm takes w [K={k}, N] in x's dtype {x.dtype}, got {w.shape} {w.dtype}")
  n_out, xp, g, res = operands("small_gemm", x, w.shape[1], norm_scale, residual, silu_mul, block_n, block_k)
  rows = MAX_ROWS
  up = n_out // block_n if silu_mul else 0   # the up half's column blocks start there
  whole = lambda shape: pl.BlockSpec(shape, lambda j: (0,) * len(shape))
  kernel = functools.partial(_kernel, k=k, block_k=block_k, norm=norm_scale is not None, eps=eps,
                             residual=residual is not None, silu_mul=silu_mul)
  out = pl.pallas_call(
      kernel, grid=(n_out // block_n,),
      in_specs=[whole((rows, k)), whole(g.shape),
                pl.BlockSpec((k, block_n), lambda j: (0, j)), pl.BlockSpec((k, block_n), lambda j: (0, j + up)),
                pl.BlockSpec((rows, block_n), lambda j: (0, j if residual is not None else 0))],
      out_specs=pl.BlockSpec((rows, block_n), lambda j: (0, j)),
      out_shape=jax.ShapeDtypeStruct((rows, n_out), x.dtype),
      interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      name="small_gemm",
  )(xp, g, w, w, res)
  return out[:m] if m < rows else out
