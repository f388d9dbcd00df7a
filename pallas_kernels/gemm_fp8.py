"""fp8 (e4m3) GEMM on a chosen number of SMs (Mosaic GPU: persistent, warp-specialized wgmma + TMA pipeline),
the scales applied in the epilogue.

out = (a8 @ w8^T) * a_scale[:, None] * w_scale[None, :] (+ residual), for a8 [M, K] e4m3 activations with one
scale per row (token) and w8 [N, K] e4m3 weights with one scale per output channel, the layout
nanoflow_jax/quantization.py stores (K-major: Hopper's fp8 wgmma takes both operands K-major only, so the
weight's tiles are read as [tile_n, tile_k] and handed to wgmma transposed). fp32 accumulation; the scaled
result is written in bf16, so the unscaled product never reaches memory (XLA's fp8 dot writes it, and a
second pass scales it).

`gemm_fp8_silu_mul` is gate_up with SiLU-and-multiply in the epilogue: w8 holds [gate; up] along N
([2I, K]) and each CTA accumulates a tile of gate rows and the matching up rows, scales both and stores
silu(gate) * up [M, I].

The same structure as gemm.gemm_silu_mul (ours): a persistent loop over output tiles on `num_sms` CTAs, a
producer warpgroup feeding the TMA streams (rows, then one or two weight streams) through a warp-specialized
pipeline, two consumer warpgroups issuing wgmma. Each consumer starts the copies of its tile's scales (and
residual) before its K loop and waits for them only in the epilogue.

Shapes: M and N (or I) multiples of the CTA tile, K of tile_k (callers pad M). The engine uses it where it
beats XLA's fp8 dot measured in the same run (EngineConfig.fp8_gemm), else XLA's.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from pallas_kernels.gemm import cta_tile, tuned_configs, warp_specialized_kernel

FP8 = jnp.float8_e4m3fn
# One consumer warpgroup's tile is tile_m x tile_n; the CTA's is two of them side by side along
# wg_dimension. tile_k 128 e4m3 = 128 bytes: the widest swizzle. 3 stages of (128 + 256) x 128 bytes = 144 KiB,
# and 64 KiB for the epilogue's stores (a fourth stage does not fit the 227 KiB: the CUDA lowering test).
DEFAULT = dict(tile_m=128, tile_n=128, tile_k=128, max_concurrent_steps=3, wg_dimension="N",
               grid_minor_dim="N", grid_tile_width=8, epi_tile_n=64)
# gate_up: two fp32 accumulators per consumer (gate, up), so 64-row tiles keep them at 128 registers a thread.
SILU_MUL_DEFAULT = dict(tile_m=64, tile_n=128, tile_k=128, max_concurrent_steps=3, wg_dimension="M",
                        grid_minor_dim="N", grid_tile_width=8, epi_tile_n=64)


CONFIG_FILE = os.path.join(os.path.dirname(__file__), "gemm_fp8_configs.json")


def _tuned() -> dict[str, dict]:
  return tuned_configs(CONFIG_FILE)


def config_key(m: int, n: int, k: int, silu_mul: bool = False) -> str:
  return ("silu_mul:" if silu_mul else "") + f"{m}x{n}x{k}"


def config_for(m: int, n: int, k: int, silu_mul: bool = False, config: dict | None = None) -> dict:
  """The tiling: `config` over the default where given; else the one lab/fp8_gemm.py --write_configs chose for
  this shape (gemm_fp8_configs.json, keyed config_key), else the default."""
  default = SILU_MUL_DEFAULT if silu_mul else DEFAULT
  if config is not None:
    return {**default, **config}
  return {**default, **_tuned().get(config_key(m, n, k, silu_mul), {})}


def gemm_fp8_reference(a8: jax.Array, w8: jax.Array, a_scale: jax.Array, w_scale: jax.Array,
                       residual: jax.Array | None = None, out_dtype=jnp.bfloat16) -> jax.Array:
  """The kernel's contract in jnp: fp32 product of the e4m3 operands, both scales, rounded once, then the
  residual added in out_dtype."""
  acc = jax.lax.dot_general(a8, w8, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  out = (acc * a_scale.reshape(-1, 1).astype(jnp.float32) * w_scale.reshape(1, -1).astype(jnp.float32))
  out = out.astype(out_dtype)
  return out if residual is None else out + residual


def gemm_fp8_silu_mul_reference(a8: jax.Array, w8: jax.Array, a_scale: jax.Array, w_scale: jax.Array,
                                out_dtype=jnp.bfloat16) -> jax.Array:
  """w8 [2I, K] = [gate; up]: silu(gate) * up [M, I] of the scaled fp32 products, rounded once."""
  acc = jax.lax.dot_general(a8, w8, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  acc = acc * a_scale.reshape(-1, 1).astype(jnp.float32) * w_scale.reshape(1, -1).astype(jnp.float32)
  gate, up = jnp.split(acc, 2, axis=-1)
  return (jax.nn.silu(gate) * up).astype(out_dtype)


def supported(m: int, n: int, k: int, config: dict | None = None, silu_mul: bool = False) -> bool:
  """n: the weight's rows (output channels; 2I for gate_up). The CTA tile must divide M and N (or I)."""
  cfg = config_for(m, n, k, silu_mul, config)
  cta_m, cta_n = cta_tile(cfg)
  n_out = n // 2 if silu_mul else n
  return (not silu_mul or n % 2 == 0) and m % cta_m == 0 and n_out % cta_n == 0 and k % cfg["tile_k"] == 0


