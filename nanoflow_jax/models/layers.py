"""Stateless building blocks shared by every model: matmul, RMSNorm, RoPE, causal attention reference.

Precision policy: weights and activations in the model dtype (bf16 by default), matmuls accumulate in
fp32, norms, RoPE tables and softmax compute in fp32.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nanoflow_jax import quantization
from nanoflow_jax.config import RopeConfig
from pallas_kernels.ops_reference import apply_rope, rms_norm, silu_and_mul  # noqa: F401 (the math the kernels' references share)


# A GEMM kernel the runtime installs while it traces a step: fn(a [M, K], b [K, N], residual [M, N] | None,
# stacked, epilogue=None) returns the product, or None where the kernel does not take that shape (then XLA's
# dot runs). `stacked`: (the stacked weight [L, ...], layer index) that b is a slice of, where the runtime
# registered it (use_stacked_weights), else None. epilogue "silu_mul" (from linear_silu_mul only): b holds
# [gate | up] along N and the result is silu(gate) * up [M, N / 2]; None there means "not fused".
GemmFn = Callable[[jax.Array, jax.Array, "jax.Array | None", "tuple | None"], "jax.Array | None"]
_GEMM: contextvars.ContextVar[GemmFn | None] = contextvars.ContextVar("gemm", default=None)


@contextlib.contextmanager
def _installed(var: contextvars.ContextVar, value):
  """`value` in `var` while the block runs (what the runtime installs while it traces a step)."""
  token = var.set(value)
  try:
    yield
  finally:
    var.reset(token)


def use_gemm(fn: GemmFn | None):
  return _installed(_GEMM, fn)


# Grouped (mixture-of-experts) GEMM: (rows sorted by group, weights [G, K, N], group sizes, epilogue None or
# "silu_mul") -> result, or None to fall back to lax.ragged_dot.
GroupedGemmFn = Callable[[jax.Array, jax.Array, jax.Array, "str | None"], "jax.Array | None"]
_GROUPED: contextvars.ContextVar[GroupedGemmFn | None] = contextvars.ContextVar("grouped_gemm", default=None)


def use_grouped_gemm(fn: GroupedGemmFn | None):
  return _installed(_GROUPED, fn)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, epilogue: str | None = None) -> jax.Array:
  """Rows of x sorted by group times their group's weight (w [G, K, N]); with epilogue "silu_mul", w holds
  [gate | up] along N and the result is silu(gate) * up [rows, N / 2]. Through the installed kernel where
  it takes the shapes, else lax.ragged_dot."""
  fn = _GROUPED.get()
  out = fn(x, w, group_sizes, epilogue) if fn is not None else None
  if out is not None:
    return out
  y = jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32).astype(x.dtype)
  if epilogue == "silu_mul":
    y = silu_and_mul(y.reshape(*y.shape[:-1], 2, -1))
  return y


_STACKED: contextvars.ContextVar[dict] = contextvars.ContextVar("stacked", default={})


def use_stacked_weights(slices: dict[int, tuple[jax.Array, jax.Array]]):
  """While a layer is traced: id(weight slice) -> (the stacked weight, layer index), handed to the GEMM."""
  return _installed(_STACKED, slices)


def linear(x: jax.Array, w: jax.Array, spec: str, residual: jax.Array | None = None, fp8: "Fp8 | None" = None
           ) -> jax.Array:
  """einsum whose contraction is x's trailing dims against w's leading dims (every weight here), with
  fp32 accumulation, result in x's dtype, plus an optional residual (fused into the GEMM's epilogue
  when a kernel is installed). With `fp8` (w is e4m3): the fp8 GEMM, activations quantized per token."""
  if fp8 is not None:
    return _fp8_linear(x, w, spec, residual, fp8)
  y = _small_linear(x, w, _contracted_dims(spec), residual, silu_mul=False)
  if y is not None:
    return y
  if isinstance(x, NormedRows):   # (the small-step kernel declined: the norm as the unfused layers compute it)
    x = x.normed()
  gemm = _GEMM.get()
  if gemm is not None:
    nk = _contracted_dims(spec)
    k = math.prod(x.shape[x.ndim - nk:])
    a = x.reshape(-1, k)
    out = gemm(a, w.reshape(k, -1), None if residual is None else residual.reshape(a.shape[0], -1),
               _STACKED.get().get(id(w)))
    if out is not None:
      return out.reshape(*x.shape[:x.ndim - nk], *w.shape[nk:])
  y = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(x.dtype)
  return y if residual is None else y + residual


_TP_AXIS: contextvars.ContextVar[str | None] = contextvars.ContextVar("tp_axis", default=None)


def use_tp_axis(axis: str | None):
  """While a layer is traced under manual TP (shard_map): the mesh axis its row-parallel GEMMs' contracted
  dim is split over. An fp8 GEMM there takes each token's amax across the devices (pmax), so every device
  quantizes its slice of the row with the row's one scale: the single device's numbers exactly."""
  return _installed(_TP_AXIS, axis)


class Fp8(NamedTuple):
  """What an fp8 weight brings to `linear`: its per-output-channel scale, and the checkpoint's static input
  scale or the dynamic scale's upper bound (fbgemm), where there is one."""
  scale: jax.Array
  input_scale: jax.Array | None = None
  scale_ub: float | None = None
  row_parallel: bool = False   # o and down: under TP their input is split along K


