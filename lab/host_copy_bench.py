"""The host KV tier's copies without a model (issue 28): one process, a few seconds on a GPU.

A KV cache of the 8B shape (32 layers, 8 KV heads, pages of 16 x 128, e4m3) and host_kv.HostKVTier at several
block sizes (--block_pages): 1 page a host array (K and V in one: half the arrays of session 24's first H100 run,
which had two a page: 6.6 GB/s out, 8.8 back, a decode step 2.28x as long with 64 pages saved before it), the
default BLOCK_PAGES, and that with each other copy mode (host_kv.COPY_MODES: device_put on a thread of its own,
or the copies inside the gather's and scatter's executables). For each: GB/s out (save + land) and back (load,
landed), the host's own time in save and settle, and a stand-in step (--gemms bf16 GEMMs of --gemm, no model) alone and
with `--pages_per_step` pages saved before each: whether the copies run beside the device's work or in its way.
--put_probe (on by default) times what one block's put holds its caller for, its source ready or behind a step
in flight, and whether a put on a thread holds the GIL: the premise of HostKVTier.settle.
--fill_probe_gb times the tier's warm-up fill of its pinned pool twice (reserved at start or not: --host_pool_gb).
--choice_out gets the copy mode whose stand-in step the copies slowed least (at the default block size).
JAX's pinned host pool is reserved whole at start (--host_pool_gb, as the engine's processes do for their tier):
growing it while timing would charge its pinning to whichever mode runs first (session 27).

  python lab/host_copy_bench.py --pages=4096 --copy_pages=512
"""
from __future__ import annotations

import time

if __package__ in (None, ""):
  import _root  # noqa: F401  (the repository root on sys.path: lab/_root.py)

from absl import app, flags

flags.DEFINE_integer("pages", 4096, "Pages of the cache.")
flags.DEFINE_integer("layers", 32, "Layers (the 8B shape's).")
flags.DEFINE_integer("kv_heads", 8, "KV heads.")
flags.DEFINE_integer("head_dim", 128, "Head dimension.")
flags.DEFINE_integer("page_size", 16, "Tokens a page.")
flags.DEFINE_string("dtype", "float8_e4m3fn", "The cache's element type.")
flags.DEFINE_integer("copy_pages", 512, "Pages a copy when timing GB/s.")
flags.DEFINE_integer("pages_per_step", 64, "Pages saved before each stand-in step.")
flags.DEFINE_integer("gemm", 4096, "The stand-in step: GEMMs of this square size, in bf16 ...")
flags.DEFINE_integer("gemms", 40, "... this many a step (~8 ms on an H100).")
flags.DEFINE_integer("steps", 16, "Steps timed each way.")
flags.DEFINE_list("block_pages", ["1", "default", "default+thread", "default+jit"],
                  "Block sizes to compare, each SIZE[+COPY MODE] ('default': host_kv.BLOCK_PAGES; the mode one of "
                  "host_kv.COPY_MODES, put when left out).")
flags.DEFINE_float("host_pool_gb", 16.0, "Pinned host memory reserved at start (compat.configure_host_memory).")
flags.DEFINE_bool("put_probe", True, "Also time what one block's device_put to host memory holds the caller for.")
flags.DEFINE_float("fill_probe_gb", 0.0, "Also time the tier's warm-up fill (HostKVTier._fill_host_pool) of this many "
                   "GB, twice: the first pays for pinning where the pool was not reserved at start (--host_pool_gb=0), "
                   "the second shows whether XLA's allocator kept what it pinned.")
flags.DEFINE_string("choice_out", None, "Write the copy mode whose step ratio was lowest at the default block "
                    "size here.")
FLAGS = flags.FLAGS


def _keys(n: int, salt: int) -> list[tuple]:
  return [(salt * 1_000_003 + i, 0, (salt, i)) for i in range(n)]


def _page_bytes(kv) -> int:
  """One page's K and V bytes, over every layer and head."""
  return sum(a[:, :, 0].nbytes for a in kv)