def _check(name, a8, w8, a_scale, w_scale, layer):
  m, k = a8.shape
  w_shape = w8.shape[1:] if layer is not None else w8.shape
  s_shape = w_scale.shape[1:] if layer is not None else w_scale.shape
  if layer is not None and (w8.ndim != 3 or w_scale.ndim != 2):
    raise ValueError(f"{name}: with a layer index w8 is the stack [L, N, K] and w_scale [L, N], "
                     f"got {w8.shape} and {w_scale.shape}")
  if a8.dtype != FP8 or w8.dtype != FP8:
    raise ValueError(f"{name}: operands must be {jnp.dtype(FP8).name}, got {a8.dtype} and {w8.dtype}")
  if len(w_shape) != 2 or w_shape[1] != k:
    raise ValueError(f"{name}: incompatible operands {a8.shape} x {w8.shape} (w8 is [N, K])")
  if a_scale.shape not in ((m,), (m, 1)) or s_shape != (w_shape[0],):
    raise ValueError(f"{name}: scales must be [M] and [N], got {a_scale.shape} and {w_scale.shape}")
  return m, w_shape[0], k


def gemm_fp8(a8: jax.Array, w8: jax.Array, a_scale: jax.Array, w_scale: jax.Array,
             residual: jax.Array | None = None, *, num_sms: int, config: dict | None = None,
             layer: jax.Array | int | None = None, out_dtype=jnp.bfloat16) -> jax.Array:
  """(a8 [M, K] @ w8 [N, K]^T) * a_scale [M] * w_scale [N] (+ residual [M, N]) on `num_sms` CTAs. With
  `layer`, w8 and w_scale are the stacks [L, N, K] and [L, N] and the kernel reads layer `layer` in place."""
  m, n, k = _check("gemm_fp8", a8, w8, a_scale, w_scale, layer)
  cfg = config_for(m, n, k, config=config)
  if not supported(m, n, k, cfg):
    raise ValueError(f"gemm_fp8: M={m}, N={n}, K={k} do not divide into the tiles of {cfg}")
  if residual is not None:
    if residual.shape != (m, n):
      raise ValueError(f"gemm_fp8: residual {residual.shape} is not [M, N] = {(m, n)}")
    out_dtype = residual.dtype
  body = functools.partial(_body, cfg=cfg, silu_mul=False)
  return _launch(body, a8, w8, a_scale.reshape(m).astype(jnp.float32), w_scale.astype(jnp.float32), residual,
                 layer, jax.ShapeDtypeStruct((m, n), out_dtype), num_sms)


