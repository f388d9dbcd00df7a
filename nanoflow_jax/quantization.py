"""FP8 (e4m3) weights and activations: W8A8 with a scale per output channel for the weights and a scale per
token (dynamic) or per tensor (static, from the checkpoint) for the activations.

Why: on an H200 the bf16 step already runs at the board's power limit, and an fp8 GEMM does 1.86-1.94x the
bf16 work at the same power (docs/performance.md). The GEMM must see fp8 operands: XLA rewrites
`dot_general(a8, w8)` to cuBLASLt's fp8 matmul, but not the "dequantize, then dot" pattern (measured on
jax 0.11.2: that one runs in bf16, 0.61-0.95x of bf16). So both operands reach the dot as e4m3 and the scales
multiply its output: y[m, n] = (a8 @ w8)[m, n] * s_a[m] * s_w[n].

A quantized weight is two parameters: `name_fp8` (float8_e4m3fn, laid out [*out dims, K]: the contracted
dims moved last and flattened, as cuBLASLt's fp8 GEMM wants its B operand, K-major; with the weight [K, N]
XLA transposes it on every call and the "fp8" GEMM ran at 0.35-0.71x of bf16, measured) and `name_fp8_scale`
(float32 [*out dims]: one scale per output channel). A static activation scale is `name_fp8_input_scale`
(float32 scalar). Which weights: the dense layers' qkv, o, gate_up and down (QUANTIZED, with how many leading
dims each contracts); the embedding, the LM head, norms, the MoE router and experts stay in the model's dtype
(as vLLM keeps lm_head; the experts' grouped GEMM has no fp8 path yet).
"""
from __future__ import annotations

import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import ops_reference

log = logging.getLogger(__name__)

FP8 = ops_reference.E4M3
FP8_MAX = ops_reference.E4M3_MAX
MIN_SCALE = ops_reference.MIN_SCALE
SCHEMES = ("fp8",)
QUANTIZED = {"qkv": 1, "o": 2, "gate_up": 1, "down": 1}   # weight -> leading (contracted) dims


def fp8_name(name: str) -> str:
  return name + "_fp8"


def scale_name(name: str) -> str:
  return name + "_fp8_scale"


def input_scale_name(name: str) -> str:
  return name + "_fp8_input_scale"


def fp8_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The e4m3 weight's shape for weight `name` of (bf16) `shape`: [*out dims, K]."""
  nk = QUANTIZED[name]
  return (*shape[nk:], math.prod(shape[:nk]))


def scale_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The per-output-channel scale's shape for weight `name` of (bf16) `shape`."""
  return tuple(shape[QUANTIZED[name]:])


def to_fp8_layout(w, contracted: int):
  """w [..contracted.., ..out..] (jnp or numpy) -> [*out, K]: contracted dims last, flattened."""
  nd = w.ndim
  w = w.transpose(*range(contracted, nd), *range(contracted))
  return w.reshape(*w.shape[:nd - contracted], -1)


def quantize_weight(w: jax.Array, contracted: int) -> tuple[jax.Array, jax.Array]:
  """w [..contracted.., ..out..] -> (e4m3 weight [*out, K], float32 scale [*out]): each output channel's
  amax mapped to FP8_MAX."""
  # scaled and cast in the weight's own layout, then the 1-byte result moved K-major: no float32 transposed copy
  # (that version took 71 s for the 8B stack on an H200)
  axes = tuple(range(contracted))
  scale = jnp.maximum(jnp.max(jnp.abs(w), axis=axes).astype(jnp.float32), MIN_SCALE) / FP8_MAX
  w8 = (w.astype(jnp.float32) / scale).astype(FP8)
  return to_fp8_layout(w8, contracted), scale


# XLA's GPU compiler autotunes a new fusion by running candidate kernels on buffers of the real size, so a
# one-off program over a whole weight stack can compile for seconds per GB (session 21: quantize_stacked took
# 55-65 s for the 8B stack in a fresh process while the same program, compiled after similar fusions had been
# seen, ran in ~10 ms; a new fusion's compile took 1.4 s at 4 layers and 8.5-9.3 s at 32). Quantizing runs once
# per load, so it is compiled without autotuning, at one layer's size.
QUANTIZE_COMPILE_OPTIONS = {"xla_gpu_autotune_level": 0}


