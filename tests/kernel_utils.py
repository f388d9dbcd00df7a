"""Test helpers for kernels: Mosaic GPU interpret mode on the CPU, and a ragged paged batch."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.paged_attention import append_kv


@contextlib.contextmanager
def gpu_interpret():
  if jax.default_backend() == "gpu":
    yield
    return
  from pallas_kernels.jax_compat import gpu_interpret_mode
  with gpu_interpret_mode():
    yield


def page_layout(rng, ctx, chunk, page_size, num_pages, table_shape):
  """Page table (sequence i's pages drawn at random from the pool) and the step's token rows for sequences
  with `ctx` tokens cached, of which the last `chunk` are this step's: (table, slots, positions)."""
  pages = rng.permutation(num_pages)
  table = np.zeros(table_shape, np.int32)
  slots, positions = [], []
  used = 0
  for i, (c, n) in enumerate(zip(ctx, chunk)):
    need = -(-c // page_size)
    table[i, :need] = pages[used:used + need]
    used += need
    slots += [i] * n
    positions += list(range(c - n, c))
  return table, np.array(slots, np.int32), np.array(positions, np.int32)


def paged_batch(rng, hkv=2, g=2, d=32, page_size=4, num_pages=64, ctx=(5, 17, 1, 9), chunk=(1, 6, 1, 9), rows=6):
  """Sequences with `ctx` tokens cached, of which the last `chunk` are this step's tokens."""
  hq = hkv * g
  table, slots, positions = page_layout(rng, ctx, chunk, page_size, num_pages,
                                        (rows, -(-max(ctx) // page_size) + 1))
  lengths = list(chunk)
  layers = 3  # the batch lives in layer 1 of a 3-layer cache
  kc = jnp.zeros((layers, hkv, num_pages, page_size, d), jnp.float32)
  vc = jnp.asarray(rng.normal(size=(layers, hkv, num_pages, page_size, d)), jnp.float32)  # other layers: noise
  # write every cached token's K/V (earlier steps' and this chunk's)
  all_pos = np.concatenate([np.arange(c) for c in ctx])
  all_slot = np.concatenate([[i] * c for i, c in enumerate(ctx)])
  k = jnp.asarray(rng.normal(size=(len(all_pos), hkv, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(len(all_pos), hkv, d)), jnp.float32)
  kc, vc = append_kv(kc, vc, 1, k, v, jnp.asarray(table[all_slot, all_pos // page_size]),
                     jnp.asarray(all_pos % page_size))
  q = jnp.asarray(rng.normal(size=(len(slots), hq, d)), jnp.float32)
  return q, (kc, vc, 1), table, slots, positions, lengths, (k, v, all_slot, all_pos)


def one_call(fn, *args, iters: int = 1) -> float:
  """A stand-in for kernel_bench.timeit in CPU tests: one call, a nominal 1 ms (timings in the interpreter
  mean nothing; median_seconds would interpret each kernel six times)."""
  import jax
  jax.block_until_ready(fn(*args))
  return 1e-3