def gemm_fp8_silu_mul(a8: jax.Array, w8: jax.Array, a_scale: jax.Array, w_scale: jax.Array, *, num_sms: int,
                      config: dict | None = None, layer: jax.Array | int | None = None,
                      out_dtype=jnp.bfloat16) -> jax.Array:
  """silu(gate) * up [M, I] for w8 = [gate; up] [2I, K] (scales [2I]) on `num_sms` CTAs, without writing the
  [M, 2I] product."""
  m, n, k = _check("gemm_fp8_silu_mul", a8, w8, a_scale, w_scale, layer)
  cfg = config_for(m, n, k, True, config)
  if not supported(m, n, k, cfg, silu_mul=True):
    raise ValueError(f"gemm_fp8_silu_mul: M={m}, K={k} and I={n // 2} do not divide into the tiles of {cfg}")
  body = functools.partial(_body, cfg=cfg, silu_mul=True)
  return _launch(body, a8, w8, a_scale.reshape(m).astype(jnp.float32), w_scale.astype(jnp.float32), None,
                 layer, jax.ShapeDtypeStruct((m, n // 2), out_dtype), num_sms)


def _launch(body, a8, w8, a_scale, w_scale, residual, layer, out_type, num_sms):
  """body(a, w, a_scale, w_scale, residual | None, out) on `num_sms` CTAs (gemm.warp_specialized_kernel);
  with `layer` the body gets the layer's views of the weight and scale stacks."""
  extra = () if residual is None else (residual,)

  def kernel_body(*refs):
    if layer is not None:
      layer_gmem, a_gmem, w_gmem, as_gmem, ws_gmem, *rest = refs
      w_gmem, ws_gmem = w_gmem.at[layer_gmem[0]], ws_gmem.at[layer_gmem[0]]
    else:
      a_gmem, w_gmem, as_gmem, ws_gmem, *rest = refs
    res_gmem = rest[0] if residual is not None else None
    body(a_gmem, w_gmem, as_gmem, ws_gmem, res_gmem, rest[-1])
  args = (a8, w8, a_scale, w_scale, *extra)
  if layer is not None:
    args = (jnp.asarray(layer, jnp.int32).reshape(1), *args)
  return warp_specialized_kernel(kernel_body, out_type, num_sms)(*args)


def _body(a_gmem, w_gmem, as_gmem, ws_gmem, res_gmem, out_gmem, *, cfg: dict, silu_mul: bool):
  from jax import lax
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  m, k = a_gmem.shape
  n_out = out_gmem.shape[1]          # N, or I for gate_up
  tile_m, tile_n, tile_k = cfg["tile_m"], cfg["tile_n"], cfg["tile_k"]
  split_m = cfg["wg_dimension"] == "M"
  cta_m, cta_n = cta_tile(cfg)
  m_tiles, n_tiles, k_steps = m // cta_m, n_out // cta_n, k // tile_k
  swizzle = plgpu.find_swizzle(tile_k * 8)          # e4m3: one byte an element
  transforms = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
  out_dtype = out_gmem.dtype
  out_size = jnp.dtype(out_dtype).itemsize
  epi_n = min(cfg["epi_tile_n"], tile_n)
  out_swizzle = plgpu.find_swizzle(epi_n * out_size * 8)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // out_size)), plgpu.SwizzleTransform(out_swizzle))
  streams = 2 if silu_mul else 1     # weight streams: [gate, up] or the one

  def pipeline(step, context):
    smem = lambda shape: plgpu.BlockSpec(shape, lambda kk: (0, kk), transforms=transforms,
                                         memory_space=plgpu.SMEM)
    return plgpu.emit_pipeline_warp_specialized(
        step, grid=(k_steps,), memory_registers=40,
        in_specs=[smem((cta_m, tile_k))] + [smem((cta_n, tile_k))] * streams,   # rows; weight rows (K-major)
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=cfg["max_concurrent_steps"],
        compute_context=context)

  ignore = lambda *_, **__: None
  allocations = pipeline(ignore, ignore).get_allocations(a_gmem, *[w_gmem] * streams)

  @functools.partial(pl.run_scoped, allocations=allocations,
                     out_smem=plgpu.SMEM((2, 2, tile_m, epi_n), out_dtype, transforms=out_transforms),
                     row_scale=plgpu.SMEM((2, tile_m), jnp.float32),
                     col_scale=plgpu.SMEM((2, streams, tile_n), jnp.float32),
                     scale_barrier=plgpu.Barrier(num_barriers=2 * (1 + streams)),   # one per copy
                     res_barrier=plgpu.Barrier(num_barriers=4),
                     collective_axes="wg")
  def _scope(allocations, out_smem, row_scale, col_scale, scale_barrier, res_barrier):
    wg = lax.axis_index("wg")

    @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="cluster_grid")
    def _tile(info):
      # jax's planar snake order: neighbouring CTAs share row or column tiles in L2.
      mi, ni = plgpu.planar_snake(info.index[0], (m_tiles, n_tiles), "MN".index(cfg["grid_minor_dim"]),
                                  cfg["grid_tile_width"])
      # This warpgroup's rows and output columns.
      wg_m0 = mi * cta_m + (wg * tile_m if split_m else 0)
      wg_n0 = ni * cta_n + (0 if split_m else wg * tile_n)
      wg_rows = pl.ds(wg * tile_m, tile_m) if split_m else slice(None)     # within the CTA's tiles
      wg_cols = slice(None) if split_m else pl.ds(wg * tile_n, tile_n)
      # weight rows of stream s (gate_up: up's rows start I below gate's)
      col0 = [wg_n0 + s * n_out for s in range(streams)]

      def step(_, a_smem, *rest):
        *w_smems, accs = rest
        for w_smem, acc in zip(w_smems, accs):
          plgpu.wgmma(acc, a_smem.at[wg_rows], plgpu.transpose_ref(w_smem.at[wg_cols], (1, 0)))
        plgpu.wgmma_wait(0)
        return accs

      def context(run):
        def _accumulate(*accs):
          # The scales' copies run under the K loop; the epilogue waits for them.
          barriers = [scale_barrier.at[wg * (1 + streams) + j] for j in range(1 + streams)]
          plgpu.copy_gmem_to_smem(as_gmem.at[pl.ds(wg_m0, tile_m)], row_scale.at[wg], barriers[0])
          for s in range(streams):
            plgpu.copy_gmem_to_smem(ws_gmem.at[pl.ds(col0[s], tile_n)], col_scale.at[wg, s], barriers[1 + s])
          run(accs)
          for barrier in barriers:
            plgpu.barrier_wait(barrier)
          rs = lax.broadcast_in_dim(row_scale[wg], (tile_m, tile_n), [0])
          scaled = []
          for s, acc in enumerate(accs):
            cs = col_scale[wg, s]
            scaled.append(acc[...] * rs * lax.broadcast_in_dim(cs, (tile_m, tile_n), [1]))
          if silu_mul:
            gate, up = scaled
            value = (gate / (1.0 + jnp.exp(-gate)) * up).astype(out_dtype)
          else:
            value = scaled[0].astype(out_dtype)
          out = out_gmem.at[pl.ds(wg_m0, tile_m), pl.ds(wg_n0, tile_n)]
          for j in range(tile_n // epi_n):
            slot = j % 2
            cols = pl.ds(j * epi_n, epi_n)
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)   # the slot's previous store has read it
            if res_gmem is None:
              out_smem[wg, slot] = value[:, j * epi_n:(j + 1) * epi_n]
            else:
              barrier = res_barrier.at[wg * 2 + slot]
              plgpu.copy_gmem_to_smem(res_gmem.at[pl.ds(wg_m0, tile_m), pl.ds(wg_n0, tile_n)].at[:, cols],
                                      out_smem.at[wg, slot], barrier)
              plgpu.barrier_wait(barrier)
              out_smem[wg, slot] += value[:, j * epi_n:(j + 1) * epi_n]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], out.at[:, cols])
        pl.run_scoped(_accumulate, *[plgpu.ACC((tile_m, tile_n), jnp.float32)] * streams)

      weights = [w_gmem.at[pl.ds(ni * cta_n + s * n_out, cta_n), :] for s in range(streams)]
      pipeline(step, context)(a_gmem.at[pl.ds(mi * cta_m, cta_m), :], *weights, allocations=allocations)
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
