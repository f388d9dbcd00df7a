"""Prefill attention over pages on Hopper (Mosaic GPU): warp-specialized, wgmma, K/V pages by TMA.

jax's warp-specialized `attention_mgpu` reaches 0.57-0.61 of the GEMM peak on a 4096-token prompt with K/V
contiguous; the Triton kernel (paged_attention_triton.py) 0.35 through pages. This kernel is that design over
the paged cache, and reaches 0.63 (docs/history/perf-notes.md, session 12). It is the engine's prefill attention on
bf16/f16 caches (paged_attention.configs):
- per (query head, query block of 128 rows): two consumer warpgroups of 64 rows each, one producer
  warpgroup;
- the producer streams K and V blocks of `block_kv` keys into a ring of shared-memory slots, each block as
  block_kv / page_size TMA copies of one page ([page_size, D] of one KV head: 4 KiB at 16 x 128 bf16), the
  page ids read from the sequence's page-table row; a slot's barrier completes when all its pages landed;
- the consumers compute S = Q K^T and O += P V with wgmma, an online softmax in registers between them, and
  take turns on the tensor cores (a schedule barrier), so one's softmax hides behind the other's matmuls.
Causal: key blocks wholly before a warpgroup's first query run unmasked; the rest mask key > query position
and keys past the chunk's end (a partial last page).

Query blocks come from the host as in paged_attention.query_blocks (block_start, block_len, num_blocks, with
block_q = BLOCK_Q), at any row offset. A TMA copy into the swizzled tiles wgmma reads needs its row offset to
be a known multiple of the shared-memory tiling, which a chunk's first row is not; so each warpgroup copies
its 64 query rows into a plain staging buffer and from there, through registers, into the tiled one, and its
output goes back the same way: registers to the staging buffer, then TMA stores of the block's rows only, in
pieces of 64, 32, ..., 1 rows (a whole 64-row store would overwrite the next block's rows). Rows whose
offset is a multiple of 8 go straight between swizzled tiles and memory (the output in tiles of its own). The kernel writes into the output in place
(aliased: the rows outside every block, decode rows, keep what they held). It is persistent: num_sms CTAs
take the (query head, block) items in turn, most work first (causal blocks late in a long prompt attend to
up to 32x more keys than early ones); a CTA's producer loads the next item's keys, and its consumers fetch
the next item's query rows, while the current item finishes.
bf16/f16 caches only (wgmma takes no e4m3 beside bf16 operands); head_dim % 64 == 0; page_size % 8 == 0 and
dividing block_kv.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.paged_kv import paged_attention_reference  # noqa: F401 (the reference)

BLOCK_Q = 128            # query rows per CTA: two consumer warpgroups of 64
CONFIG = dict(block_kv=128, max_concurrent_steps=2)


def supported(q_dtype, kv_dtype, head_dim: int, page_size: int, block_kv: int = CONFIG["block_kv"]) -> bool:
  return (jnp.dtype(kv_dtype) == jnp.dtype(q_dtype) and jnp.dtype(q_dtype) in (jnp.bfloat16, jnp.float16)
          and head_dim % 64 == 0 and page_size % 8 == 0 and block_kv % page_size == 0 and block_kv % 64 == 0)


SMEM_LIMIT = 227 * 1024   # per CTA on Hopper


def smem_bytes(head_dim: int, block_kv: int, steps: int, dtype) -> int:
  """Shared memory of one CTA: Q tiles, the staging buffer and O tiles (3 x 128 rows), K and V rings, barriers
  (2,168 bytes measured at 2 x 3 stages)."""
  return jnp.dtype(dtype).itemsize * head_dim * (3 * BLOCK_Q + 2 * steps * block_kv) + 2304


def max_query_blocks(num_tokens: int, max_chunks: int) -> int:
  """A static bound on query blocks of BLOCK_Q rows for `num_tokens` rows in at most `max_chunks` chunks."""
  return -(-num_tokens // BLOCK_Q) + max(max_chunks - 1, 0)


def prefill_attention_call(q, k_cache, v_cache, layer, page_table, slots, positions, block_start, block_len,
                           num_blocks, *, max_blocks: int, block_kv: int = CONFIG["block_kv"],
                           max_concurrent_steps: int = CONFIG["max_concurrent_steps"],
                           num_sms: int | None = None, out=None):
  """q [N, Hq, D]; k/v_cache [L, Hkv, P, S, D]; page_table [R, max_pages]; slots, positions [N]; query blocks of
  <= BLOCK_Q rows (block_start, block_len [>= max_blocks], num_blocks) as paged_attention.query_blocks gives
  them, each within one chunk of consecutive positions. Returns [N, Hq, D]: the rows of the blocks written
  into `out` (or zeros). num_sms: persistent on that many CTAs (its share of the SMs; None: all the device's),
  each taking (query head, block) items in turn. Unjitted (legal under stream annotation; `prefill_attention`
  is the jitted entry). With slots, positions and the blocks as numpy arrays the block table is built on the
  host."""
  n, hq, d = q.shape
  _, hkv, _, page_size, _ = k_cache.shape
  if not supported(q.dtype, k_cache.dtype, d, page_size, block_kv):
    raise ValueError(f"prefill_attention: q {q.dtype}, cache {k_cache.dtype}, head_dim {d}, page_size {page_size}, "
                     f"block_kv {block_kv}: not a shape this kernel takes")
  if (smem := smem_bytes(d, block_kv, max_concurrent_steps, q.dtype)) > SMEM_LIMIT:
    raise ValueError(f"prefill_attention: head_dim {d}, block_kv {block_kv}, {max_concurrent_steps} stages need "
                     f"{smem} bytes of shared memory, more than {SMEM_LIMIT}")
  if block_start.shape[0] < max_blocks:
    raise ValueError(f"prefill_attention: {block_start.shape[0]} block entries, fewer than max_blocks={max_blocks}")
  info = block_info(slots, positions, block_start, block_len, num_blocks, max_blocks)
  base = jnp.zeros_like(q) if out is None else out
  if num_sms is None:
    num_sms = getattr(jax.devices()[0], "core_count", None) or 132
  return _call(jnp.asarray(info), jnp.asarray(layer, jnp.int32).reshape(1), jnp.asarray(page_table, jnp.int32), q,
               k_cache, v_cache, base, block_kv=block_kv, max_concurrent_steps=max_concurrent_steps, num_sms=num_sms)


prefill_attention = jax.jit(prefill_attention_call,
                            static_argnames=("max_blocks", "block_kv", "max_concurrent_steps", "num_sms"))


# Columns of the kernel's per-block table.
SEQ, POS0, KV_END, ROW0, ROWS = range(5)


def block_info(slots, positions, block_start, block_len, num_blocks, max_blocks: int):
  """The kernel's table for the first `max_blocks` query blocks (those from num_blocks on are empty):
  [max_blocks, 5] int32 of (page-table row, first query position, end of its keys = last position + 1,
  first row in q, rows), most work first (rows x keys attended), empty blocks last. numpy in, numpy out (on
  the host, as the engine builds its blocks); else jnp."""
  host = all(isinstance(x, (np.ndarray, int, np.integer)) for x in (slots, positions, block_start, block_len,
                                                                    num_blocks))
  xp = np if host else jnp
  n = slots.shape[0]
  start = xp.asarray(block_start[:max_blocks], xp.int32)
  used = xp.arange(max_blocks) < xp.reshape(xp.asarray(num_blocks, xp.int32), ())
  # (lax, not jnp.where / jnp.argsort: those are jitted functions, and a jit nested in a stream annotation's
  # computation fails at run time, "No ExecutionStreamId found")
  length = np.where(used, block_len[:max_blocks], 0).astype(np.int32) if host else lax.select(
      used, jnp.asarray(block_len[:max_blocks], jnp.int32), jnp.zeros((max_blocks,), jnp.int32))
  first = xp.minimum(start, n - 1)
  pos0 = xp.asarray(positions, xp.int32)[first]
  info = xp.stack([xp.asarray(slots, xp.int32)[first], pos0, pos0 + length, start, length], axis=1)
  work = length * (2 * pos0 + length + 1)            # twice the keys its rows attend to, causally
  if host:
    return info[np.argsort(-work, kind="stable")]
  _, order = lax.sort((-work, jnp.arange(max_blocks, dtype=jnp.int32)), num_keys=1, is_stable=True)
  return info[order]


def blocks_reference(info, layer, page_table, q, k_cache, v_cache, out, **_):
  """What `_call` computes, in jnp: `out` with each block's rows (info as block_info gives it) replaced by
  their attention to their sequence's pages, causally."""
  n = q.shape[0]
  r = jnp.arange(BLOCK_Q, dtype=jnp.int32)
  inside = r[None, :] < info[:, ROWS:ROWS + 1]                                   # [blocks, BLOCK_Q]
  rows = jnp.where(inside, info[:, ROW0:ROW0 + 1] + r[None, :], n).reshape(-1)  # n: dropped below
  slots = jnp.repeat(info[:, SEQ], BLOCK_Q)
  positions = jnp.maximum(jnp.minimum(info[:, POS0:POS0 + 1] + r[None, :], info[:, KV_END:KV_END + 1] - 1),
                          0).reshape(-1)
  got = paged_attention_reference(q[jnp.minimum(rows, n - 1)], k_cache, v_cache, layer[0], page_table, slots,
                                  positions)
  return out.at[rows].set(got.astype(out.dtype), mode="drop")


def _call(info, layer, page_table, q, k_cache, v_cache, out, *, block_kv: int, max_concurrent_steps: int,
          num_sms: int | None = None):
  """The kernel on the table `info` (as block_info gives it; non-empty blocks first, the kernel visits those
  only); persistent on num_sms CTAs, or (None) one CTA per item, scheduled by the hardware (kernel_bench
  compares the two)."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  n, hq, d = q.shape
  _, hkv, _, page_size, _ = k_cache.shape
  max_items = info.shape[0] * hq          # (query head, block) pairs; those of non-empty blocks come first
  ctas = max_items if num_sms is None else min(num_sms, max_items)   # persistent on num_sms CTAs
  count = jnp.sum(jnp.asarray(info)[:, ROWS] > 0, dtype=jnp.int32).reshape(1)   # non-empty blocks
  group = hq // hkv
  max_pages = page_table.shape[1]
  pages_per_kv = block_kv // page_size
  wg_rows = BLOCK_Q // 2
  steps = max_concurrent_steps
  dtype = q.dtype
  iota = lambda shape, dim: plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)
  scale_log2 = math.log2(math.e) / math.sqrt(d)   # softmax in base 2, the 1/sqrt(d) folded in
  swizzle = plgpu.find_swizzle(64 * jnp.dtype(dtype).itemsize * 8)
  transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))

  def kernel(info_ref, count_ref, layer_ref, table_ref, q_ref, k_ref, v_ref, out_ref, smem, barriers):
    q_tiled2, stage2, o_tiled2, k_smem, v_smem = smem
    k_ready, v_ready, q_ready, k_free, v_free, turn = barriers
    cta = lax.axis_index("ctas")
    wg = lax.axis_index("wg")
    # Items of empty blocks are not visited: the table's size is a static bound (the engine's: its rows).
    num_items = count_ref[0] * hq
    rounds = pl.cdiv(num_items, jnp.int32(ctas))

    def work_item(r):
      """This CTA's item in round r: items (query head, block) in the table's order (most work first, heads
      fastest), dealt to the CTAs back and forth (a snake, so that no CTA takes the heaviest of every round).
      Returns (head, block, whether it exists and has rows, key blocks it reads)."""
      idx = r * ctas + jnp.where(lax.rem(r, 2) == 0, cta, ctas - 1 - cta)
      valid = idx < num_items
      idx = jnp.minimum(idx, max_items - 1)
      head, block = lax.rem(idx, jnp.int32(hq)), lax.div(idx, jnp.int32(hq))
      live = valid & (info_ref[block, ROWS] > 0)
      return head, block, live, jnp.where(live, pl.cdiv(info_ref[block, KV_END], jnp.int32(block_kv)), 0)

    def take_turn():
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    # An item's query rows are fetched ahead: the next item's TMA copy starts after this item's last Q K^T
    # (the tiles are free then), so its latency hides behind the last P V and the epilogue. Rows past q's end
    # arrive as zeros; rows past the block's end are computed and never stored. Straight into the tiles
    # where the row offset is a multiple of the tiling (and q's row count too: Mosaic tiles the whole array;
    # the engine's buckets are), else into the staging buffer, moved into the tiles through registers in the
    # epilogue before the output takes the buffer (once per item: the bank conflicts are cheap).
    def first_row_of(block):
      return info_ref[block, ROW0] + wg * wg_rows

    def aligned_at(block):
      return (lax.rem(first_row_of(block), jnp.int32(8)) == 0) & (n % 8 == 0)

    def fetch_q(head, block):
      q_tiled, stage = q_tiled2.at[wg], stage2.at[wg]
      first_row = first_row_of(block)

      @pl.when(aligned_at(block))
      def _():
        if n % 8 == 0:   # (traced only then: the copy does not lower otherwise)
          plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(pl.multiple_of(first_row, 8), wg_rows), head], q_tiled,
                                  q_ready.at[wg])

      @pl.when(~aligned_at(block))
      def _():
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(first_row, wg_rows), head], stage, q_ready.at[wg])

    def staged_q_to_tiles():
      plgpu.barrier_wait(q_ready.at[wg])
      q_tiled2.at[wg][...] = plgpu.load(stage2.at[wg], (), layout=plgpu.Layout.WGMMA, optimized=False)
      plgpu.commit_smem()

    def consume(head, block, cta_steps, base, nxt):
      """One item; nxt = (head, block, live) of this CTA's next one, whose query rows it fetches."""
      pos0, kv_end = info_ref[block, POS0], info_ref[block, KV_END]
      rows = info_ref[block, ROWS]
      q_tiled, stage = q_tiled2.at[wg], stage2.at[wg]
      slot_of = lambda i: lax.rem(base + i, jnp.int32(steps))
      first_row = first_row_of(block)
      first_pos = pos0 + wg * wg_rows                        # query position of this warpgroup's first row
      my_steps = pl.cdiv(jnp.minimum(first_pos + wg_rows, kv_end), jnp.int32(block_kv))
      unmasked = jnp.minimum(first_pos // block_kv, my_steps)
      next_head, next_block, next_live = nxt
      pl.when(aligned_at(block))(lambda: plgpu.barrier_wait(q_ready.at[wg]))   # (staged: moved already)
      m_i = plgpu.layout_cast(jnp.full((wg_rows,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      l_i = plgpu.layout_cast(jnp.full((wg_rows,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      acc = plgpu.layout_cast(jnp.full((wg_rows, d), 0, jnp.float32), plgpu.Layout.WGMMA)

      @pl.when(my_steps > 0)
      def _():
        plgpu.barrier_wait(k_ready.at[slot_of(0)])
      pl.when(wg == 1)(take_turn)      # the second warpgroup starts half a turn later

      def kv_step(i, carry, masked: bool):
        acc, m_i, l_i = carry
        slot = slot_of(i)

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_tiled, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
          take_turn()
          return acc_ref[...]
        s = pl.run_scoped(qk, plgpu.ACC((wg_rows, block_kv), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        pl.when((i == my_steps - 1) & next_live)(lambda: fetch_q(next_head, next_block))
        if masked:
          q_pos = first_pos + iota(s.shape, 0)
          k_pos = i * block_kv + iota(s.shape, 1)
          s = jnp.where((k_pos <= q_pos) & (k_pos < kv_end), s, -jnp.inf)
        m_new = jnp.maximum(m_i, s.max(axis=1) * scale_log2)
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s * scale_log2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
        acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
        l_i = l_i * alpha + p.sum(axis=1)
        p_lo = p.astype(dtype)
        acc, l_i, m_new, p_lo = lax.optimization_barrier((acc, l_i, m_new, p_lo))
        plgpu.barrier_arrive(turn)                          # softmax done
        plgpu.barrier_wait(v_ready.at[slot])
        plgpu.barrier_wait(turn)                            # the tensor cores are ours again

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p_lo, v_smem.at[slot])
          nxt = i + 1

          @pl.when(nxt < my_steps)
          def _():
            plgpu.barrier_wait(k_ready.at[slot_of(nxt)])
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))   # wgmma accumulates into acc's registers
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l_i

      def drain(i, _):
        # Key blocks the other warpgroup still needs: wait for them too (each thread tracks every barrier's
        # phase, and the ring's slots come round again in the next item), release them, keep the turns.
        slot = slot_of(i)
        plgpu.barrier_wait(k_ready.at[slot])
        plgpu.barrier_wait(v_ready.at[slot])
        plgpu.barrier_arrive(k_free.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        take_turn()
        take_turn()

      carry = lax.fori_loop(0, unmasked, functools.partial(kv_step, masked=False), (acc, m_i, l_i))
      acc, m_i, l_i = lax.fori_loop(unmasked, my_steps, functools.partial(kv_step, masked=True), carry)
      lax.fori_loop(my_steps, cta_steps, drain, None)
      pl.when(wg == 0)(take_turn)
      acc /= lax.broadcast_in_dim(l_i, acc.shape, [0])
      # The next item's staged query rows into the tiles, before the output takes the staging buffer.
      pl.when(next_live & ~aligned_at(next_block))(staged_q_to_tiles)
      # Store this warpgroup's rows of the block and no others: whole from swizzled tiles where aligned, else
      # from the staging buffer, whole or in pieces of 32, 16, ..., 1 rows.
      my_rows = jnp.clip(rows - wg * wg_rows, 0, wg_rows)
      whole = my_rows == wg_rows
      tiled_out = whole & aligned_at(block)

      @pl.when(tiled_out)     # from swizzled tiles of its own (the query tiles hold the next item's rows)
      def _():
        if n % 8 == 0:
          o_tiled2.at[wg][...] = acc.astype(dtype)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(o_tiled2.at[wg], out_ref.at[pl.ds(pl.multiple_of(first_row, 8), wg_rows), head])

      @pl.when(~tiled_out)
      def _():
        stage[...] = acc.astype(dtype)
        plgpu.commit_smem()

      pl.when(whole & ~tiled_out)(
          lambda: plgpu.copy_smem_to_gmem(stage, out_ref.at[pl.ds(first_row, wg_rows), head]))

      @pl.when(~whole)
      def _():
        done = 0
        size = wg_rows // 2
        while size:
          @pl.when((my_rows & size) != 0)
          def _(done=done, size=size):
            plgpu.copy_smem_to_gmem(stage.at[pl.ds(done, size)], out_ref.at[pl.ds(first_row + done, size), head])
          done = done + (my_rows & size)
          size //= 2
      # Before the item after next fetches into the staging buffer: the stores have read it (their writes to
      # the output may still be in flight; the last item waits for those).
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")

      def one_item(r, base):
        """Round r's item; `base` counts the key blocks of earlier items (the ring's position)."""
        head, block, live, cta_steps = work_item(r)
        next_head, next_block, next_live, _ = work_item(r + 1)

        @pl.when(live)
        def _():
          consume(head, block, cta_steps, base, (next_head, next_block, next_live))
        return base + cta_steps

      head, block, live, _ = work_item(jnp.int32(0))      # the first item's query rows (items live in a prefix)

      @pl.when(live)
      def _():
        fetch_q(head, block)
        pl.when(~aligned_at(block))(staged_q_to_tiles)
      lax.fori_loop(0, rounds, one_item, jnp.int32(0))
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      lay = layer_ref[0]

      def page_ids(seq_row, i):
        # All of a key block's page ids before any copy: independent loads whose latencies overlap (one
        # dependent global load per copy left the producer latency-bound, session 11).
        return [table_ref[seq_row, jnp.minimum(i * pages_per_kv + j, max_pages - 1)] for j in range(pages_per_kv)]

      def one_item(r, base):
        head, block, live, cta_steps = work_item(r)
        kv_head = lax.div(head, jnp.int32(group))
        seq_row = info_ref[block, SEQ]

        @pl.loop(0, cta_steps)
        def _(i):
          slot = lax.rem(base + i, jnp.int32(steps))
          pages = page_ids(seq_row, i)         # issued before the waits, so their latency hides behind them

          @pl.when(base + i >= steps)        # the slot's previous key block is done with
          def _():
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
          for ref, smem_ref, ready in ((k_ref, k_smem, k_ready), (v_ref, v_smem, v_ready)):
            for j, page in enumerate(pages):
              plgpu.copy_gmem_to_smem(ref.at[lay, kv_head, page], smem_ref.at[slot, pl.ds(j * page_size, page_size)],
                                      ready.at[slot])
        return base + cta_steps

      lax.fori_loop(0, rounds, one_item, jnp.int32(0))

  def body(info_ref, count_ref, layer_ref, table_ref, q_ref, k_ref, v_ref, out_ref):
    smem = (plgpu.SMEM((2, wg_rows, d), dtype, transforms=transforms),   # each warpgroup's Q, as wgmma reads it
            plgpu.SMEM((2, wg_rows, d), dtype),                           # ... and as TMA copies it, Q then O
            plgpu.SMEM((2, wg_rows, d), dtype, transforms=transforms),   # O of aligned rows
            plgpu.SMEM((steps, block_kv, d), dtype, transforms=transforms),
            plgpu.SMEM((steps, block_kv, d), dtype, transforms=transforms))
    barriers = (plgpu.Barrier(num_arrivals=pages_per_kv, num_barriers=steps),   # a slot's K pages landed
                plgpu.Barrier(num_arrivals=pages_per_kv, num_barriers=steps),   # its V pages
                plgpu.Barrier(num_barriers=2),                                  # each warpgroup's Q
                plgpu.Barrier(num_arrivals=2, num_barriers=steps),              # both consumers done with K
                plgpu.Barrier(num_arrivals=2, num_barriers=steps),              # ... with V
                plgpu.Barrier(num_arrivals=2))                                  # turns on the tensor cores
    pl.run_scoped(lambda *scoped: kernel(info_ref, count_ref, layer_ref, table_ref, q_ref, k_ref, v_ref, out_ref,
                                         *scoped),
                  smem, barriers, collective_axes="wg")

  # `out` aliased in and out: the kernel's stores land in it and every other row keeps its value, no copy.
  from pallas_kernels import jax_compat
  mesh = plgpu.Mesh(grid=(ctas,), grid_names=("ctas",), num_threads=3, thread_name="wg")
  return jax_compat.mosaic_kernel_aliased(
      lambda *refs: body(*refs[:7], refs[8]), jax.ShapeDtypeStruct(out.shape, out.dtype), mesh, {7: 0},
      plgpu.CompilerParams(approx_math=True), "prefill_attention_mgpu")(
          info, count, layer, page_table, q, k_cache, v_cache, out)