def _contracted_dims(spec: str) -> int:
  """How many of x's trailing dims a linear's einsum spec ("...h,hkgd->...kgd") contracts."""
  lhs, rest = spec.split(",")
  out_spec = rest.split("->")[1]
  return len(set(lhs.replace("...", "")) - set(out_spec))


# An fp8 GEMM kernel the runtime installs while it traces a step: fn(a8 [M, K], a_scale [M, 1], w8 [N, K],
# w_scale [N], residual [M, N] | None, stacked, epilogue=None) returns the scaled product in the residual's
# (or the model's) dtype, or None where it does not take the shape (then XLA's fp8 dot runs). `stacked`:
# ((weight stack, layer index), (scale stack, layer index)) where the runtime registered the weight and its
# scale (use_stacked_weights), else None. epilogue "silu_mul": w8 is [gate; up] [2I, K], the result
# silu(gate) * up [M, I].
Fp8GemmFn = Callable[..., "jax.Array | None"]
_FP8_GEMM: contextvars.ContextVar[Fp8GemmFn | None] = contextvars.ContextVar("fp8_gemm", default=None)


def use_fp8_gemm(fn: Fp8GemmFn | None):
  return _installed(_FP8_GEMM, fn)


@jax.tree_util.register_pytree_node_class
class Fp8Rows:
  """An activation already quantized per token (e4m3 q [..., K], float32 scale [..., 1], and the model dtype
  it stands for): what linear_silu_mul gives for the next GEMM where a fused kernel quantized it, and what
  `linear` takes in place of x (then its own quantization is skipped)."""

  def __init__(self, q: jax.Array, scale: jax.Array, dtype):
    self.q, self.scale, self.dtype = q, scale, jnp.dtype(dtype)

  shape = property(lambda self: self.q.shape)
  ndim = property(lambda self: self.q.ndim)

  def tree_flatten(self):
    return (self.q, self.scale), self.dtype

  @classmethod
  def tree_unflatten(cls, dtype, children):
    return cls(*children, dtype)


# The fp8 MLP's middle as one kernel, installed by the runtime while it traces a step: fn(acc [M, 2I] (the
# gate_up fp8 dot's unscaled product), a_scale [M, 1], w_scale [2I], out_dtype) -> (e4m3 [M, I], float32
# scale [M, 1]): the output scales, silu(gate) * up in the model dtype, then the per-token quantization, as
# the unfused ops compute them; or None where it does not take the shape.
SiluMulQuantFn = Callable[..., "tuple[jax.Array, jax.Array] | None"]
_SILU_MUL_QUANT: contextvars.ContextVar[SiluMulQuantFn | None] = contextvars.ContextVar("silu_mul_quant",
                                                                                         default=None)


