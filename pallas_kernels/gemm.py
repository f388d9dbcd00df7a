"""GEMM on a chosen number of SMs (Mosaic GPU: persistent, warp-specialized wgmma + TMA pipeline).

The kernel body is jax's Hopper matmul (`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu.kernel`),
used as a library: a persistent loop over output tiles, two consumer warpgroups issuing wgmma, one
producer warpgroup issuing TMA loads, and an optional residual add in the epilogue (out = a @ b + c).
What we add is the grid: that op always launches one CTA per SM of the device, while overlapping
kernels need each one limited to its SM share, so we launch `num_sms` CTAs and the persistent loop
spreads the tiles over them. Tile configurations per shape come from gemm_configs.json (written by
`lab/kernel_bench.py --tune_gemm`, keyed "MxNxK" or "MxNxK@num_sms"), else DEFAULT.

`gemm_silu_mul` is the gate_up GEMM with the SiLU-and-multiply fused into its epilogue: b holds
[gate | up] along N, and each CTA accumulates a tile of gate columns and the matching up columns (two
accumulators per consumer warpgroup) and stores silu(gate) * up, so the [M, 2I] product is never written
or read back. jax's body has no hook for that, so this one is ours, in the same shape: persistent loop
over output tiles, a producer warpgroup feeding three TMA streams (rows, gate, up) through a
warp-specialized pipeline, two consumer warpgroups issuing wgmma.

bf16 in, fp32 accumulation, bf16 out. Shapes: M % 128, N % 256, K % 64 (callers pad M; all model N/K
of the shapes we serve qualify).
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp

CONFIG_FILE = os.path.join(os.path.dirname(__file__), "gemm_configs.json")
DEFAULT = dict(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=4, epi_tile_n=64, epi_tile_m=64,
               grid_tile_width=8)
M_ALIGN, N_ALIGN, K_ALIGN = 128, 256, 64


# The fused gate_up kernel: one consumer warpgroup's tile is tile_m rows x tile_n output columns, i.e. two
# fp32 accumulators (gate, up) of that size; 64 x 128 keeps them at 128 registers a thread.
SILU_MUL_DEFAULT = dict(tile_m=64, tile_n=128, tile_k=64, max_concurrent_steps=4, wg_dimension="M",
                        grid_minor_dim="N", grid_tile_width=8, epi_tile_n=64)


def gemm_reference(a: jax.Array, b: jax.Array, residual: jax.Array | None = None) -> jax.Array:
  out = jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)
  return out if residual is None else out + residual


def gemm_silu_mul_reference(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [M, K] @ b [K, 2I] ([gate | up]) -> silu(gate) * up [M, I], in fp32 until the end."""
  gate, up = jnp.split(jnp.dot(a, b, preferred_element_type=jnp.float32), 2, axis=-1)
  return (jax.nn.silu(gate) * up).astype(a.dtype)


@functools.cache
def tuned_configs(path: str) -> dict[str, dict]:
  """A tuner's tilings by shape key, read once per file ({} where none was written): gemm_configs.json here,
  gemm_fp8.py's file too."""
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {}


def _tuned() -> dict[str, dict]:
  return tuned_configs(CONFIG_FILE)


def config_for(m: int, n: int, k: int, num_sms: int) -> dict:
  return {**DEFAULT, **_tuned().get(f"{m}x{n}x{k}@{num_sms}", _tuned().get(f"{m}x{n}x{k}", {}))}


# What the tuner tries per shape (lab/kernel_bench.py --tune_gemm). tile_m x tile_n is one consumer
# warpgroup's tile; the CTA's is twice that along wg_dimension. Stages fill the 227 KiB of shared memory.
# Smaller CTA tiles give small-N shapes (TP shards) more tiles than SMs.
TUNE_SPACE = [dict(tile_m=tm, tile_n=tn, wg_dimension=wg, max_concurrent_steps=st, grid_tile_width=w,
                   grid_minor_dim=g)
              for tm, tn, wg, st in ((128, 128, "N", 4), (128, 128, "M", 4), (128, 64, "N", 5), (64, 128, "M", 5),
                                     (64, 64, "N", 6))
              for w in (4, 16) for g in ("N", "M")]


def supported(m: int, n: int, k: int) -> bool:
  return m % M_ALIGN == 0 and n % N_ALIGN == 0 and k % K_ALIGN == 0


def _weight_shape(b: jax.Array, layer) -> tuple[int, int]:
  if layer is not None:
    if b.ndim != 3:
      raise ValueError(f"gemm: with a layer index b is the stack [L, K, N], got {b.shape}")
    return b.shape[1:]
  return b.shape