def stand_in_step():
  """The stand-in step (--gemms bf16 GEMMs of --gemm, no model), compiled, and its input: (step, x)."""
  import jax
  import jax.numpy as jnp

  @jax.jit
  def step(x):
    for _ in range(FLAGS.gemms):
      x = jnp.tanh(x @ x) * 0.5
    return x
  return step, jax.block_until_ready(step(jnp.full((FLAGS.gemm, FLAGS.gemm), 0.01, jnp.bfloat16)))


def one_block_size(kv, block: int, copy: str, step, x) -> tuple[dict, tuple]:
  """`step`, `x`: stand_in_step()'s."""
  import jax
  from nanoflow_jax import host_kv

  page_bytes = _page_bytes(kv)
  n = FLAGS.copy_pages
  tier = host_kv.HostKVTier(8 * n + FLAGS.pages_per_step * (FLAGS.steps + 2), copy, block)
  pages = list(range(n))
  out, back = [], []
  for r in range(4):   # the first round compiles
    keys = _keys(n, r)
    jax.block_until_ready(kv)
    t = time.perf_counter()
    tier.save(kv, pages, keys)
    tier.land()
    out.append(time.perf_counter() - t)
    t = time.perf_counter()
    kv = jax.block_until_ready(tier.load(kv, pages, keys))
    back.append(time.perf_counter() - t)
  gb = n * page_bytes / 1e9

  few = list(range(FLAGS.pages_per_step))
  tier.save(kv, few, _keys(len(few), 99))   # compiles this block size's gather
  tier.land()
  # The engine's loop: dispatch a step, then read the one before it (one step late), then settle the tier's
  # blocks gathered before that step (HostKVTier.settle).
  t = time.perf_counter()
  for _ in range(FLAGS.steps):
    prev, x = x, step(x)
    jax.block_until_ready(prev)
  jax.block_until_ready(x)
  alone = (time.perf_counter() - t) / FLAGS.steps
  t, in_save = time.perf_counter(), 0.0
  for i in range(FLAGS.steps):
    t0 = time.perf_counter()
    tier.save(kv, few, _keys(len(few), 100 + i))
    in_save += time.perf_counter() - t0
    prev, x = x, step(x)
    jax.block_until_ready(prev)
    t0 = time.perf_counter()
    tier.settle()
    in_save += time.perf_counter() - t0
  jax.block_until_ready(x)
  tier.land()
  with_copies = (time.perf_counter() - t) / FLAGS.steps
  return {"block_pages": tier.block_pages, "copy": copy, "gb": gb, "out_gb_s": gb / min(out[1:]),
          "back_gb_s": gb / min(back[1:]), "step_ms": 1e3 * alone, "step_with_copies_ms": 1e3 * with_copies,
          "ratio": with_copies / alone, "save_host_ms": 1e3 * in_save / FLAGS.steps}, kv


def put_probe(kv, step, x, block: int) -> dict:
  """What a device_put of one gathered block to host memory holds its calling thread for (ms, medians of
  --steps): its source ready (`ready`), its source the gather behind a stand-in step still running
  (`behind_step`; the step's own time beside it), and, on a copy thread, how long the calling thread then takes
  for a fixed bit of Python (`python_beside`, against `python_alone`: whether the put holds the GIL while it
  waits). The premise of HostKVTier.settle: a put returns when its copy is done."""
  import statistics
  import threading
  import jax
  import jax.numpy as jnp
  from nanoflow_jax import compat, host_kv
  kind = compat.host_memory_kind(next(iter(kv[0].devices())))
  pages = jnp.arange(block, dtype=jnp.int32)
  sharding = host_kv._block_of(*kv, pages).sharding.with_memory_kind(kind)

  def python_bit():
    t = time.perf_counter()
    sum(i * i for i in range(20_000))
    return time.perf_counter() - t
  ready, behind, step_ms, alone, beside = [], [], [], [], []
  for _ in range(FLAGS.steps):
    b = jax.block_until_ready(host_kv._block_of(*kv, pages))
    t = time.perf_counter()
    jax.block_until_ready(jax.device_put(b, sharding))
    ready.append(time.perf_counter() - t)
    t = time.perf_counter()
    jax.block_until_ready(step(x))
    step_ms.append(time.perf_counter() - t)
    y = step(x)                                   # in flight
    b = host_kv._block_of(*kv, pages)             # behind it
    t = time.perf_counter()
    h = jax.device_put(b, sharding)               # returns when?
    behind.append(time.perf_counter() - t)
    jax.block_until_ready((y, h))
    alone.append(python_bit())
    y = step(x)
    b = host_kv._block_of(*kv, pages)
    th = threading.Thread(target=lambda: jax.block_until_ready(jax.device_put(b, sharding)))
    th.start()
    beside.append(python_bit())
    th.join()
    jax.block_until_ready(y)
  ms = lambda v: 1e3 * statistics.median(v)
  return {"block_pages": block, "ready_ms": ms(ready), "behind_step_ms": ms(behind), "step_ms": ms(step_ms),
          "python_alone_ms": ms(alone), "python_beside_ms": ms(beside)}