def quantize_stacked(layers: dict, sharding_fn=None) -> dict:
  """The stacked layer params [L, ...] with every QUANTIZED weight as `name_fp8` and its scale beside it,
  quantized layer by layer (one executable per weight kind, compiled for one layer) into new stacks; each
  bf16 stack is dropped as soon as its fp8 copy exists (peak memory: one weight kind twice).
  `sharding_fn(path, shape)` places the new arrays (TP); default: where XLA puts them."""
  from nanoflow_jax import compat, layer_stack
  out = dict(layers)
  for name, nk in QUANTIZED.items():
    if name not in out:
      continue
    w = out.pop(name)
    num_layers, shape = w.shape[0], w.shape[1:]
    on_host = isinstance(w, np.ndarray)   # the converter's stacks: each layer goes to the default device
    layer_sharding = None if on_host else layer_stack.layer_sharding(w.sharding)
    shardings = None
    if sharding_fn is not None:
      shardings = (sharding_fn(("layers_0", fp8_name(name)), fp8_shape(name, shape)),
                   sharding_fn(("layers_0", scale_name(name)), scale_shape(name, shape)))
    t = time.perf_counter()
    take = (lambda s, i: s[int(i)]) if on_host else compat.compile_with_options(
        jax.jit(lambda s, i: s[i], out_shardings=layer_sharding).lower(w, jax.ShapeDtypeStruct((), jnp.int32)),
        QUANTIZE_COMPILE_OPTIONS)
    quantize = compat.compile_with_options(
        jax.jit(lambda x: quantize_weight(x, nk), out_shardings=shardings).lower(
            jax.ShapeDtypeStruct(shape, w.dtype, sharding=layer_sharding)), QUANTIZE_COMPILE_OPTIONS)
    stack = layer_stack.LayerStack(num_layers)
    for i in range(num_layers):
      w8, scale = quantize(take(w, jnp.int32(i)))
      stack.put((f"layers_{i}", fp8_name(name)), w8)
      stack.put((f"layers_{i}", scale_name(name)), scale)
    new = jax.block_until_ready(stack.result()[1])
    log.info("quantized %s %s to fp8 in %.1f s", name, tuple(w.shape), time.perf_counter() - t)
    del w
    out.update(new)
  return out


def is_quantized(layers: dict) -> bool:
  return any(fp8_name(n) in layers for n in QUANTIZED)


def quantize_activation(x: jax.Array, input_scale: jax.Array | None = None, scale_ub: float | None = None,
                        amax_reduce=None) -> tuple[jax.Array, jax.Array]:
  """x [M, K] -> (e4m3 [M, K], float32 scale [M, 1]): per token (row) from its amax, clamped to `scale_ub`
  (fbgemm's activation_scale_ub) where given; or the checkpoint's static per-tensor `input_scale`."""
  if input_scale is None:   # (the math the fused kernels' references share: pallas_kernels/ops_reference.py)
    return ops_reference.quantize_rows(x, amax_reduce, scale_ub)
  scale = jnp.broadcast_to(jnp.reshape(input_scale, (1, 1)).astype(jnp.float32), (x.shape[0], 1))
  return jnp.clip(x.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX).astype(FP8), scale


def fp8_matmul(a: jax.Array, w8: jax.Array, w_scale: jax.Array, out_dtype, input_scale=None, scale_ub=None,
               amax_reduce=None):
  """a [M, K] (model dtype) times an e4m3 weight [N, K] (K-major) with its scale [N]: the fp8 GEMM (both
  operands e4m3), the scales applied to its output, the result in out_dtype."""
  a8, a_scale = quantize_activation(a, input_scale, scale_ub, amax_reduce)
  return scaled_fp8_dot(a8, a_scale, w8, w_scale, out_dtype)


# XLA's fp8 dot and its scales: pallas_kernels/ops_reference.py (the kernels' references use the same math)
scaled_fp8_dot = ops_reference.scaled_fp8_dot
fp8_dot = ops_reference.fp8_dot


def fp8_matmul_reference(a: np.ndarray, w8: np.ndarray, w_scale: np.ndarray, input_scale=None,
                         scale_ub=None) -> np.ndarray:
  """fp8_matmul in numpy (float64 products of the e4m3 values): the tests' reference."""
  import ml_dtypes
  a = np.asarray(a, np.float32)
  if input_scale is not None:
    s = np.full((a.shape[0], 1), float(np.asarray(input_scale).reshape(())), np.float32)
  else:
    amax = np.abs(a).max(axis=-1, keepdims=True)
    if scale_ub is not None:
      amax = np.minimum(amax, scale_ub)
    s = np.maximum(amax, MIN_SCALE) / FP8_MAX
  a8 = np.clip(a / s, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  w = np.asarray(w8).astype(np.float64)   # [N, K]
  return (a8 @ w.T) * s * np.asarray(w_scale, np.float64).reshape(1, -1)