def use_silu_mul_quant(fn: SiluMulQuantFn | None):
  return _installed(_SILU_MUL_QUANT, fn)


# RMSNorm fused with the next fp8 GEMM's per-token quantization, installed by the runtime: fn(x [M, H], scale
# [H], eps) -> (e4m3 [M, H], float32 scale [M, 1]) as rms_norm then quantize_rows compute them, or None.
RmsNormQuantFn = Callable[..., "tuple[jax.Array, jax.Array] | None"]
_RMS_NORM_QUANT: contextvars.ContextVar[RmsNormQuantFn | None] = contextvars.ContextVar("rms_norm_quant",
                                                                                         default=None)


def use_rms_norm_quant(fn: RmsNormQuantFn | None):
  return _installed(_RMS_NORM_QUANT, fn)


# A small step's whole fp8 GEMM op as one kernel (pallas_kernels/small_gemm_fp8_triton.py), installed by the
# runtime with the most rows it takes: fn(x [M, K] in the model dtype, w8 [N, K], w_scale [N], norm (scale [K],
# eps) or None, residual [M, N] or None, silu_mul) -> the op's result, or None where it does not take it.
SmallFp8GemmFn = Callable[..., "jax.Array | None"]
_SMALL_FP8_GEMM: contextvars.ContextVar["tuple[SmallFp8GemmFn, int] | None"] = contextvars.ContextVar(
    "small_fp8_gemm", default=None)


def use_small_fp8_gemm(fn: SmallFp8GemmFn | None, max_rows: int = 0):
  return _installed(_SMALL_FP8_GEMM, None if fn is None else (fn, max_rows))


# The same for unquantized (bf16/f16) weights (pallas_kernels/small_gemm.py): fn(x [M, K], w [K, N], norm (scale
# [K], eps) or None, residual [M, N] or None, silu_mul) -> the op's result, or None where it does not take it.
SmallGemmFn = Callable[..., "jax.Array | None"]
_SMALL_GEMM: contextvars.ContextVar["tuple[SmallGemmFn, int] | None"] = contextvars.ContextVar(
    "small_gemm", default=None)


def use_small_gemm(fn: SmallGemmFn | None, max_rows: int = 0):
  return _installed(_SMALL_GEMM, None if fn is None else (fn, max_rows))


def _small_unquantized_step(rows: int):
  """The installed small-step kernel for unquantized weights where it takes `rows` input rows, else None."""
  small = _SMALL_GEMM.get()
  return small[0] if small is not None and rows <= small[1] else None


def _small_linear(x, w, nk: int, residual, silu_mul: bool):
  """linear / linear_silu_mul of unquantized w through the installed small-step kernel, or None where there is
  none for the step or it declines."""
  small = _small_unquantized_step(math.prod(x.shape[:x.ndim - nk]))
  if small is None:
    return None
  out_dims = w.shape[-1:] if silu_mul else w.shape[nk:]   # silu_mul: [K.., 2, I] -> [I]
  k = math.prod(x.shape[x.ndim - nk:])
  return _small_op(small, x, nk, out_dims, (w.reshape(k, -1),), residual, silu_mul)


def _small_op(small, x, nk: int, out_dims, weights, residual, silu_mul: bool):
  """The whole op through a small-step kernel (either weight kind: `weights` as the kernel takes them), reshaped
  as the layer's; None where the kernel declines. x may be NormedRows (the norm goes into the kernel's
  prologue)."""
  rows = x.x if isinstance(x, NormedRows) else x
  norm = (x.scale, x.eps) if isinstance(x, NormedRows) else None
  res = None if residual is None else residual.reshape(-1, math.prod(out_dims))
  y = small(rows.reshape(-1, math.prod(x.shape[x.ndim - nk:])), *weights, norm, res, silu_mul)
  return None if y is None else y.reshape(*x.shape[:x.ndim - nk], *out_dims)