def main(argv):
  del argv
  from nanoflow_jax import compat
  compat.configure_host_memory(FLAGS.host_pool_gb)   # before JAX starts
  import jax
  import jax.numpy as jnp
  from nanoflow_jax import host_kv
  shape = (FLAGS.layers, FLAGS.kv_heads, FLAGS.pages, FLAGS.page_size, FLAGS.head_dim)
  kv = tuple(jnp.full(shape, 0.5, jnp.dtype(FLAGS.dtype)) for _ in range(2))
  print(f"{jax.devices()[0].device_kind}: cache {shape} {FLAGS.dtype}, {FLAGS.copy_pages} pages a copy, "
        f"{FLAGS.pages_per_step} saved before each stand-in step", flush=True)
  rows = []
  step, x = stand_in_step()   # compiled once for every measurement
  for b in FLAGS.block_pages:
    size, _, copy = b.partition("+")
    r, kv = one_block_size(kv, host_kv.BLOCK_PAGES if size == "default" else int(size), copy or "put", step, x)
    r["default_size"] = size == "default"
    rows.append(r)
    print(r, flush=True)
  print("\n| pages a host array | out GB/s | back GB/s | step ms | with copies | ratio | host in save + settle, ms a step |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    name = f"{r['block_pages']} ({r['copy']})"
    print(f"| {name} | {r['out_gb_s']:.1f} | {r['back_gb_s']:.1f} | {r['step_ms']:.2f} | "
          f"{r['step_with_copies_ms']:.2f} | {r['ratio']:.3f}x | {r['save_host_ms']:.2f} |")
  if FLAGS.put_probe:
    p = put_probe(kv, step, x, host_kv.BLOCK_PAGES)
    print(f"\nOne block of {p['block_pages']} pages put in host memory, the caller's time: source ready "
          f"{p['ready_ms']:.2f} ms; source behind a {p['step_ms']:.2f} ms step in flight {p['behind_step_ms']:.2f} ms "
          f"(near the step's time if the put waits for its source); {p['python_alone_ms']:.2f} ms of Python alone, "
          f"{p['python_beside_ms']:.2f} ms beside a put on a thread (longer if the put holds the GIL)", flush=True)
  if FLAGS.fill_probe_gb > 0:
    import resource
    print(f"\nProcess peak RSS before the fill: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB "
          f"(a pool reserved at start shows here)", flush=True)
    tier = host_kv.HostKVTier(max(int(FLAGS.fill_probe_gb * 1e9) // _page_bytes(kv), 1), "thread")
    for i in ("first", "second"):
      kv = tier.warm_up(kv)
      print(f"\nHost pool fill, {i}: {tier.pool_fill_bytes / 1e9:.3f} GB in {tier.pool_fill_seconds:.2f} s "
            f"({tier.pool_fill_bytes / 1e9 / tier.pool_fill_seconds:.1f} GB/s); the pool "
            f"{'reserved' if FLAGS.host_pool_gb > 0 else 'not reserved'} at start", flush=True)
    tier.close()
  candidates = [r for r in rows if r["default_size"]]
  if FLAGS.choice_out and candidates:
    best = min(candidates, key=lambda r: r["ratio"])["copy"]
    with open(FLAGS.choice_out, "w") as f:
      f.write(best + "\n")
    print(f"\ncopy mode chosen (the step slowed least): {best}")


if __name__ == "__main__":
  app.run(main)
