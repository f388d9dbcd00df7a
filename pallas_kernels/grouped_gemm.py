"""Grouped GEMM for mixture-of-experts layers on a chosen number of SMs (Mosaic GPU), with an optional
SiLU-and-multiply epilogue for the experts' gate_up.

Rows of `lhs` come sorted by group (expert), each group padded to a whole number of row tiles
(`pad_groups` does that from the group sizes), so every row tile belongs to one group and is stored
whole: no masked stores. `num_sms` CTAs of one warpgroup each share the grid of (row tile, column tile)
in a persistent loop, so the kernel can run beside others on its SM share (jax's Hopper ragged dot
launches one CTA per SM of an H100). For each tile the K loop is a TMA pipeline into shared memory
feeding wgmma.

Epilogue "silu_mul": `rhs` holds [gate | up] along N (the layout of the models' experts_gate_up); each
tile accumulates its gate columns and the matching up columns and stores silu(gate) * up, so the
[rows, 2 x intermediate] product is never written out.

bf16 in, fp32 accumulation, bf16 out. K % block_k == 0, N (or N / 2 with silu_mul) % block_n == 0.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BLOCK_M, BLOCK_N, BLOCK_K, STEPS = 64, 128, 64, 4
EPILOGUES = (None, "silu_mul")


def supported(k: int, n_out: int, block_n: int = BLOCK_N, block_k: int = BLOCK_K) -> bool:
  return k % block_k == 0 and n_out % block_n == 0


def grouped_gemm_reference(lhs, rhs, group_sizes, epilogue: str | None = None):
  """lhs [M, K] rows sorted by group, rhs [G, K, N], group_sizes [G] (summing to at most M; rows past
  them give zeros) -> [M, N], or [M, N / 2] with silu_mul."""
  out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
  if epilogue == "silu_mul":
    gate, up = jnp.split(out, 2, axis=-1)
    out = jax.nn.silu(gate) * up
  return out.astype(lhs.dtype)


def padded_rows(num_rows: int, num_groups: int, block_m: int = BLOCK_M) -> int:
  """Rows after padding every group to whole row tiles: a static bound for `pad_groups`."""
  return -(-(num_rows + num_groups * (block_m - 1)) // block_m) * block_m


def pad_groups(lhs, group_sizes, block_m: int = BLOCK_M):
  """Spreads the sorted rows so that each group starts on a row tile. Returns (padded lhs [P, K], the
  group of each row tile [P / block_m], -1 for the tiles past the last group, which the kernel skips,
  and each input row's padded position [M]: out[dest] gathers the results back). Rows past
  sum(group_sizes) are dropped (their position points at the last, unwritten row; callers mask them)."""
  m, g = lhs.shape[0], group_sizes.shape[0]
  p = padded_rows(m, g, block_m)
  sizes = group_sizes.astype(jnp.int32)
  padded = -(-sizes // block_m) * block_m
  starts = jnp.cumsum(sizes) - sizes
  padded_ends = jnp.cumsum(padded)
  padded_starts = padded_ends - padded
  rows = jnp.arange(m, dtype=jnp.int32)
  group = jnp.searchsorted(jnp.cumsum(sizes), rows, side="right").astype(jnp.int32)
  inside = group < g
  group = jnp.minimum(group, g - 1)
  dest = jnp.where(inside, padded_starts[group] + rows - starts[group], p - 1)
  # The rows are written to distinct rows (dropped rows out of range): unique_indices, or XLA's GPU scatter
  # writes each element with an atomic compare-and-swap loop.
  padded_lhs = jnp.zeros((p, lhs.shape[1]), lhs.dtype).at[jnp.where(inside, dest, p)].set(
      lhs, mode="drop", unique_indices=True)
  tiles = jnp.arange(p // block_m, dtype=jnp.int32) * block_m
  tile_group = jnp.searchsorted(padded_ends, tiles, side="right").astype(jnp.int32)
  tile_group = jnp.where(tiles < padded_ends[-1], tile_group, -1)   # -1: padding past the last group
  return padded_lhs, tile_group, dest


def grouped_gemm_padded(lhs, rhs, tile_group, *, num_sms: int, epilogue: str | None = None,
                        block_m: int = BLOCK_M, block_n: int = BLOCK_N, block_k: int = BLOCK_K,
                        max_concurrent_steps: int = STEPS):
  """The kernel: lhs [P, K] already padded (`pad_groups`), rhs [G, K, N], tile_group [P / block_m]."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  if epilogue not in EPILOGUES:
    raise ValueError(f"grouped_gemm: epilogue must be one of {EPILOGUES}, got {epilogue!r}")
  p, k = lhs.shape
  _, k2, n = rhs.shape
  n_out = n // 2 if epilogue == "silu_mul" else n
  if k != k2 or lhs.dtype != rhs.dtype:
    raise ValueError(f"grouped_gemm: incompatible operands {lhs.shape} {lhs.dtype} x {rhs.shape} {rhs.dtype}")
  if p % block_m or k % block_k or n_out % block_n or (epilogue == "silu_mul" and n % 2):
    raise ValueError(f"grouped_gemm: rows {p}, K {k}, output columns {n_out} must be multiples of "
                     f"{block_m}, {block_k}, {block_n}")
  if tile_group.shape != (p // block_m,):
    raise ValueError(f"grouped_gemm: tile_group has shape {tile_group.shape}, want ({p // block_m},)")
  m_tiles, n_tiles, up_offset = p // block_m, n_out // block_n, n_out // block_n

  def body(tile_group_gmem, lhs_gmem, rhs_gmem, out_gmem):
    def compute_tile(mi, ni, weights):
      b_spec = lambda off: plgpu.BlockSpec((block_k, block_n), lambda kk: (kk, ni + off), delay_release=1)
      a_spec = plgpu.BlockSpec((block_m, block_k), lambda kk: (mi, kk), delay_release=1)

      def accumulate(*accs):
        def step(_, a_smem, *b_smems):
          for acc, b_smem in zip(accs, b_smems):
            plgpu.wgmma(acc, a_smem, b_smem)
        specs = [a_spec, b_spec(0)] + ([b_spec(up_offset)] if len(accs) == 2 else [])
        plgpu.emit_pipeline(step, grid=(k // block_k,), in_specs=specs,
                            max_concurrent_steps=max_concurrent_steps)(lhs_gmem, *[weights] * len(accs))
        return tuple(acc[...] for acc in accs)

      acc = plgpu.ACC((block_m, block_n))
      if epilogue == "silu_mul":
        gate, up = pl.run_scoped(accumulate, acc, acc)
        value = gate / (1.0 + jnp.exp(-gate)) * up
      else:
        (value,) = pl.run_scoped(accumulate, acc)

      @functools.partial(pl.run_scoped, out_smem=plgpu.SMEM((block_m, block_n), out_gmem.dtype))
      def _store(out_smem):
        out_smem[...] = value.astype(out_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[pl.ds(mi * block_m, block_m), pl.ds(ni * block_n, block_n)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
    def _tile(info):
      # Column tiles minor: neighbouring CTAs read the same rows and one group's weights.
      mi, ni = info.index[0] // n_tiles, info.index[0] % n_tiles
      group = tile_group_gmem[mi]

      @pl.when(group >= 0)   # row tiles past the last group's are padding: skipped, left unwritten
      def _():
        compute_tile(mi, ni, rhs_gmem.at[group])

  f = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((p, n_out), lhs.dtype), grid=(num_sms,),
                   grid_names=("sm",),
                   compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
  return f(tile_group, lhs, rhs)


def grouped_gemm(lhs, rhs, group_sizes, *, num_sms: int, epilogue: str | None = None, block_m: int = BLOCK_M,
                 **kernel_options):
  """lhs [M, K] rows sorted by group, rhs [G, K, N], group_sizes [G] -> [M, N] (or [M, N / 2] with
  silu_mul), on `num_sms` CTAs: pads the groups to row tiles, runs the kernel, gathers the rows back."""
  padded, tile_group, dest = pad_groups(lhs, group_sizes, block_m)
  out = grouped_gemm_padded(padded, rhs, tile_group, num_sms=num_sms, epilogue=epilogue, block_m=block_m,
                            **kernel_options)
  inside = jnp.arange(lhs.shape[0]) < jnp.sum(group_sizes)
  return jnp.where(inside[:, None], out[dest], 0).astype(lhs.dtype)
