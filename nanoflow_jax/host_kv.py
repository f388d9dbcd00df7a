"""The host-memory tier of the KV cache (NanoFlow's offload of finished requests' KV; vLLM's LMCache, SGLang's
HiCache): cached full pages that the GPU pool evicts are copied to host memory, and a prompt whose prefix is
there gets those pages copied back instead of recomputed.

The pool (kv_cache.PagePool) decides; this tier moves bytes:
- `save(kv, pages, keys)`: the evicted pages' K and V gathered on the device into blocks of up to BLOCK_PAGES
  pages (one array each), dispatched before the step that overwrites those pages (the step's donation of the
  cache waits for their read). The blocks stay on the device until `settle()` puts them in pinned host memory
  (a JAX memory kind): the engine calls it after reading a step's results, and it moves the blocks gathered
  before that step, whose gathers are then done.
- `lookup(keys)`: the longest run of keys the tier holds.
- `load(kv, pages, keys)`: the blocks holding those pages put back on the device (one device_put) and the pages
  written into the given GPU pages (one scatter per block, the cache donated).
Why blocks: session 24 (one H100) measured one array per page: 6.6 GB/s out, 8.8 back, a decode step 2.28x as
long with 64 pages saved before it, and the multi-round run with the tier 0.64x as fast as caching alone: every
transfer of a host-memory array seems to pay a fixed cost (1,024 arrays of 0.5 MB at 6.6 GB/s is ~80 us
each), so a page's two arrays cost more than their bytes. A block is one transfer each way; a load moves whole
blocks (at most BLOCK_PAGES - 1 pages more than it needs).
How the bytes move (`copy`; lab/prefix_bench.py compares them in the engine, lab/host_copy_bench.py without it):
- "thread" (the default): the gathered blocks put in host memory with jax.device_put at `settle()`, on a thread
  of its own;
- "put": the same device_put from the engine's thread;
- "jit": the copy is inside the gather's own executable (device_put to jax.memory.Space.Host under jit: XLA's
  copy-start/copy-done on a copy queue), and a load's copy back inside the scatter's, so there is no separate
  PJRT transfer (and its per-transfer cost) either way; nothing waits for `settle()`.
Session 27 (one H100, the 8B shape's fp8 pages): the multi-round run with the tier at 1.09x caching alone with
"thread" against 0.75x with "put"; a 58-sequence decode step with 64 pages saved before each 1.16x as long with
"thread", 7.1x with "put" (the engine's thread held ~21 ms a step in settle), 1.27x with "jit". But "put" ran
first in that process, and the likely cause is the pinned pool's growth, which the modes after it found done:
XLA's host allocator pins regions of doubling size as it fills (~1 GB over those 16 steps, ~25 GB over the
multi-round run, where settle held the thread 12.5 s), and one block's put otherwise returned in 0.2-0.7 ms
whether its source was ready or behind a step in flight (lab/host_copy_bench.py, where put and thread slowed
the stand-in step alike, 1.05x). So the pool is now pinned whole when the process starts where the machine has
the memory (compat.configure_host_memory), warm_up takes the tier's whole size once and lets it go (the
allocator keeps what it pinned, wherever XLA did not reserve it), and "thread" is the default: never slower.
A block not yet settled is loaded from the device, where it still is.
Block sizes are powers of two (the last page repeated) so that few shapes compile. Session 16's first version
copied through numpy (pageable memory) and waited for the previous copy at each save: 1.8-2.0 GB/s, and a
64-sequence decode step with 64 pages saved before it took 7.1x as long.
Its own LRU bound, `capacity_pages`, counted in the blocks' pages: the least recently used block goes whole
(its pages left the GPU together; a lookup that finds a page renews its block). A cache sharded over devices
(tensor parallelism, several hosts) is saved as it lies: each block keeps the cache's sharding, in host
memory, so every device's shard goes to its own host's memory and comes back to the same device; the pool's
decisions are the same in every process.
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import time

import jax
import jax.numpy as jnp

from nanoflow_jax import compat, prefix_cache

log = logging.getLogger(__name__)

BLOCK_PAGES = 16   # pages a host array at most: 16 MB at the 8B shape's fp8 pages, ~1 ms of bytes a transfer


@jax.jit
def _block_of(k, v, pages):
  """Pages `pages` of the cache as one array [2 (K, V), layers, kv heads, len(pages), page size, head dim]."""
  return jnp.stack([k[:, :, pages], v[:, :, pages]])


@jax.jit
def _block_to_host(k, v, pages):
  """_block_of with its copy to pinned host memory in the same executable (copy mode "jit")."""
  return jax.device_put(_block_of(k, v, pages), jax.memory.Space.Host)


def _write_rows(k, v, pages, block, rows):
  """block[:, :, :, rows] written into the cache's `pages` in place; a page index out of range (padding) writes
  nothing. unique_indices: XLA's GPU scatter otherwise writes each byte with an atomic compare-and-swap loop."""
  put = lambda cache, x: cache.at[:, :, pages].set(x[:, :, rows], mode="drop", unique_indices=True)
  return put(k, block[0]), put(v, block[1])


