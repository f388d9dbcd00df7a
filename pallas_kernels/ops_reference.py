"""The model's elementwise math that both the model (nanoflow_jax/models/layers.py) and the fused kernels'
references use: it lives here, below both, so the kernels import nothing from nanoflow_jax."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  # As transformers computes it: normalize in fp32, cast back, then scale in the activation dtype.
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * xf.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotate-half RoPE (the Hugging Face layout). x: [..., heads, head_dim], positions: x.shape[:-2]."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [..., hd/2]
  cos = jnp.cos(freqs)[..., None, :]
  sin = jnp.sin(freqs)[..., None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def silu_and_mul(gate_up: jax.Array) -> jax.Array:
  """[..., 2, I] -> [..., I]: silu(gate) * up, computed in fp32."""
  g = gate_up[..., 0, :].astype(jnp.float32)
  u = gate_up[..., 1, :].astype(jnp.float32)
  return (jax.nn.silu(g) * u).astype(gate_up.dtype)


E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0                # the largest finite e4m3fn
MIN_SCALE = 1e-12               # an all-zero row or channel still gets a usable scale


def quantize_rows(x: jax.Array, amax_reduce=None, scale_ub: float | None = None) -> tuple[jax.Array, jax.Array]:
  """x [M, K] -> (e4m3 [M, K], float32 scale [M, 1]): each row (token) scaled from its amax, taken across
  devices by `amax_reduce` where given and clamped to `scale_ub` where given."""
  xf = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
  if amax_reduce is not None:
    amax = amax_reduce(amax)
  if scale_ub is not None:
    amax = jnp.minimum(amax, scale_ub)
  scale = jnp.maximum(amax, MIN_SCALE) / E4M3_MAX
  return jnp.clip(xf / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3), scale


def fp8_dot(a8: jax.Array, w8: jax.Array) -> jax.Array:
  """XLA's fp8 dot of e4m3 a8 [M, K] and w8 [N, K], unscaled. On the GPU cuBLASLt's fp8 GEMM writes bf16 (the
  measured 1.86-1.94x of bf16); elsewhere it accumulates to f32."""
  acc = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
  return jax.lax.dot_general(a8, w8, (((1,), (1,)), ((), ())), preferred_element_type=acc)


def scaled_fp8_dot(a8: jax.Array, a_scale: jax.Array, w8: jax.Array, w_scale: jax.Array, out_dtype) -> jax.Array:
  """fp8_dot, then the row scales [M, 1] and the channel scales [N], in out_dtype."""
  y = fp8_dot(a8, w8)
  return (y.astype(jnp.float32) * a_scale * w_scale.reshape(1, -1)).astype(out_dtype)
