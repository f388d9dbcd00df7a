"""Paged KV cache: the host-side page pool and the device arrays.

Device layout: K and V, each one array [layers, kv_heads, num_pages, page_size, head_dim] (a head's page
is contiguous, for the attention kernels; one array for all layers so the layer scan never copies one out). A token at position p of a sequence lives in page
`page_table[p // page_size]` at offset `p % page_size`.
Page `num_pages` does not exist: writes aimed there (padding tokens) are dropped.
"""
from __future__ import annotations

import collections
import logging
import os

import jax
import jax.numpy as jnp

from nanoflow_jax import prefix_cache
from nanoflow_jax.config import ModelConfig

log = logging.getLogger(__name__)

CPU_KV_CAP_BYTES = 1 << 30  # without a GPU, keep the cache modest
GPU_RESERVE_BYTES = 6 << 30  # left free for activations, XLA's autotuning and the sampler's [R, vocab] arrays


class PagePool:
  """Page ids. A page is free, or held by one or more sequences (reference-counted: sequences that share a
  cached prefix hold its pages together). With caching, a full page whose KV is written can be registered
  under its key (the hash of its prefix and its tokens, prefix_cache.py); a cached page no sequence holds
  stays as it is until the pool needs it, then goes least recently used first. Such pages count as free."""

  def __init__(self, num_pages: int, page_size: int, caching: bool = False):
    if num_pages < 1 or page_size < 1:
      raise ValueError(f"need num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}")
    self.num_pages = num_pages
    self.page_size = page_size
    self.caching = caching
    self._free = list(range(num_pages - 1, -1, -1))  # pages without content; pop() hands out low ids first
    self._refs = [0] * num_pages
    self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unheld: LRU first
    self._key_of: dict[int, tuple] = {}   # cached page -> its key (hash, tokens)
    self._page_of: dict[int, int] = {}    # hash -> cached page
    self.extra_holds = 0                  # holds beyond the first on shared pages (admission counts pages per holder)
    self.host = None                      # a host_kv.HostKVTier, or None
    self.evicted: list[tuple[int, tuple]] = []   # (page, key) evicted since the engine last saved them to the host
    self.uploads: list[tuple[int, tuple]] = []   # (page, key) to fill from the host tier before the next step
    self.host_hit_tokens = 0
    self.evictions = 0                    # cached pages reused for other content
    self.queried_tokens = 0               # prompt tokens looked up, and those found (the hit rate)
    self.hit_tokens = 0

  @property
  def num_free(self) -> int:
    return len(self._free) + len(self._evictable)

  @property
  def num_used(self) -> int:
    return self.num_pages - self.num_free

  @property
  def num_cached(self) -> int:
    return len(self._key_of)

  def pages_for(self, num_tokens: int) -> int:
    return -(-num_tokens // self.page_size)

  def allocate(self, n: int) -> list[int]:
    if n > self.num_free:
      raise MemoryError(f"asked for {n} pages, {self.num_free} free")
    out = []
    for _ in range(n):
      if self._free:
        page = self._free.pop()
      else:   # the least recently used cached page nobody holds
        page, _ = self._evictable.popitem(last=False)
        key = self._key_of.pop(page)
        del self._page_of[key[0]]
        self.evictions += 1
        if self.host is not None:
          self.evicted.append((page, key))
      self._refs[page] = 1
      out.append(page)
    return out

  def free(self, pages: list[int]) -> None:
    """Drops one hold on each page; a page nobody holds is free again (cached pages keep their content)."""
    plain = []
    for page in pages:
      if self._refs[page] <= 0:
        raise AssertionError(f"page {page} freed twice")
      if self._refs[page] > 1:
        self.extra_holds -= 1
      self._refs[page] -= 1
      if self._refs[page] == 0:
        if page in self._key_of:
          self._evictable[page] = None
        else:
          plain.append(page)
    self._free.extend(reversed(plain))

  def register(self, page: int, key: tuple) -> None:
    """Records that held page `page` holds the KV of `key`'s tokens. The first page with a key keeps it
    (two sequences that computed the same prefix at once leave one cached copy)."""
    if not self.caching or self._refs[page] <= 0:
      return
    if key[0] in self._page_of or page in self._key_of:
      return
    self._key_of[page], self._page_of[key[0]] = key, page

  def acquire_cached(self, keys: list[tuple]) -> list[int]:
    """The pages of the longest run of `keys` (one per full page of a prompt, in order) that is cached,
    each now held once more."""
    pages = []
    for key in keys:
      page = self._page_of.get(key[0])
      if page is None or not prefix_cache.same_page(self._key_of[page], key):   # (a hash collision is a miss)
        break
      pages.append(page)
    for page in pages:
      if self._refs[page] == 0:
        del self._evictable[page]
      else:
        self.extra_holds += 1
      self._refs[page] += 1
    return pages

  def forget(self, pages: list[int]) -> None:
    """Their content is not to be trusted (a failed step may not have written it): uncache them."""
    dropped = set(pages)
    self.uploads = [(p, k) for p, k in self.uploads if p not in dropped]
    for page in pages:
      key = self._key_of.pop(page, None)
      if key is None:
        continue
      del self._page_of[key[0]]
      if page in self._evictable:
        del self._evictable[page]
        self._free.append(page)

  def forget_unheld(self) -> None:
    """Uncaches every cached page no sequence holds (after a step failed while the engine went on)."""
    self.forget(list(self._evictable))

  def check(self) -> None:
    """The pool's invariants (tests): every page exactly one of free / held / cached-unheld."""
    free, evictable = set(self._free), set(self._evictable)
    held = {p for p in range(self.num_pages) if self._refs[p] > 0}
    assert len(free) == len(self._free), "a page is free twice"
    assert not (free & evictable) and not (free & held) and not (evictable & held)
    assert free | evictable | held == set(range(self.num_pages)), "a page is lost"
    assert all(r >= 0 for r in self._refs)
    assert self.extra_holds == sum(r - 1 for r in self._refs if r > 1), "extra holds miscounted"
    assert evictable <= set(self._key_of) and not (free & set(self._key_of))
    assert {self._page_of[k[0]] for k in self._key_of.values()} == set(self._key_of)


def page_bytes(cfg: ModelConfig, page_size: int, dtype) -> int:
  return cfg.kv_bytes_per_token(jnp.dtype(dtype).itemsize) * page_size


def pages_from_memory(cfg: ModelConfig, page_size: int, dtype, kv_memory_fraction: float,
                      kv_shards: int = 1) -> int:
  """How many pages fit in `kv_memory_fraction` of the memory still free on the first device. kv_shards:
  the devices a page is split over (by KV head under tensor parallelism); each GPU holds 1/kv_shards of
  every page. Host devices share one memory, so there a page costs its whole size."""
  stats = _gpu_memory_stats()
  per_page = page_bytes(cfg, page_size, dtype)
  if stats and "bytes_limit" in stats:
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0) - GPU_RESERVE_BYTES
    budget = int(max(free, 0) * kv_memory_fraction)
    per_page = -(-per_page // kv_shards)
  else:
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    budget = min(int(avail * kv_memory_fraction), CPU_KV_CAP_BYTES)
  n = budget // per_page
  if n < 1:
    raise MemoryError(f"no room for a KV page: {budget} bytes available for the cache")
  return int(n)


def _gpu_memory_stats() -> dict | None:
  """The first device's allocator figures; None off the GPU."""
  dev = jax.devices()[0]
  return dev.memory_stats() if dev.platform == "gpu" else None


def largest_free_block() -> int | None:
  """The largest allocation the first device's allocator can place now (its largest free block, or the
  room it has not yet reserved from the driver); None where the allocator does not say (CPU)."""
  stats = _gpu_memory_stats()
  if not stats or "largest_free_block_bytes" not in stats:
    return None
  unreserved = stats.get("bytes_limit", 0) - stats.get("pool_bytes", stats.get("bytes_limit", 0))
  return max(int(stats["largest_free_block_bytes"]), int(unreserved))


def allocate_kv_fitting(cfg: ModelConfig, num_pages: int, page_size: int, dtype, sharding=None,
                        kv_shards: int = 1, tries: int = 6) -> tuple[int, tuple[jax.Array, jax.Array]]:
  """(pages, (K, V)) for a cache sized from free memory, at most `num_pages`. K and V each need one
  contiguous block, and free memory can be split: stacking the layer weights frees the per-layer arrays
  below the stack (the 70B at TP 4 had a 29 GB hole below its weights and 67 GB above, and failed to place
  V). A failed allocation on the GPU also kept the half it had placed, so this never lets one fail: K is
  placed within the largest free block, then V only if the largest block left still holds it; else K is
  freed and both are sized again."""
  per_page = -(-page_bytes(cfg, page_size, dtype) // 2 // kv_shards)   # one array's share on one device
  slack = 64 << 20                                                     # the allocator's rounding
  for _ in range(tries):
    block = largest_free_block()
    if block is None:   # no allocator figures (CPU): one try
      return num_pages, allocate_kv(cfg, num_pages, page_size, dtype, sharding)
    num_pages = min(num_pages, (block - slack) // per_page)
    if num_pages < 1:
      break
    k = allocate_one(cfg, num_pages, page_size, dtype, sharding)
    jax.block_until_ready(k)
    left = largest_free_block()
    if num_pages * per_page <= left - slack:
      v = allocate_one(cfg, num_pages, page_size, dtype, sharding)
      return num_pages, (k, v)
    # V in the block left largest, or both in the largest block there was: whichever holds more.
    fit = max(left - slack, (block - slack) // 2) // per_page
    log.warning("KV cache: K of %d pages placed but V does not fit beside it (free memory is split into "
                "blocks); trying %d pages", num_pages, min(num_pages - 1, fit))
    del k
    num_pages = min(num_pages - 1, fit)
  raise MemoryError(f"no room for a KV cache of {num_pages} pages: the largest free block is "
                    f"{largest_free_block()} bytes")


def allocate_one(cfg: ModelConfig, num_pages: int, page_size: int, dtype, sharding=None) -> jax.Array:
  shape = (cfg.num_layers, cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def allocate_kv(cfg: ModelConfig, num_pages: int, page_size: int, dtype, sharding=None) -> tuple[jax.Array, jax.Array]:
  return (allocate_one(cfg, num_pages, page_size, dtype, sharding),
          allocate_one(cfg, num_pages, page_size, dtype, sharding))
