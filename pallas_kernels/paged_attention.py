"""Paged attention over a ragged batch (decodes and prefill chunks mixed), and the KV append.

Every token attends to the positions [0, position] of its own sequence (with a sliding window, only the
last `sliding_window` of them), reading K/V through its sequence's page table. Tokens of a prefill chunk
see each other causally because the chunk's K/V is appended before attention runs.

Cache layout: K and V each [layers, kv_heads, num_pages, page_size, head_dim], one array for all layers
(the step scans over layers and must not slice a layer out: that would copy it), so one (layer, head,
page) block is contiguous (page_size * head_dim elements: 4 KiB for 16 x 128 bf16).

Three pieces:
- `append_kv`: scatter of the step's K/V into their pages (padding rows aim at page `num_pages`: dropped).
- `paged_attention_reference`: jnp, one page at a time with online softmax; the CPU path and the
  baseline every kernel is checked against.
- `paged_attention`: the Pallas kernel. Work items are (query block, KV head): a query block is up to
  `block_q` consecutive tokens of one chunk (a decode is a block of one), so a prefill chunk reads each
  K/V page once per block instead of once per token. The grid is `num_sms` programs, each looping over
  work items (persistent), which bounds the SMs it occupies: the SM share the nano-batch pipeline gives
  it. All GQA query heads of a KV head share one tile (rows = block_q x q_per_kv).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.paged_kv import append_kv, merge_splits, paged_attention_reference, query_blocks  # noqa: F401

NEG = -1e30
LOG2E = 1.0 / math.log(2.0)
# Best variants of the sweep on one H200 (lab/kernel_bench.py --sweep_attention, docs/history/perf-notes.md):
# decodes as blocks of one token, prefill chunks as blocks of 32.
DECODE_CONFIG = dict(block_q=1, pages_per_block=8, num_warps=4, num_stages=2, programs_per_sm=2)
PREFILL_CONFIG = dict(block_q=32, pages_per_block=8, num_warps=8, num_stages=3, programs_per_sm=1)


def _kernel(layer_ref, nblk_ref, blk_start_ref, blk_len_ref, slots_ref, pos_ref, pt_ref, q_ref, k_ref, v_ref, o_ref,
            *split_refs, num_programs, num_kv_heads, num_pages, pages_per_block, block_q, sliding_window, scale,
            key_splits=1):
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plt
  pid = pl.program_id(0)
  g, d = q_ref.shape[2], q_ref.shape[3]
  page_size = k_ref.shape[1]
  rows = block_q * g
  bk = pages_per_block * page_size
  total = nblk_ref[0] * num_kv_heads * key_splits
  base = layer_ref[0] * num_kv_heads
  ds = pl.ds

  def item(i, carry):
    w = pid + i * num_programs
    # work items (query block, KV head, key split): a split walks its share of the block's key blocks
    b, h, split = w // (num_kv_heads * key_splits), (w // key_splits) % num_kv_heads, w % key_splits
    t0, nt = blk_start_ref[b], blk_len_ref[b]
    slot = slots_ref[t0]
    q = q_ref[ds(t0, block_q), h].reshape(rows, d)
    qpos = pos_ref[ds(t0, block_q)]
    row_pos = jnp.broadcast_to(qpos[:, None], (block_q, g)).reshape(rows)
    first, last = pos_ref[t0], pos_ref[t0 + nt - 1]
    lo = 0 if sliding_window is None else jnp.maximum(first - sliding_window + 1, 0) // bk
    hi = last // bk + 1
    if key_splits > 1:
      share = (hi - lo + key_splits - 1) // key_splits
      lo = lo + split * share
      hi = jnp.minimum(hi, lo + share)   # (an empty share leaves acc 0, m NEG, l 0: no weight in the merge)

    def body(j, c):
      acc, m, l = c
      pages = pt_ref[slot, ds(j * pages_per_block, pages_per_block)]
      flat = (base + h) * num_pages + pages
      k = k_ref[flat].reshape(bk, d).astype(q.dtype)   # an fp8 cache: computed on in the query dtype
      v = v_ref[flat].reshape(bk, d).astype(q.dtype)
      s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
      kpos = j * bk + jnp.arange(bk, dtype=jnp.int32)
      mask = kpos[None, :] <= row_pos[:, None]
      if sliding_window is not None:
        mask &= row_pos[:, None] - kpos[None, :] < sliding_window
      s = jnp.where(mask, s, NEG)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
      corr = jnp.exp(m - m_new)
      l = l * corr + jnp.sum(p, axis=1)
      acc = acc * corr[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
      return acc, m_new, l

    init = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), NEG, jnp.float32), jnp.zeros((rows,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(lo, hi, body, init)
    valid = jnp.broadcast_to((jnp.arange(block_q) < nt)[:, None, None], (block_q, g, d))
    if key_splits > 1:   # this split's unnormalized sums and softmax state, merged after the call
      part_ref, m_ref, l_ref = split_refs
      row_ok = jnp.broadcast_to((jnp.arange(block_q) < nt)[:, None], (block_q, g))   # (no slices in Triton)
      plt.store(part_ref.at[split, ds(t0, block_q), h], acc.reshape(block_q, g, d), mask=valid)
      plt.store(m_ref.at[split, ds(t0, block_q), h], m.reshape(block_q, g), mask=row_ok)
      plt.store(l_ref.at[split, ds(t0, block_q), h], l.reshape(block_q, g), mask=row_ok)
      return carry
    out = (acc / jnp.maximum(l, 1e-30)[:, None]).astype(o_ref.dtype).reshape(block_q, g, d)
    plt.store(o_ref.at[ds(t0, block_q), h], out, mask=valid)
    return carry

  n_items = jnp.maximum(total - pid + num_programs - 1, 0) // num_programs
  jax.lax.fori_loop(0, n_items, item, 0)


def paged_attention_call(q, k_cache, v_cache, layer, page_table, slots, positions, block_start, block_len, num_blocks, *,
                    num_sms: int,
                    block_q: int = 16, pages_per_block: int = 4, sliding_window: int | None = None,
                    interpret: bool = False, num_warps: int = 4, num_stages: int = 2, programs_per_sm: int = 1,
                    key_splits: int = 1, out=None):
  """The Pallas kernel; arguments as the reference plus the query blocks of `query_blocks`.

  q [N, Hq, D]; k/v_cache [L, Hkv, P, S, D]; layer int32 scalar; page_table [R, max_pages]; slots, positions,
  block_start, block_len [N]; num_blocks int32 [1]. Runs on `num_sms` programs. key_splits: each (query block,
  KV head) work item's key blocks shared out over that many work items, whose partial sums are merged after
  the call (paged_kv.merge_splits; flash-decoding, for small decode steps whose few work items would each walk
  all their keys one block after another). XLA compiles this kernel itself, so unlike a jax-triton call it
  stays inside a small step's command buffer (lab/gpu_aot.py).
  """
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plt
  n, hq, d = q.shape
  num_layers, hkv, num_pages, page_size, _ = k_cache.shape
  g = hq // hkv
  g_pad = max(g, 16 // block_q if block_q < 16 else 1)    # tensor-core dots need >= 16 rows
  # Pad (with lax.pad: no nested jit, so this stays legal under stream annotation): block_q rows past the
  # end so a block's loads stay in bounds, query heads up to g_pad, page-table columns up to a whole block.
  qg = q.reshape(n, hkv, g, d)
  qg = jax.lax.pad(qg, jnp.array(0, q.dtype), [(0, block_q, 0), (0, 0, 0), (0, g_pad - g, 0), (0, 0, 0)])
  pos = jax.lax.pad(positions.astype(jnp.int32), jnp.int32(0), [(0, block_q, 0)])
  cols = page_table.shape[1]
  pt = jax.lax.pad(page_table.astype(jnp.int32), jnp.int32(0),
                   [(0, 0, 0), (0, -cols % pages_per_block + pages_per_block, 0)])
  k = k_cache.reshape(num_layers * hkv * num_pages, page_size, d)  # a bitcast: no copy
  v = v_cache.reshape(num_layers * hkv * num_pages, page_size, d)
  if key_splits < 1:
    raise ValueError(f"key_splits must be >= 1, got {key_splits}")
  programs = num_sms * programs_per_sm
  kernel = functools.partial(_kernel, num_programs=programs, num_kv_heads=hkv, num_pages=num_pages,
                             pages_per_block=pages_per_block, block_q=block_q, sliding_window=sliding_window,
                             scale=1.0 / math.sqrt(d), key_splits=key_splits)
  if out is None:
    out = jnp.zeros(qg.shape, q.dtype)
  else:
    out = jax.lax.pad(out.reshape(n, hkv, g, d), jnp.array(0, q.dtype),
                      [(0, block_q, 0), (0, 0, 0), (0, g_pad - g, 0), (0, 0, 0)])
  out_shape = [jax.ShapeDtypeStruct(qg.shape, q.dtype)]
  if key_splits > 1:   # per split: the sums [S, T, Hkv, G, D] and the softmax state m, l [S, T, Hkv, G]
    out_shape += [jax.ShapeDtypeStruct((key_splits, *qg.shape), jnp.float32)]
    out_shape += [jax.ShapeDtypeStruct((key_splits, *qg.shape[:3]), jnp.float32)] * 2
  inputs = 11   # the kernel takes the inputs but the aliased `out`, then the outputs
  res = pl.pallas_call(
      lambda *refs: kernel(*refs[:inputs - 1], *refs[inputs:]), grid=(programs,),
      out_shape=out_shape,
      input_output_aliases={10: 0},
      interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      name="paged_attention",
  )(jnp.asarray(layer, jnp.int32).reshape(1), num_blocks.astype(jnp.int32).reshape(1), block_start.astype(jnp.int32),
    block_len.astype(jnp.int32), slots.astype(jnp.int32), pos, pt, qg, k, v, out)
  if key_splits == 1:
    return res[0][:n, :, :g].reshape(n, hq, d)
  # the merge takes rows [T, Hq]: this call's first n rows and real query heads, m in log2 units
  part = res[1][:, :n, :, :g].reshape(key_splits, n, hq, d)
  ml = jnp.stack([res[2][:, :n, :, :g] * LOG2E, res[3][:, :n, :, :g]], axis=-1).reshape(key_splits, n, hq, 2)
  return merge_splits(res[0][:n, :, :g].reshape(n, hq, d), part.reshape(-1), ml.reshape(-1), block_start, block_len,
                      num_blocks, key_splits, block_q)


# The jitted entry. Inside a stream-annotated computation call paged_attention_call instead: a nested jit
# there fails at run time ("No ExecutionStreamId found").
paged_attention = jax.jit(paged_attention_call, static_argnames=(
    "num_sms", "block_q", "pages_per_block", "sliding_window", "interpret", "num_warps", "num_stages",
    "programs_per_sm", "key_splits"))


# --- one entry for both implementations ------------------------------------------------------------
BACKENDS = ("pallas", "triton")


# The warp-specialized Mosaic GPU prefill kernel (prefill_attention_mgpu.py): 1.8x the Triton one on
# bf16 caches (docs/history/perf-notes.md, session 12). block_q: the host's query blocks; block_n: its key blocks.
MOSAIC_PREFILL_CONFIG = dict(kernel="mosaic", block_q=128, block_n=128)


def configs(backend: str, kv_dtype=None, *, head_dim: int | None = None, page_size: int | None = None,
            sliding_window: int | None = None, q_dtype=None) -> tuple[dict, dict]:
  """(decode config, prefill config) of an implementation for a KV cache of `kv_dtype` (None: the query
  dtype). The host builds query blocks of each config's block_q. On the Triton backend, prefill runs the
  Mosaic GPU kernel where it takes the cache (bf16/f16 as the queries, q_dtype None: the same; head_dim
  and page_size given and fitting; no sliding window), else the Triton one."""
  if backend == "triton":
    from pallas_kernels import paged_attention_triton as pat
    from pallas_kernels import prefill_attention_mgpu as pam
    if kv_dtype is not None and jnp.dtype(kv_dtype).itemsize == 1:
      return _fit_pages(pat.DECODE_CONFIG_FP8, page_size), _fit_pages(pat.PREFILL_CONFIG_FP8, page_size)
    mosaic = (kv_dtype is not None and head_dim is not None and page_size is not None and sliding_window is None
              and pam.supported(q_dtype or kv_dtype, kv_dtype, head_dim, page_size, MOSAIC_PREFILL_CONFIG["block_n"]))
    return (_fit_pages(pat.DECODE_CONFIG, page_size),
            MOSAIC_PREFILL_CONFIG if mosaic else _fit_pages(pat.PREFILL_CONFIG, page_size))
  if backend == "pallas":
    return DECODE_CONFIG, PREFILL_CONFIG
  raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")


def _fit_pages(config: dict, page_size: int | None) -> dict:
  """A Triton configuration whose key blocks hold whole pages: block_n grown to the page where a page is larger
  (vLLM's block sizes go to 128). Its tiles are powers of two, so are the pages it takes."""
  if page_size is None or config["block_n"] % page_size == 0:
    return config
  if page_size & (page_size - 1):
    raise ValueError(f"the Triton attention takes KV pages of a power-of-two size, got {page_size}")
  return {**config, "block_n": page_size}


def config_changes(spec: str) -> dict:
  """'key=value,key=value' (integers: booleans as 0/1) as changes to an attention configuration, as the
  benches' flags take them."""
  out = {}
  for item in filter(None, spec.split(",")):
    key, sep, value = item.partition("=")
    if not sep or not key.strip() or not value.strip().lstrip("-").isdigit():
      raise ValueError(f"expected key=integer in {spec!r}, got {item!r}")
    out[key.strip()] = int(value)
  return out


def attention_call(backend: str, q, k_cache, v_cache, layer, page_table, slots, positions, block_start, block_len,
                   num_blocks, *, num_sms: int, config: dict, sliding_window: int | None = None,
                   interpret: bool = False, out=None):
  """Unjitted (legal under stream annotation): the Pallas kernel or the Triton one (jax-triton), or the Mosaic
  GPU prefill kernel where the configuration names it (configs)."""
  if config.get("kernel") == "mosaic":
    from pallas_kernels import prefill_attention_mgpu as pam
    if sliding_window is not None:
      raise ValueError("the Mosaic GPU prefill kernel takes no sliding window")
    return pam.prefill_attention_call(q, k_cache, v_cache, layer, page_table, slots, positions, block_start,
                                      block_len, num_blocks, max_blocks=block_start.shape[0],
                                      block_kv=config["block_n"], num_sms=num_sms, out=out)
  if backend == "triton":
    from pallas_kernels import paged_attention_triton as pat
    return pat.paged_attention_call(q, k_cache, v_cache, layer, page_table, slots, positions, block_start, block_len,
                                    num_blocks, num_sms=num_sms, sliding_window=sliding_window, out=out, **config)
  return paged_attention_call(q, k_cache, v_cache, layer, page_table, slots, positions, block_start, block_len,
                              num_blocks, num_sms=num_sms, sliding_window=sliding_window, interpret=interpret,
                              out=out, **config)


def paged_attention_triton_available() -> bool:
  from pallas_kernels import paged_attention_triton as pat
  return pat.available()


def default_backend() -> str:
  """The faster measured implementation where it can run (Triton: 3.8 vs 2.2 TB/s decode, 285 vs 186
  TFLOP/s prefill on one H200, docs/history/perf-notes.md), else Pallas."""
  return "triton" if paged_attention_triton_available() else "pallas"
