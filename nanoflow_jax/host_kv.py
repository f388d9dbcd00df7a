"""The host-memory tier of the KV cache (NanoFlow's offload of finished requests' KV; vLLM's LMCache, SGLang's
HiCache): cached full pages that the GPU pool evicts are copied to host memory, and a prompt whose prefix is
there gets those pages copied back instead of recomputed.

The pool (kv_cache.PagePool) decides; this tier moves bytes:
- `save(kv, pages, keys)`: the evicted pages' K and V gathered on the device, one array per page, and put in
  pinned host memory (a JAX memory kind) with one asynchronous device_put. Nothing waits: the gather is
  dispatched before the step that overwrites those pages (the step's donation of the cache waits for its
  read), and the copies run on the copy engines beside the step.
- `lookup(keys)`: the longest run of keys the tier holds.
- `load(kv, pages, keys)`: those pages put back on the device (one device_put) and written into the given GPU
  pages (one scatter, the cache donated).
Page counts are padded to a power of two (the last page repeated) so that few sizes compile. Session 16's first
version copied through numpy (pageable memory) and waited for the previous copy at each save: 1.8-2.0 GB/s,
and a 64-sequence decode step with 64 pages saved before it took 7.1x as long.
Its own LRU bound: `capacity_pages`. A cache sharded over devices (tensor parallelism, several hosts) is saved
as it lies: each page array keeps the cache's sharding, in host memory, so every device's shard goes to its own
host's memory and comes back to the same device; the pool's decisions are the same in every process.
"""
from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp

from nanoflow_jax import compat, prefix_cache


@functools.partial(jax.jit, static_argnums=3)
def _pages_of(k, v, pages, n: int):
  """Pages `pages` of the cache as n arrays each of K and V ([layers, kv heads, page size, head dim])."""
  kk, vv = k[:, :, pages], v[:, :, pages]
  return [kk[:, :, i] for i in range(n)], [vv[:, :, i] for i in range(n)]


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _scatter(k, v, pages, ks, vs):
  """The pages' bytes written in place; a page index out of range (padding) writes nothing. unique_indices:
  XLA's GPU scatter otherwise writes each byte with an atomic compare-and-swap loop."""
  put = lambda cache, x: cache.at[:, :, pages].set(jnp.stack(x, axis=2), mode="drop", unique_indices=True)
  return put(k, ks), put(v, vs)


def _padded(n: int) -> int:
  return 1 << (n - 1).bit_length()


class HostKVTier:
  def __init__(self, capacity_pages: int):
    if capacity_pages < 1:
      raise ValueError(f"the host KV tier needs at least one page, got {capacity_pages}")
    self.capacity_pages = capacity_pages
    # key hash -> (key, K, V): one page's arrays in host memory; LRU first.
    self._pages: collections.OrderedDict[int, tuple] = collections.OrderedDict()
    self._host_kind = None   # the host memory kind (pinned where there is one), from the cache's devices
    self.saved = 0
    self.loaded = 0
    self.dropped = 0

  def __len__(self) -> int:
    return len(self._pages)

  def save(self, kv, pages: list[int], keys: list[tuple]) -> None:
    if not pages:
      return
    if self._host_kind is None:
      self._host_kind = compat.host_memory_kind(next(iter(kv[0].devices())))
    n = len(pages)
    padded = list(pages) + [pages[-1]] * (_padded(n) - n)
    ks, vs = _pages_of(*kv, jnp.asarray(padded, jnp.int32), len(padded))
    host = jax.device_put(ks[:n] + vs[:n], ks[0].sharding.with_memory_kind(self._host_kind))
    for i, key in enumerate(keys):
      self._pages.pop(key[0], None)
      self._pages[key[0]] = (key, host[i], host[n + i])
      self.saved += 1
    while len(self._pages) > self.capacity_pages:
      self._pages.popitem(last=False)
      self.dropped += 1

  def land(self) -> None:
    """Waits until every page saved so far is in host memory (the engine never needs to: a load's device_put
    waits for what it reads)."""
    jax.block_until_ready([a for _, k, v in self._pages.values() for a in (k, v)])

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
    entries = [self._pages[key[0]] for key in keys]
    n = len(entries)
    entries += [entries[-1]] * (_padded(n) - n)
    padded = list(pages) + [kv[0].shape[2]] * (len(entries) - n)   # padding: out of range, dropped
    device_kind = next(iter(kv[0].devices())).default_memory().kind
    on_device = jax.device_put([k for _, k, _ in entries] + [v for _, _, v in entries],
                               entries[0][1].sharding.with_memory_kind(device_kind))
    self.loaded += n
    return _scatter(*kv, jnp.asarray(padded, jnp.int32), on_device[:len(entries)], on_device[len(entries):])