_scatter = jax.jit(_write_rows, donate_argnums=(0, 1))


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _scatter_from_host(k, v, pages, block, rows):
  """_scatter of a block still in host memory: its copy to the device inside this executable (copy mode "jit")."""
  return _write_rows(k, v, pages, jax.device_put(block, jax.memory.Space.Device), rows)


COPY_MODES = ("put", "thread", "jit")


def _padded(n: int) -> int:
  return 1 << (n - 1).bit_length()


class _Block:
  """One array of saved pages: on the device until settled, then in host memory (or the future of it, while a
  copy thread puts it there); and the keys it holds (a key saved again later points elsewhere)."""
  __slots__ = ("_array", "pages", "keys", "on_device")

  def __init__(self, array, pages: int, keys: list[int], on_device: bool):
    self._array, self.pages, self.keys, self.on_device = array, pages, keys, on_device

  @property
  def array(self):
    if isinstance(self._array, concurrent.futures.Future):
      self._array = self._array.result()
    return self._array


class HostKVTier:
  def __init__(self, capacity_pages: int, copy: str = "thread", block_pages: int = BLOCK_PAGES):
    """copy: how the bytes move, one of COPY_MODES (the module's docstring). block_pages: pages a host array at
    most (benches compare sizes)."""
    if capacity_pages < 1:
      raise ValueError(f"the host KV tier needs at least one page, got {capacity_pages}")
    if copy not in COPY_MODES:
      raise ValueError(f"host KV copy mode {copy!r}: expected one of {', '.join(COPY_MODES)}")
    self.copy = copy
    self.capacity_pages = capacity_pages
    self.block_pages = min(block_pages, 1 << (capacity_pages.bit_length() - 1))   # a block fits the bound
    self._blocks: collections.OrderedDict[int, _Block] = collections.OrderedDict()   # LRU first
    self._where: dict[int, tuple] = {}   # key hash -> (key, block id, row in the block)
    self._next_block = 0
    self.held_pages = 0       # pages of the held blocks (padding included): what capacity_pages bounds
    self._host_kind = None    # the host memory kind (pinned where there is one), from the cache's devices
    self.saved = 0
    self.loaded = 0
    self.moved_back = 0       # pages copied back, the loaded ones and the rest of their blocks
    self.dropped = 0
    self._copier = concurrent.futures.ThreadPoolExecutor(1, "host-kv-copy") if copy == "thread" else None
    self._gathered: list[int] = []   # blocks gathered before the step now being dispatched (still on the device)
    self._settling: list[int] = []   # blocks gathered before the step whose results the engine reads next
    self.save_seconds = self.load_seconds = self.settle_seconds = 0.0   # the calling thread's time in each
    self.pool_fill_bytes, self.pool_fill_seconds = 0, 0.0   # warm_up's fill of the host pool

  def __len__(self) -> int:
    return len(self._where)

  def close(self) -> None:
    """Drops every block (their host memory goes back to JAX's pool) and stops the copy thread, after the puts
    it was given."""
    if self._copier is not None:
      self._copier.shutdown(wait=True)
      self._copier = None
    self.clear()

  def clear(self) -> None:
    """Forgets every block (Engine.reset_prefix_cache); the copy thread stays, and what it is putting lands
    unused. Not counted as dropped: nothing was evicted."""
    self._blocks.clear()
    self._where.clear()
    self._gathered, self._settling = [], []
    self.held_pages = 0

  def host_arrays(self) -> list:
    """Every block's host array (blocks not yet settled are put there first)."""
    self.settle(everything=True)
    return [b.array for b in self._blocks.values()]

  def _gather(self, kv, indices: list) -> list:
    """Each index array's pages gathered into one block: on the device, or in host memory in copy mode "jit"."""
    if self._host_kind is None:
      self._host_kind = compat.host_memory_kind(next(iter(kv[0].devices())))
      if self.copy == "jit" and self._host_kind != "pinned_host":
        raise ValueError(f"host KV copy mode 'jit' needs pinned host memory; {kv[0].devices()} have "
                         f"{self._host_kind}")
    if self.copy == "jit":
      return [_block_to_host(*kv, i) for i in indices]
    return [_block_of(*kv, i) for i in indices]

  def _held(self, bids: list[int]) -> list[_Block]:
    return [self._blocks[b] for b in bids if b in self._blocks]

  def _put(self, blocks: list[_Block]) -> None:
    """`blocks` still on the device put in host memory (a future each in copy mode "thread")."""
    blocks = [b for b in blocks if b.on_device]
    if not blocks:
      return
    arrays = [b.array for b in blocks]
    shardings = [a.sharding.with_memory_kind(self._host_kind) for a in arrays]
    if self._copier is None:   # (copy mode "put"; "thread" after close(): what is left goes inline)
      hosted = jax.device_put(arrays, shardings)
    else:
      hosted = [self._copier.submit(jax.device_put, a, s) for a, s in zip(arrays, shardings)]
    for block, array in zip(blocks, hosted):
      block._array, block.on_device = array, False

  def settle(self, everything: bool = False) -> None:
    """Called after the engine read a step's results: the blocks gathered before that step (their gathers done)
    are put in host memory; those gathered since wait for the next call. everything: all of them (the engine
    has nothing in flight: nothing is waited for that would not be waited for anyway)."""
    t = time.perf_counter()
    if everything:
      self._put(self._held(self._settling + self._gathered))
      self._settling, self._gathered = [], []
    else:
      self._put(self._held(self._settling))
      self._settling, self._gathered = self._gathered, []
    self.settle_seconds += time.perf_counter() - t

  def _from_host(self, kv, blocks: list, pages: list[list[int]], rows: list[list[int]]):
    """kv with each block's `rows` written into its `pages` (padded to the block's size with pages out of range,
    which write nothing). A block still on the device is read where it is."""
    if self.copy == "jit":
      scatter, sources = _scatter_from_host, [b.array for b in blocks]
    else:
      device_kind = next(iter(kv[0].devices())).default_memory().kind
      scatter = _scatter
      hosted = [b.array for b in blocks if not b.on_device]
      moved = iter(jax.device_put(hosted, [a.sharding.with_memory_kind(device_kind) for a in hosted])
                   if hosted else [])
      sources = [b.array if b.on_device else next(moved) for b in blocks]
    out_of_range = kv[0].shape[2]
    for block, dst, src in zip(sources, pages, rows):
      n = block.shape[3]   # indices padded to the block's size: one compile per block size
      dst = jnp.asarray(dst + [out_of_range] * (n - len(dst)), jnp.int32)
      src = jnp.asarray(src + [0] * (n - len(src)), jnp.int32)
      kv = scatter(*kv, dst, block, src)
    return kv

  def warm_up(self, kv):
    """Compiles the gather and the scatter of every block size (the powers of two up to the largest block), so
    that none compiles while the engine serves: session 25's H200 multi-round run compiled ten of them inside
    its timed run (TTFT p99 9.4 s against 1.8 without the tier). Returns kv, unchanged (the scatters write only
    pages out of range)."""
    sizes = [1 << i for i in range(_padded(self.block_pages).bit_length())]
    gathered = self._gather(kv, [jnp.zeros(n, jnp.int32) for n in sizes])
    blocks = [_Block(a, n, [], self.copy != "jit") for a, n in zip(gathered, sizes)]
    kv = self._from_host(kv, blocks, [[] for _ in sizes], [[] for _ in sizes])   # from the device
    if self.copy != "jit":   # and from host memory
      self._put(blocks)
      kv = self._from_host(kv, blocks, [[] for _ in sizes], [[] for _ in sizes])
    self._fill_host_pool(_block_of(*kv, jnp.zeros(sizes[-1], jnp.int32)))   # (on the device in every mode)
    return kv

  def _fill_host_pool(self, block) -> None:
    """Takes the tier's whole size in host memory once, in copies of `block` (a device array), and lets it go:
    XLA's host allocator keeps the regions it pinned for them, so serving never waits for more to be pinned.
    Pinning is slow and holds up the engine's launches wherever it happens: session 27's online run with the
    tier stalled ~0.5 s and ~2.5 s as the pool grew. Measured (session 29, H100): a growing pool takes 24 GB at
    2.3 GB/s (10.6 s), the same again 0.45 s later (kept), and 0.45 s where the pool was reserved at start; with
    the pool reserved and filled, the online tier's TTFT p99 was 0.88x caching alone's.
    compat.configure_host_memory asks XLA to reserve the pool at start, where it may; this covers where it may
    not (the user's own settings, a backend already started, an XLA that ignores them). Records the bytes and
    the seconds it took (logged: far above the bytes' copy time,
    the pool was growing)."""
    count = self.capacity_pages // block.shape[3]
    host = block.sharding.with_memory_kind(self._host_kind)
    jax.block_until_ready(block)   # (the warm-up's work before it is not the fill's time)
    t = time.perf_counter()
    filled = jax.block_until_ready([jax.device_put(block, host) for _ in range(count)])
    self.pool_fill_bytes = sum(a.nbytes for a in filled)
    del filled
    self.pool_fill_seconds = time.perf_counter() - t
    log.info("host KV tier: %.1f GB of %s memory taken and let go in %.2f s (XLA's allocator keeps it)",
             self.pool_fill_bytes / 1e9, self._host_kind, self.pool_fill_seconds)

  def save(self, kv, pages: list[int], keys: list[tuple]) -> None:
    if not pages:
      return
    t = time.perf_counter()
    size = self.block_pages
    chunks = [(pages[i:i + size], keys[i:i + size]) for i in range(0, len(pages), size)]
    indices = [jnp.asarray(p + [p[-1]] * (_padded(len(p)) - len(p)), jnp.int32) for p, _ in chunks]
    gathered = self._gather(kv, indices)
    for array, index, (_, chunk_keys) in zip(gathered, indices, chunks):
      bid, self._next_block = self._next_block, self._next_block + 1
      block = self._blocks[bid] = _Block(array, index.shape[0], [key[0] for key in chunk_keys], self.copy != "jit")
      if block.on_device:
        self._gathered.append(bid)
      self.held_pages += block.pages
      for row, key in enumerate(chunk_keys):
        self._where[key[0]] = (key, bid, row)
        self.saved += 1
    while self.held_pages > self.capacity_pages:
      self._drop(next(iter(self._blocks)))
    self.save_seconds += time.perf_counter() - t

  def _drop(self, bid: int) -> None:
    block = self._blocks.pop(bid)
    self.held_pages -= block.pages
    for h in block.keys:
      if self._where.get(h, (None, None))[1] == bid:
        del self._where[h]
        self.dropped += 1

  def land(self) -> None:
    """Puts every block still on the device in host memory and waits until all are there (the engine never needs
    to: a load reads a block where it is)."""
    jax.block_until_ready(self.host_arrays())

  def lookup(self, keys: list[tuple]) -> list[tuple]:
    """The longest leading run of `keys` held here (each checked against the stored key, as the pool does)."""
    run = []
    for key in keys:
      entry = self._where.get(key[0])
      if entry is None or not prefix_cache.same_page(entry[0], key):
        break
      self._blocks.move_to_end(entry[1])
      run.append(key)
    return run

  def load(self, kv, pages: list[int], keys: list[tuple]):
    """kv with `keys`' saved bytes written into `pages` (the cache donated); returns the new (k, v)."""
    t = time.perf_counter()
    by_block: dict[int, tuple[list[int], list[int]]] = {}
    for page, key in zip(pages, keys):
      _, bid, row = self._where[key[0]]
      dst, rows = by_block.setdefault(bid, ([], []))
      dst.append(page)
      rows.append(row)
    blocks = [self._blocks[bid] for bid in by_block]
    kv = self._from_host(kv, blocks, [d for d, _ in by_block.values()], [r for _, r in by_block.values()])
    self.loaded += len(pages)
    self.moved_back += sum(b.pages for b in blocks if not b.on_device)
    self.load_seconds += time.perf_counter() - t
    return kv
