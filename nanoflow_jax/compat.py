"""Differences between the JAX versions we run on (0.10.x on CPU/CI, 0.11.x on the GPU machine), and
process-level GPU settings that must be made before JAX initializes its backends."""
from __future__ import annotations

import os


def configure_gpu_memory(fraction: float = 0.95) -> None:
  """JAX preallocates 75% of GPU memory by default; the engine sizes the KV cache from what is really
  free, so let JAX take nearly all of it. No effect once a backend is up, or on the CPU."""
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(fraction))


def compute_on(f, compute_type: str):
  """Stream annotation: `compute_on` in jax >= 0.11.2, `compute_on2` before."""
  import jax
  from jax.experimental import compute_on as co
  fn = getattr(co, "compute_on2", None) or co.compute_on
  return fn(f, compute_type=compute_type, out_memory_spaces=jax.memory.Space.Device)