def warp_specialized_kernel(kernel_body, out_type: jax.ShapeDtypeStruct, num_sms: int):
  """pl.kernel on a grid of `num_sms` CTAs of three warpgroups (two consumers, one producer; warpgroup
  semantics): the launch every persistent GEMM here shares (gemm_fp8.py's too)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return plgpu.kernel(
      kernel_body, out_type=out_type,
      grid=(num_sms,), grid_names=("cluster_grid",), cluster=(1,), cluster_names=("cluster",),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))


def _launch(body, a, b, extra, layer, out_type: jax.ShapeDtypeStruct, num_sms: int):
  """Runs body(a_gmem, b_gmem, *extra_gmem, out_gmem) on `num_sms` CTAs. With `layer`, b is a weight stack
  and the body gets the layer's [K, N] view of it, read in place."""
  args = (a, b, *extra)
  kernel_body = body
  if layer is not None:
    def kernel_body(layer_gmem, a_gmem, b_gmem, *rest):
      body(a_gmem, b_gmem.at[layer_gmem[0]], *rest)
    args = (jnp.asarray(layer, jnp.int32).reshape(1), *args)
  return warp_specialized_kernel(kernel_body, out_type, num_sms)(*args)


def gemm(a: jax.Array, b: jax.Array, residual: jax.Array | None = None, *, num_sms: int,
         config: dict | None = None, layer: jax.Array | int | None = None) -> jax.Array:
  """a [M, K] @ b [K, N] (+ residual [M, N]) on `num_sms` CTAs. With `layer`, b is the stacked weight
  [L, K, N] and the kernel reads b[layer] where it lies: the caller passes the whole stack instead of a
  slice, which a stream-annotated computation would otherwise receive as a copy (~7 ms per 8B step,
  docs/history/perf-notes.md)."""
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
  m, k = a.shape
  k2, n = _weight_shape(b, layer)
  if k != k2 or a.dtype != b.dtype:
    raise ValueError(f"gemm: incompatible operands {a.shape} {a.dtype} x {b.shape} {b.dtype}")
  if not supported(m, n, k):
    raise ValueError(f"gemm: M={m} N={n} K={k} must be multiples of {M_ALIGN}, {N_ALIGN}, {K_ALIGN}")
  cfg = dict(config or config_for(m, n, k, num_sms))
  # The grid's minor dimension and the dimension the two consumer warpgroups split: "M" or "N".
  dims = {d: getattr(hm.MatmulDimension, cfg.pop(d, "N")) for d in ("grid_minor_dim", "wg_dimension")}
  cfg = hm.TuningConfig(**cfg, **dims)

  def body(a_gmem, b_gmem, c_gmem, out_gmem):
    hm.kernel(a_gmem, b_gmem, c_gmem, out_gmem, config=cfg)
  out_dtype = a.dtype if residual is None else residual.dtype
  return _launch(body, a, b, (residual,), layer, jax.ShapeDtypeStruct((m, n), out_dtype), num_sms)


def cta_tile(cfg: dict) -> tuple[int, int]:
  """The CTA's output tile (rows, columns): the two consumer warpgroups' tiles side by side along
  wg_dimension (the kernels written here: gemm_silu_mul, gemm_fp8.py's)."""
  split_m = cfg["wg_dimension"] == "M"
  return cfg["tile_m"] * (1 + split_m), cfg["tile_n"] * (2 - split_m)


