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