class NormedRows(NamedTuple):
  """rms_norm(x, scale, eps), not yet computed: the next GEMM's small-step kernel computes it in its prologue
  (rms_norm_for gives it where the runtime installed that kernel; `linear` takes it in place of x, and computes
  the norm itself if the kernel declines)."""
  x: jax.Array
  scale: jax.Array
  eps: float

  shape = property(lambda self: self.x.shape)
  ndim = property(lambda self: self.x.ndim)

  def normed(self) -> jax.Array:
    return rms_norm(self.x, self.scale, self.eps)


def _small_step(rows: int, fp8: Fp8 | None):
  """The installed small-step kernel where it takes `rows` input rows for the GEMM of `fp8`, else None."""
  small = _SMALL_FP8_GEMM.get()
  if small is None or not _takes_fused_quantization(fp8):
    return None
  return small[0] if rows <= small[1] else None


def _takes_fused_quantization(fp8: Fp8 | None) -> bool:
  """Whether the GEMM of `fp8` can take activations a fused kernel quantized: dynamic per-token scales with
  no upper bound, and not a row-parallel GEMM under TP (the kernels' amax is this device's part of the row)."""
  return (fp8 is not None and fp8.input_scale is None and fp8.scale_ub is None
          and not (fp8.row_parallel and _TP_AXIS.get()))


def rms_norm_for(x: jax.Array, scale: jax.Array, eps: float, quantize_for: Fp8 | None = None
                 ) -> "jax.Array | Fp8Rows | NormedRows":
  """rms_norm(x), or, where the runtime installed the fused kernel and `quantize_for` (the next GEMM's Fp8)
  takes it, that norm already quantized for the GEMM (Fp8Rows: never written in the model dtype), or, in a
  step the small-step fp8 kernel takes, the norm left to that kernel (NormedRows)."""
  rows = math.prod(x.shape[:-1])
  if _small_step(rows, quantize_for) is not None:   # the norm goes into the fp8 GEMM's prologue
    return NormedRows(x, scale, eps)
  if quantize_for is None and _small_unquantized_step(rows) is not None:   # or the unquantized GEMM's
    return NormedRows(x, scale, eps)
  fused = _RMS_NORM_QUANT.get()
  if fused is not None and _takes_fused_quantization(quantize_for):
    out = fused(x.reshape(-1, x.shape[-1]), scale, eps)
    if out is not None:
      return Fp8Rows(out[0].reshape(x.shape), out[1].reshape(*x.shape[:-1], 1), x.dtype)
  return rms_norm(x, scale, eps)


