"""The host-memory tier of the KV cache (NanoFlow's offload of finished requests' KV; vLLM's LMCache, SGLang's
HiCache): cached full pages that the GPU pool evicts are copied to host memory, and a prompt whose prefix is
there gets those pages copied back instead of recomputed.

The pool (kv_cache.PagePool) decides; this tier moves bytes:
- `save(kv, pages, keys)`: the evicted pages' K and V gathered on the device and copied to the host
  asynchronously (copy_to_host_async). The gather is dispatched before the step that overwrites those pages, and
  the step's donation of the cache waits for it (PJRT orders a buffer's reads before its donation).
- `lookup(keys)`: the longest run of keys the tier holds.
- `load(kv, pages, keys)`: those pages' bytes written into the given GPU pages (one scatter, the cache donated).
Its own LRU bound: `capacity_pages`. One device only (a sharded cache would need a gather per shard).
"""
from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np

from nanoflow_jax import prefix_cache


@jax.jit
def _gather(k, v, pages):
  return k[:, :, pages], v[:, :, pages]


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _scatter(k, v, pages, k_new, v_new):
  return k.at[:, :, pages].set(k_new), v.at[:, :, pages].set(v_new)


class HostKVTier:
  def __init__(self, capacity_pages: int):
    if capacity_pages < 1:
      raise ValueError(f"the host KV tier needs at least one page, got {capacity_pages}")
    self.capacity_pages = capacity_pages
    # key hash -> (key, the batch it was saved in: [K, V], its index there); LRU first. A batch's arrays are
    # device arrays until their copy has landed, then numpy (the device buffers go).
    self._pages: collections.OrderedDict[int, tuple] = collections.OrderedDict()
    self._in_flight: list[list] = []
    self.saved = 0
    self.loaded = 0
    self.dropped = 0

  def __len__(self) -> int:
    return len(self._pages)

  def save(self, kv, pages: list[int], keys: list[tuple]) -> None:
    if not pages:
      return
    self.land()
    k, v = _gather(*kv, jnp.asarray(pages, jnp.int32))
    k.copy_to_host_async()
    v.copy_to_host_async()
    batch = [k, v]
    self._in_flight.append(batch)
    for i, key in enumerate(keys):
      self._pages.pop(key[0], None)
      self._pages[key[0]] = (key, batch, i)
      self.saved += 1
    while len(self._pages) > self.capacity_pages:
      self._pages.popitem(last=False)
      self.dropped += 1

  def land(self) -> None:
    """The copies started at earlier steps as host arrays (they have landed by now, or this waits for them)."""
    for batch in self._in_flight:
      batch[0], batch[1] = np.asarray(batch[0]), np.asarray(batch[1])
    self._in_flight = []

  def lookup(self, keys: list[tuple]) -> list[tuple]:
    """The longest leading run of `keys` held here (each checked against the stored key, as the pool does)."""
    run = []
    for key in keys:
      entry = self._pages.get(key[0])
      if entry is None or not prefix_cache.same_page(entry[0], key):
        break
      self._pages.move_to_end(key[0])
      run.append(key)
    return run

  def load(self, kv, pages: list[int], keys: list[tuple]):
    """kv with `keys`' saved bytes written into `pages` (the cache donated); returns the new (k, v)."""
    self.land()
    entries = [self._pages[key[0]] for key in keys]
    ks = np.stack([batch[0][:, :, i] for _, batch, i in entries], axis=2)
    vs = np.stack([batch[1][:, :, i] for _, batch, i in entries], axis=2)
    self.loaded += len(keys)
    return _scatter(*kv, jnp.asarray(pages, jnp.int32), ks, vs)