def silu_mul_supported(m: int, n: int, k: int, config: dict | None = None) -> bool:
  """n: the weight's columns, 2I. Each CTA's tile must divide M and I."""
  cfg = {**SILU_MUL_DEFAULT, **(config or {})}
  cta_m, cta_n = cta_tile(cfg)
  return n % 2 == 0 and m % cta_m == 0 and (n // 2) % cta_n == 0 and k % cfg["tile_k"] == 0


def gemm_silu_mul(a: jax.Array, b: jax.Array, *, num_sms: int, config: dict | None = None,
                  layer: jax.Array | int | None = None) -> jax.Array:
  """silu(a @ gate) * (a @ up) [M, I] for b = [gate | up] [K, 2I] (or the stack [L, K, 2I] with `layer`),
  on `num_sms` CTAs, without writing the [M, 2I] product."""
  m, k = a.shape
  k2, n = _weight_shape(b, layer)
  if k != k2 or a.dtype != b.dtype:
    raise ValueError(f"gemm_silu_mul: incompatible operands {a.shape} {a.dtype} x {b.shape} {b.dtype}")
  cfg = {**SILU_MUL_DEFAULT, **(config or {})}
  if not silu_mul_supported(m, n, k, cfg):
    raise ValueError(f"gemm_silu_mul: M={m}, K={k} and I={n // 2} do not divide into the tiles of {cfg}")
  body = functools.partial(_silu_mul_body, cfg=cfg)
  return _launch(body, a, b, (), layer, jax.ShapeDtypeStruct((m, n // 2), a.dtype), num_sms)


def _silu_mul_body(a_gmem, b_gmem, out_gmem, *, cfg: dict):
  from jax import lax
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  m, k = a_gmem.shape
  inter = out_gmem.shape[1]
  tile_m, tile_n, tile_k = cfg["tile_m"], cfg["tile_n"], cfg["tile_k"]
  split_m = cfg["wg_dimension"] == "M"
  cta_m, cta_n = cta_tile(cfg)
  m_tiles, n_tiles, k_steps = m // cta_m, inter // cta_n, k // tile_k
  itemsize = jnp.dtype(a_gmem.dtype).itemsize
  swizzle = plgpu.find_swizzle(tile_k * itemsize * 8)
  transforms = (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))
  epi_n = min(cfg["epi_tile_n"], tile_n)
  out_swizzle = plgpu.find_swizzle(epi_n * itemsize * 8)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // itemsize)), plgpu.SwizzleTransform(out_swizzle))

  def pipeline(step, context):
    smem = lambda shape, index: plgpu.BlockSpec(shape, index, transforms=transforms, memory_space=plgpu.SMEM)
    return plgpu.emit_pipeline_warp_specialized(
        step, grid=(k_steps,), memory_registers=40,
        in_specs=[smem((cta_m, tile_k), lambda kk: (0, kk)),      # the CTA's rows
                  smem((tile_k, cta_n), lambda kk: (kk, 0)),      # its gate columns
                  smem((tile_k, cta_n), lambda kk: (kk, 0))],     # the matching up columns
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=cfg["max_concurrent_steps"],
        compute_context=context)

  ignore = lambda *_, **__: None

  @functools.partial(pl.run_scoped,
                     allocations=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem, b_gmem),
                     out_smem=plgpu.SMEM((2, 2, tile_m, epi_n), out_gmem.dtype, transforms=out_transforms),
                     collective_axes="wg")
  def _scope(allocations, out_smem):
    wg = lax.axis_index("wg")

    @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="cluster_grid")
    def _tile(info):
      # jax's planar snake order: neighbouring CTAs share row or column tiles in L2.
      mi, ni = plgpu.planar_snake(info.index[0], (m_tiles, n_tiles), "MN".index(cfg["grid_minor_dim"]),
                                  cfg["grid_tile_width"])
      rows, cols = pl.ds(mi * cta_m, cta_m), pl.ds(ni * cta_n, cta_n)
      # This warpgroup's part of the CTA tile.
      wg_rows = pl.ds(wg * tile_m, tile_m) if split_m else slice(None)
      wg_cols = slice(None) if split_m else pl.ds(wg * tile_n, tile_n)

      def step(_, a_smem, gate_smem, up_smem, accs):
        gate_acc, up_acc = accs
        plgpu.wgmma(gate_acc, a_smem.at[wg_rows], gate_smem.at[:, wg_cols])
        plgpu.wgmma(up_acc, a_smem.at[wg_rows], up_smem.at[:, wg_cols])
        plgpu.wgmma_wait(0)
        return accs

      def context(run):
        @functools.partial(pl.run_scoped, gate_acc=plgpu.ACC((tile_m, tile_n), jnp.float32),
                           up_acc=plgpu.ACC((tile_m, tile_n), jnp.float32))
        def _accumulate(gate_acc, up_acc):
          run((gate_acc, up_acc))
          gate, up = gate_acc[...], up_acc[...]
          value = (gate / (1.0 + jnp.exp(-gate)) * up).astype(out_gmem.dtype)
          out = out_gmem.at[rows, cols].at[wg_rows, wg_cols]
          for j in range(tile_n // epi_n):
            slot = j % 2
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)   # the slot's previous store has read it
            out_smem[wg, slot] = value[:, j * epi_n:(j + 1) * epi_n]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], out.at[:, pl.ds(j * epi_n, epi_n)])

      pipeline(step, context)(a_gmem.at[rows, :], b_gmem.at[:, cols],
                              b_gmem.at[:, pl.ds(inter + ni * cta_n, cta_n)], allocations=allocations)
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)