def _fp8_linear(x, w8, spec, residual, fp8: Fp8, epilogue: str | None = None, quantize_for: Fp8 | None = None):
  """w8 is [*out dims, K] (quantization.py's layout). Activations are quantized here (under TP with the
  row's amax across devices) unless x is already Fp8Rows, then the installed fp8 GEMM or XLA's fp8 dot.
  With epilogue "silu_mul" and `quantize_for` (the next GEMM's Fp8), the result may come back as Fp8Rows
  from the installed silu_mul_quant kernel (then it is never written in the model dtype)."""
  nk = _contracted_dims(spec)
  k = math.prod(x.shape[x.ndim - nk:])
  out_dims = w8.shape[:-1] if epilogue is None else w8.shape[-2:-1]   # silu_mul: [2, I, K] -> [I]
  small = None if isinstance(x, Fp8Rows) else _small_step(math.prod(x.shape[:x.ndim - nk]), fp8)
  if small is not None:   # the whole op in one kernel: (the norm,) the quantization, the GEMM, the epilogue
    y = _small_op(small, x, nk, out_dims, (w8.reshape(-1, k), fp8.scale.reshape(-1)), residual, epilogue == "silu_mul")
    if y is not None:
      return y
  if isinstance(x, NormedRows):   # (the kernel declined: the norm as the unfused layers compute it)
    x = x.normed()
  if isinstance(x, Fp8Rows):
    a8, a_scale = x.q.reshape(-1, k), x.scale.reshape(-1, 1)
  else:
    axis = _TP_AXIS.get() if fp8.row_parallel else None
    a8, a_scale = quantization.quantize_activation(x.reshape(-1, k), fp8.input_scale, fp8.scale_ub,
                                                   amax_reduce=(lambda a: jax.lax.pmax(a, axis)) if axis else None)
  w2, s1 = w8.reshape(-1, k), fp8.scale.reshape(-1)
  res2 = None if residual is None else residual.reshape(a8.shape[0], -1)
  fn = _FP8_GEMM.get()
  y = None
  if fn is not None:
    found = _STACKED.get()
    stacked = (found[id(w8)], found[id(fp8.scale)]) if id(w8) in found and id(fp8.scale) in found else None
    y = fn(a8, a_scale, w2, s1, res2, stacked, epilogue=epilogue)
  if y is None:
    fused = _SILU_MUL_QUANT.get()
    if epilogue == "silu_mul" and fused is not None and _takes_fused_quantization(quantize_for):
      out = fused(quantization.fp8_dot(a8, w2), a_scale, s1, x.dtype)
      if out is not None:
        lead = x.shape[:x.ndim - nk]
        return Fp8Rows(out[0].reshape(*lead, *out_dims), out[1].reshape(*lead, 1), x.dtype)
    y = quantization.scaled_fp8_dot(a8, a_scale, w2, s1, x.dtype)
    if epilogue == "silu_mul":
      y = silu_and_mul(y.reshape(y.shape[0], 2, -1))
    if res2 is not None:
      y = y + res2
  return y.reshape(*x.shape[:x.ndim - nk], *out_dims)


def linear_silu_mul(x: jax.Array, w: jax.Array, spec: str, fp8: Fp8 | None = None,
                    quantize_for: Fp8 | None = None) -> "jax.Array | Fp8Rows":
  """silu(gate) * up of linear(x, w, spec), where w's two trailing dims are [2 (gate, up), I]: one GEMM
  with the activation in its epilogue where the installed kernel fuses it, else the GEMM then
  silu_and_mul. In fp8 with `quantize_for` (the next GEMM's Fp8), possibly already quantized for it
  (Fp8Rows: see _fp8_linear)."""
  if fp8 is not None:
    return _fp8_linear(x, w, spec, None, fp8, epilogue="silu_mul", quantize_for=quantize_for)
  y = _small_linear(x, w, w.ndim - 2, None, silu_mul=True)
  if y is not None:
    return y
  if isinstance(x, NormedRows):
    x = x.normed()
  gemm = _GEMM.get()
  if gemm is not None:
    k = math.prod(w.shape[:-2])
    a = x.reshape(-1, k)
    out = gemm(a, w.reshape(k, -1), None, _STACKED.get().get(id(w)), epilogue="silu_mul")
    if out is not None:
      return out.reshape(*x.shape[:x.ndim - (w.ndim - 2)], w.shape[-1])
  return silu_and_mul(linear(x, w, spec))




def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
  """Inverse frequencies [head_dim // 2] in fp32, with linear or llama3 scaling applied."""
  inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if rope.type == "linear":
    inv = inv / rope.factor
  elif rope.type == "llama3":
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, sliding_window: int | None = None,
                     lengths: jax.Array | None = None) -> jax.Array:
  """Reference attention over whole sequences. q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] -> [B, T, Hq, D].

  GQA: query head h reads KV head h // (Hq // Hkv). `lengths` [B] masks right padding.
  """
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, t, hkv, hq // hkv, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
  qpos = jnp.arange(t)[:, None]
  kpos = jnp.arange(t)[None, :]
  mask = kpos <= qpos
  if sliding_window is not None:
    mask &= qpos - kpos < sliding_window
  mask = mask[None, None, None]
  if lengths is not None:
    mask &= (kpos < lengths[:, None, None])[:, None, None]
  scores = jnp.where(mask, scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, hq, d).astype(q.dtype)
