"""GEMM on a chosen number of SMs (Mosaic GPU: persistent, warp-specialized wgmma + TMA pipeline).

The kernel body is jax's Hopper matmul (`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu.kernel`),
used as a library: a persistent loop over output tiles, two consumer warpgroups issuing wgmma, one
producer warpgroup issuing TMA loads, and an optional residual add in the epilogue (out = a @ b + c).
What we add is the grid: that op always launches one CTA per SM of the device, while overlapping
kernels need each one limited to its SM share, so we launch `num_sms` CTAs and the persistent loop
spreads the tiles over them. Tile configurations per shape come from gemm_configs.json (written by
`launch/kernel_bench.py --tune_gemm`, keyed "MxNxK" or "MxNxK@num_sms"), else DEFAULT.

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


def gemm_reference(a: jax.Array, b: jax.Array, residual: jax.Array | None = None) -> jax.Array:
  out = jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)
  return out if residual is None else out + residual


@functools.cache
def _tuned() -> dict[str, dict]:
  if os.path.exists(CONFIG_FILE):
    with open(CONFIG_FILE) as f:
      return json.load(f)
  return {}


def config_for(m: int, n: int, k: int, num_sms: int) -> dict:
  return {**DEFAULT, **_tuned().get(f"{m}x{n}x{k}@{num_sms}", _tuned().get(f"{m}x{n}x{k}", {}))}


# What the tuner tries per shape (launch/kernel_bench.py --tune_gemm). tile_m x tile_n is one consumer
# warpgroup's tile; the CTA's is twice that along wg_dimension. Stages fill the 227 KiB of shared memory.
# Smaller CTA tiles give small-N shapes (TP shards) more tiles than SMs.
TUNE_SPACE = [dict(tile_m=tm, tile_n=tn, wg_dimension=wg, max_concurrent_steps=st, grid_tile_width=w,
                   grid_minor_dim=g)
              for tm, tn, wg, st in ((128, 128, "N", 4), (128, 128, "M", 4), (128, 64, "N", 5), (64, 128, "M", 5),
                                     (64, 64, "N", 6))
              for w in (4, 16) for g in ("N", "M")]


def supported(m: int, n: int, k: int) -> bool:
  return m % M_ALIGN == 0 and n % N_ALIGN == 0 and k % K_ALIGN == 0


def gemm(a: jax.Array, b: jax.Array, residual: jax.Array | None = None, *, num_sms: int,
         config: dict | None = None, layer: jax.Array | int | None = None) -> jax.Array:
  """a [M, K] @ b [K, N] (+ residual [M, N]) on `num_sms` CTAs. With `layer`, b is the stacked weight
  [L, K, N] and the kernel reads b[layer] where it lies: the caller passes the whole stack instead of a
  slice, which a stream-annotated computation would otherwise receive as a copy (~7 ms per 8B step,
  docs/perf-notes.md)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
  m, k = a.shape
  if layer is not None:
    if b.ndim != 3:
      raise ValueError(f"gemm: with a layer index b is the stack [L, K, N], got {b.shape}")
    k2, n = b.shape[1:]
  else:
    k2, n = b.shape
  if k != k2 or a.dtype != b.dtype:
    raise ValueError(f"gemm: incompatible operands {a.shape} {a.dtype} x {b.shape} {b.dtype}")
  if not supported(m, n, k):
    raise ValueError(f"gemm: M={m} N={n} K={k} must be multiples of {M_ALIGN}, {N_ALIGN}, {K_ALIGN}")
  cfg = dict(config or config_for(m, n, k, num_sms))
  # The grid's minor dimension and the dimension the two consumer warpgroups split: "M" or "N".
  dims = {d: getattr(hm.MatmulDimension, cfg.pop(d, "N")) for d in ("grid_minor_dim", "wg_dimension")}
  cfg = hm.TuningConfig(**cfg, **dims)
  body = functools.partial(hm.kernel, config=cfg)
  args = (a, b, residual)
  if layer is not None:
    def body(layer_gmem, a_gmem, b_gmem, c_gmem, out_gmem):   # noqa: F811 (the stacked variant)
      hm.kernel(a_gmem, b_gmem.at[layer_gmem[0]], c_gmem, out_gmem, config=cfg)
    args = (jnp.asarray(layer, jnp.int32).reshape(1), *args)
  f = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((m, n), a.dtype if residual is None else residual.dtype),
      grid=(num_sms,), grid_names=("cluster_grid",), cluster=(1,), cluster_names=("cluster",),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
  return f(*args)
