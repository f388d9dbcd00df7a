"""Paged attention as a Triton kernel called through jax-triton: the same function, arguments and work
items as pallas_kernels/paged_attention.py (whose jnp reference it is tested against), written in
Triton directly so that we control what the Pallas lowering does not let us control:
- one K/V tile is BLOCK_N keys gathered through the page table (BLOCK_N // page_size whole pages), in a
  `tl.range(num_stages=...)` loop. Triton 3.9 pipelines those gathers ahead of the math only when the page
  ids come from the previous iteration (`prefetch_pages`) and num_stages >= 3; otherwise every block waits
  for its own loads (lab/triton_ir.py shows which; docs/history/perf-notes.md, session 8);
- page offsets are 64-bit once per key row (not per element), so a 100 GB cache costs no more than 1 GB;
- the loop over a work item's keys is split into blocks that need no causal mask and the few that do;
- softmax in base 2 with the scale folded into one multiply.
Work items are (query block, KV head) as in the Pallas kernel; rows of a tile are block_q tokens x the
q_per_kv query heads of the KV head (GQA packed: each K/V tile is read once for all of them). The grid is
`num_sms * programs_per_sm` persistent programs: the kernel's SM share.

jax-triton is imported lazily (it refuses to import without a GPU-enabled jax); on a CPU the same kernel
runs in Triton's interpreter (`interpret_call`, used by the tests).
"""
from __future__ import annotations

import math

import numpy as np

from pallas_kernels.paged_kv import merge_splits  # noqa: F401 (the merge of key_splits; callers)

try:
  import triton
  import triton.language as tl
except ImportError:  # the Pallas kernel and the reference still work without Triton
  triton = None

# Best of the sweep on one H200 (lab/kernel_bench.py --sweep_attention, docs/history/perf-notes.md).
DECODE_CONFIG = dict(block_q=1, block_n=128, num_warps=4, num_stages=2, programs_per_sm=2)
# An fp8 cache: the dots in f16 (fp8 converts to f16 in one instruction), and many one-warp CTAs of 64-key
# blocks: the loads are not pipelined (no page ids ahead), so what hides their latency is the CTAs in flight
# on each SM (16 of 8 KB tiles), and one warp needs no cross-warp reductions per block. 3.63 TB/s of fp8 bytes
# against 2.69 for the previous (128-key blocks, 4 warps, 3 stages, 2 CTAs per SM), same run (session 17).
DECODE_CONFIG_FP8 = dict(block_q=1, block_n=64, num_warps=1, num_stages=2, programs_per_sm=16, dot_f16=True)
PREFILL_CONFIG = dict(block_q=32, block_n=64, num_warps=8, num_stages=3, programs_per_sm=1)
# An fp8 cache's prefill: the dots in f16 as in decode, and two 4-warp CTAs per SM: 250 TFLOP/s against
# PREFILL_CONFIG's 203 on the same fp8 cache, same run (1.23x; relative error 9.8e-4 against 2.0e-3;
# session 21, `sweep-fp8-prefill`).
PREFILL_CONFIG_FP8 = dict(block_q=32, block_n=64, num_warps=4, num_stages=3, programs_per_sm=2, dot_f16=True)
LOG2E = 1.4426950408889634


def available() -> bool:
  """True where the kernel can run compiled: Triton and jax-triton import and JAX has a GPU."""
  if triton is None:
    return False
  try:
    import jax
    if jax.default_backend() != "gpu":
      return False
    import jax_triton  # noqa: F401
  except Exception:  # jax-triton raises a plain Exception without GPU support
    return False
  return True


def _rows(block_q: int, q_per_kv: int, swap_ab: bool = False) -> int:
  """Query rows of a tile, padded to what the dot takes: 16 rows as its M side, 8 columns as wgmma's N side
  with swap_ab (GQA's 4 query heads then waste half the tile, not three quarters; 8 waste none)."""
  return max(8 if swap_ab else 16, triton.next_power_of_2(block_q * q_per_kv))


if triton is not None:

  @triton.jit
  def _work_item(i, total, rows, d, layer, blk_start_ptr, blk_len_ptr, slots_ptr, pos_ptr, pt_ptr, q_ptr,
                 qs_ptr, NUM_KV_HEADS: tl.constexpr, Q_PER_KV: tl.constexpr, NUM_PAGES: tl.constexpr,
                 PT_STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                 WINDOW: tl.constexpr, HEAVY_FIRST: tl.constexpr, DOT_F16: tl.constexpr, DOT_FP8: tl.constexpr):
    """Work item i of `total` (a query block x a KV head): its queries and where they go (with DOT_FP8 the
    queries in e4m3 and their scales, per row), their positions, the key blocks to visit ([lo, full_hi) need
    no mask, [full_hi, hi) do), and where its K/V pages are."""
    # Heavy first: a chunk's later query blocks see more keys; starting them first shortens the tail.
    w = total - 1 - i if HEAVY_FIRST else i
    b = w // NUM_KV_HEADS
    h = w % NUM_KV_HEADS
    t0 = tl.load(blk_start_ptr + b)
    nt = tl.load(blk_len_ptr + b)
    slot = tl.load(slots_ptr + t0)
    tok_in_block = rows // Q_PER_KV
    row_ok = (rows < BLOCK_Q * Q_PER_KV) & (tok_in_block < nt)
    tok = t0 + tok_in_block
    q_off = (tok.to(tl.int64) * (NUM_KV_HEADS * Q_PER_KV) + h * Q_PER_KV + rows % Q_PER_KV) * HEAD_DIM
    q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    q_scale = rows.to(tl.float32) * 0.0 + 1.0   # per row; unused unless DOT_FP8
    if DOT_FP8:   # the scores' dot on e4m3 operands (no conversion of K), each row's scale applied after it
      q = q.to(tl.float8e4nv)
      q_scale = tl.load(qs_ptr + q_off // HEAD_DIM, mask=row_ok, other=0.0)
    elif DOT_F16:   # dots in f16: an fp8 (e4m3) tile converts to f16 in one instruction, to bf16 in three
      q = q.to(tl.float16)
    row_pos = tl.load(pos_ptr + tok, mask=row_ok, other=0)
    first = tl.load(pos_ptr + t0)
    last = tl.load(pos_ptr + t0 + nt - 1)
    hi = last // BLOCK_N + 1
    if WINDOW > 0:   # every block may cut the window: all masked
      lo = tl.maximum(first - WINDOW + 1, 0) // BLOCK_N
      full_hi = lo
    else:            # blocks wholly at or before the block's first position need no mask
      lo = 0
      full_hi = (first + 1) // BLOCK_N
    kv_base = (layer * NUM_KV_HEADS + h) * NUM_PAGES
    pt_row = pt_ptr + slot.to(tl.int64) * PT_STRIDE
    return q, q_scale, q_off, row_ok, row_pos, lo, full_hi, hi, kv_base, pt_row

  @triton.jit
  def _attend_item(i, total, rows, d, cols, layer, blk_start_ptr, blk_len_ptr, slots_ptr, pos_ptr, pt_ptr, q_ptr, qs_ptr,
                   k_ptr, v_ptr, out_ptr, part_ptr, ml_ptr, NUM_KV_HEADS: tl.constexpr, Q_PER_KV: tl.constexpr,
                   NUM_PAGES: tl.constexpr, PT_STRIDE: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr,
                   QK_SCALE: tl.constexpr, NUM_STAGES: tl.constexpr, HEAVY_FIRST: tl.constexpr,
                   DOT_F16: tl.constexpr, PREFETCH_PAGES: tl.constexpr, KEY_AXIS: tl.constexpr,
                   MASK_ALL: tl.constexpr, DOT_FP8: tl.constexpr, KEY_SPLITS: tl.constexpr, ROWS: tl.constexpr):
    """Program-level work unit i (of total x KEY_SPLITS): one work item's keys, or one split of them."""
    split = i % KEY_SPLITS
    q, q_scale, q_off, row_ok, row_pos, lo, full_hi, hi, kv_base, pt_row = _work_item(
        i // KEY_SPLITS, total, rows, d, layer, blk_start_ptr, blk_len_ptr, slots_ptr, pos_ptr, pt_ptr, q_ptr,
        qs_ptr, NUM_KV_HEADS, Q_PER_KV, NUM_PAGES, PT_STRIDE, HEAD_DIM, BLOCK_Q, BLOCK_N, WINDOW, HEAVY_FIRST,
        DOT_F16, DOT_FP8)
    per_split = (hi - lo + KEY_SPLITS - 1) // KEY_SPLITS
    split_lo = lo + split * per_split
    split_hi = tl.minimum(split_lo + per_split, hi)
    if DOT_FP8:   # the scores' scale per query row; otherwise the one constant, as before dot_fp8 existed
      row_scale = tl.expand_dims(q_scale * QK_SCALE, KEY_AXIS)
    else:
      row_scale = QK_SCALE
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    # Scores s are [BLOCK_M, BLOCK_N] with keys on axis 1, or with swap_ab [BLOCK_N, BLOCK_M] (KEY_AXIS 0):
    # K q^T and V^T P, so that BLOCK_N keys are the dots' M side (>= 64 rows: Hopper's wgmma, straight
    # from the K tile in shared memory) and the few query rows pad only the N side. acc is then transposed.
    if KEY_AXIS == 0:
      q_t = tl.trans(q)
      acc = tl.zeros([HEAD_DIM, BLOCK_M], tl.float32)
    else:
      acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if MASK_ALL:   # one key loop, every block masked: the pipeline is filled once per work item, not twice
      full_hi = lo
    for phase in tl.static_range(2):   # key blocks needing no mask, then the masked ones (of this split)
      j0 = tl.maximum(full_hi if phase == 1 else lo, split_lo)
      j1 = tl.minimum(hi if phase == 1 else full_hi, split_hi)
      if PREFETCH_PAGES:   # the first block's page ids; each iteration then loads the next block's
        page_next = tl.load(pt_row + (j0 * BLOCK_N + cols) // PAGE_SIZE, mask=cols * 0 + j0 < j1, other=0)
      for j in tl.range(j0, j1, num_stages=NUM_STAGES):
        kpos = j * BLOCK_N + cols
        if PREFETCH_PAGES:
          # The K/V addresses then hang on a load of the previous iteration, not on one of this one:
          # Triton pipelines the K/V loads only so (lab/triton_ir.py; docs/history/perf-notes.md, session 8).
          page = page_next
          page_next = tl.load(pt_row + (kpos + BLOCK_N) // PAGE_SIZE, mask=cols * 0 + j + 1 < j1, other=0)
        else:
          page = tl.load(pt_row + kpos // PAGE_SIZE)
        row_off = (kv_base + page.to(tl.int64)) * (PAGE_SIZE * HEAD_DIM) + (kpos % PAGE_SIZE) * HEAD_DIM
        # .to(q.dtype): an fp8 cache is read at half the bytes and computed on in the dot dtype; with DOT_FP8
        # K stays e4m3 (q is) and only V converts, to f16 as P
        k = tl.load(k_ptr + row_off[:, None] + d[None, :]).to(q.dtype)
        v = tl.load(v_ptr + row_off[:, None] + d[None, :]).to(tl.float16 if DOT_FP8 else q.dtype)
        if KEY_AXIS == 0:
          s = tl.dot(k, q_t) * row_scale
        else:
          s = tl.dot(q, tl.trans(k)) * row_scale
        if phase == 1:
          key_at = tl.expand_dims(kpos, 1 - KEY_AXIS)
          row_at = tl.expand_dims(row_pos, KEY_AXIS)
          mask = key_at <= row_at
          if WINDOW > 0:
            mask &= row_at - key_at < WINDOW
          s = tl.where(mask, s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, KEY_AXIS))
        p = tl.math.exp2(s - tl.expand_dims(m_new, KEY_AXIS))
        if phase == 1:
          p = tl.where(mask, p, 0.0)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, KEY_AXIS)
        if KEY_AXIS == 0:
          pv = tl.dot(tl.trans(v), p.to(v.dtype))
        else:
          pv = tl.dot(p.to(v.dtype), v)
        acc = acc * tl.expand_dims(alpha, KEY_AXIS) + pv
        m_i = m_new
    out_off = tl.expand_dims(q_off, KEY_AXIS) + tl.expand_dims(d, 1 - KEY_AXIS)
    if KEY_SPLITS > 1:
      tl.store(part_ptr + split * (ROWS * HEAD_DIM) + out_off, acc, mask=tl.expand_dims(row_ok, KEY_AXIS))
      ml_off = (split * ROWS + q_off // HEAD_DIM) * 2
      tl.store(ml_ptr + ml_off, m_i, mask=row_ok)
      tl.store(ml_ptr + ml_off + 1, l_i, mask=row_ok)
    else:
      out = acc / tl.expand_dims(tl.maximum(l_i, 1e-30), KEY_AXIS)
      tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=tl.expand_dims(row_ok, KEY_AXIS))

  @triton.jit
  def _paged_attention_kernel(layer_ptr, nblk_ptr, blk_start_ptr, blk_len_ptr, slots_ptr, pos_ptr, pt_ptr, q_ptr,
                              qs_ptr, k_ptr, v_ptr, out_in_ptr, work_ptr, out_ptr, part_ptr, ml_ptr, work_out_ptr,
                              NUM_PROGRAMS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, Q_PER_KV: tl.constexpr,
                              NUM_PAGES: tl.constexpr, PT_STRIDE: tl.constexpr, PAGE_SIZE: tl.constexpr,
                              HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, QK_SCALE: tl.constexpr,
                              NUM_STAGES: tl.constexpr, HEAVY_FIRST: tl.constexpr, DOT_F16: tl.constexpr,
                              PREFETCH_PAGES: tl.constexpr, KEY_AXIS: tl.constexpr, MASK_ALL: tl.constexpr,
                              DOT_FP8: tl.constexpr, KEY_SPLITS: tl.constexpr, ROWS: tl.constexpr,
                              DYNAMIC: tl.constexpr):
    # KEY_SPLITS > 1 (flash-decoding): each work item's key blocks are shared out over KEY_SPLITS programs,
    # each writing its unnormalized sum and softmax state (acc to part_ptr, (m, l) to ml_ptr, per split and
    # query row of the ROWS = tokens x query heads); merge_splits combines them. A small batch's few work items
    # then run as many short loops instead of one long one (latency, not bytes, bounds a batch-1 decode).
    # DYNAMIC: the programs take work units from a counter (work_out_ptr, zero at the start: the aliased
    # work_ptr) as each finishes its last, instead of every NUM_PROGRAMS-th in turn; with a prefill's causal
    # items (1 to 48 key blocks) a fixed share leaves some programs twice the average (perf-notes, session 22).
    pid = tl.program_id(0)
    total = tl.load(nblk_ptr) * NUM_KV_HEADS
    layer = tl.load(layer_ptr).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, BLOCK_N)
    if DYNAMIC:
      i = tl.atomic_add(work_out_ptr, 1)
      while i < total * KEY_SPLITS:
        _attend_item(i, total, rows, d, cols, layer, blk_start_ptr, blk_len_ptr, slots_ptr, pos_ptr, pt_ptr, q_ptr,
                     qs_ptr, k_ptr, v_ptr, out_ptr, part_ptr, ml_ptr, NUM_KV_HEADS, Q_PER_KV, NUM_PAGES, PT_STRIDE,
                     PAGE_SIZE, HEAD_DIM, BLOCK_Q, BLOCK_M, BLOCK_N, WINDOW, QK_SCALE, NUM_STAGES, HEAVY_FIRST,
                     DOT_F16, PREFETCH_PAGES, KEY_AXIS, MASK_ALL, DOT_FP8, KEY_SPLITS, ROWS)
        i = tl.atomic_add(work_out_ptr, 1)
    else:
      for i in range(pid, total * KEY_SPLITS, NUM_PROGRAMS):
        _attend_item(i, total, rows, d, cols, layer, blk_start_ptr, blk_len_ptr, slots_ptr, pos_ptr, pt_ptr, q_ptr,
                     qs_ptr, k_ptr, v_ptr, out_ptr, part_ptr, ml_ptr, NUM_KV_HEADS, Q_PER_KV, NUM_PAGES, PT_STRIDE,
                     PAGE_SIZE, HEAD_DIM, BLOCK_Q, BLOCK_M, BLOCK_N, WINDOW, QK_SCALE, NUM_STAGES, HEAVY_FIRST,
                     DOT_F16, PREFETCH_PAGES, KEY_AXIS, MASK_ALL, DOT_FP8, KEY_SPLITS, ROWS)

  @triton.jit
  def _paged_attention_groups_kernel(layer_ptr, nblk_ptr, blk_start_ptr, blk_len_ptr, slots_ptr, pos_ptr, pt_ptr,
                                     q_ptr, qs_ptr, k_ptr, v_ptr, out_in_ptr, out_ptr,
                                     NUM_PROGRAMS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, Q_PER_KV: tl.constexpr,
                                     NUM_PAGES: tl.constexpr, PT_STRIDE: tl.constexpr, PAGE_SIZE: tl.constexpr,
                                     HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                                     BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, QK_SCALE: tl.constexpr,
                                     NUM_STAGES: tl.constexpr, HEAVY_FIRST: tl.constexpr, DOT_F16: tl.constexpr,
                                     MASK_ALL: tl.constexpr, KEY_GROUPS: tl.constexpr, GROUP_N: tl.constexpr):
    """The same attention with each key block split into KEY_GROUPS groups of GROUP_N keys, each group
    keeping its own softmax state through the work item (batched dots over the groups: one warp each), and
    the states merged once at its end. The per-block softmax then reduces within a warp, and P goes from the
    score dot to the value dot in registers: no cross-warp exchange and barrier per block. Page ids are
    loaded one block ahead, which Triton needs to pipeline the K/V loads (perf-notes, session 8)."""
    pid = tl.program_id(0)
    total = tl.load(nblk_ptr) * NUM_KV_HEADS
    layer = tl.load(layer_ptr).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, KEY_GROUPS)[:, None] * GROUP_N + tl.arange(0, GROUP_N)[None, :]   # [groups, GROUP_N]
    for i in range(pid, total, NUM_PROGRAMS):
      q, _, q_off, row_ok, row_pos, lo, full_hi, hi, kv_base, pt_row = _work_item(
          i, total, rows, d, layer, blk_start_ptr, blk_len_ptr, slots_ptr, pos_ptr, pt_ptr, q_ptr, qs_ptr,
          NUM_KV_HEADS, Q_PER_KV, NUM_PAGES, PT_STRIDE, HEAD_DIM, BLOCK_Q, BLOCK_N, WINDOW, HEAVY_FIRST, DOT_F16,
          False)
      q_g = tl.broadcast_to(q[None, :, :], (KEY_GROUPS, BLOCK_M, HEAD_DIM))
      m_i = tl.full([KEY_GROUPS, BLOCK_M], -1.0e30, tl.float32)
      l_i = tl.zeros([KEY_GROUPS, BLOCK_M], tl.float32)
      acc = tl.zeros([KEY_GROUPS, BLOCK_M, HEAD_DIM], tl.float32)
      if MASK_ALL:
        full_hi = lo
      for phase in tl.static_range(2):   # key blocks needing no mask, then the masked ones
        j0 = full_hi if phase == 1 else lo
        j1 = hi if phase == 1 else full_hi
        page_next = tl.load(pt_row + (j0 * BLOCK_N + cols) // PAGE_SIZE, mask=cols * 0 + j0 < j1, other=0)
        for j in tl.range(j0, j1, num_stages=NUM_STAGES):
          kpos = j * BLOCK_N + cols
          page = page_next
          page_next = tl.load(pt_row + (kpos + BLOCK_N) // PAGE_SIZE, mask=cols * 0 + j + 1 < j1, other=0)
          row_off = (kv_base + page.to(tl.int64)) * (PAGE_SIZE * HEAD_DIM) + (kpos % PAGE_SIZE) * HEAD_DIM
          k = tl.load(k_ptr + row_off[:, :, None] + d[None, None, :]).to(q.dtype)   # [groups, GROUP_N, D]
          v = tl.load(v_ptr + row_off[:, :, None] + d[None, None, :]).to(q.dtype)
          s = tl.dot(q_g, tl.trans(k, (0, 2, 1))) * QK_SCALE                       # [groups, BLOCK_M, GROUP_N]
          if phase == 1:
            key_at = kpos[:, None, :]
            row_at = row_pos[None, :, None]
            mask = key_at <= row_at
            if WINDOW > 0:
              mask &= row_at - key_at < WINDOW
            s = tl.where(mask, s, -1.0e30)
          m_new = tl.maximum(m_i, tl.max(s, 2))
          p = tl.math.exp2(s - m_new[:, :, None])
          if phase == 1:
            p = tl.where(mask, p, 0.0)
          alpha = tl.math.exp2(m_i - m_new)
          l_i = l_i * alpha + tl.sum(p, 2)
          acc = acc * alpha[:, :, None] + tl.dot(p.to(v.dtype), v)
          m_i = m_new
      # The groups' states merged (a group that saw no key has l 0 and m -1e30: its weight is 0).
      m = tl.max(m_i, 0)
      weight = tl.math.exp2(m_i - m[None, :])
      l_sum = tl.sum(l_i * weight, 0)
      out = tl.sum(acc * weight[:, :, None], 0) / tl.maximum(l_sum, 1e-30)[:, None]
      tl.store(out_ptr + q_off[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def key_splits_for(max_decodes: int, num_kv_heads: int, programs: int, max_splits: int = 32) -> int:
  """How many programs to share each decode's keys over (key_splits) so that a step of at most `max_decodes`
  decodes (its bucket) fills the `programs` the decode configuration launches: 1 for large steps."""
  return max(1, min(max_splits, programs // max(1, max_decodes * num_kv_heads)))


def quantize_queries(q):
  """The queries [T, Hq, D] in e4m3 with a scale per (token, head) row, for `dot_fp8`: q ~= q8 * scale.
  The scale maps each row's largest magnitude to e4m3's largest finite value (448)."""
  import jax.numpy as jnp
  q = jnp.asarray(q, jnp.float32)
  scale = jnp.maximum(jnp.max(jnp.abs(q), axis=-1), 1e-30) / 448.0
  return (q / scale[..., None]).astype(jnp.float8_e4m3fn), scale


def _constants(q_shape, k_shape, page_table_shape, *, num_sms, block_q, block_n, sliding_window, num_stages,
               programs_per_sm, heavy_first=False, dot_f16=False, prefetch_pages=False, swap_ab=False,
               mask_all=False, key_groups=0, dot_fp8=False, key_splits=1, dynamic_work=False):
  """(programs, the kernel's compile-time constants, the kernel: the groups kernel when key_groups > 0)."""
  t, hq, d = q_shape
  _, hkv, num_pages, page_size, _ = k_shape
  if block_n % page_size:
    raise ValueError(f"block_n {block_n} must be a multiple of the page size {page_size}")
  g = hq // hkv
  programs = num_sms * programs_per_sm
  meta = dict(NUM_PROGRAMS=programs, NUM_KV_HEADS=hkv, Q_PER_KV=g, NUM_PAGES=num_pages,
              PT_STRIDE=page_table_shape[1], PAGE_SIZE=page_size, HEAD_DIM=d, BLOCK_Q=block_q,
              BLOCK_M=_rows(block_q, g, swap_ab), BLOCK_N=block_n, WINDOW=sliding_window or 0,
              QK_SCALE=LOG2E / math.sqrt(d), NUM_STAGES=num_stages, HEAVY_FIRST=heavy_first, DOT_F16=dot_f16,
              MASK_ALL=mask_all)
  if key_splits < 1:
    raise ValueError(f"key_splits must be >= 1, got {key_splits}")
  if not key_groups:
    return programs, {**meta, "PREFETCH_PAGES": prefetch_pages, "KEY_AXIS": 0 if swap_ab else 1,
                      "DOT_FP8": bool(dot_fp8), "KEY_SPLITS": key_splits,
                      # (0 without splits: a constant that follows the step's token count would compile the
                      # kernel once per bucket)
                      "ROWS": t * hq if key_splits > 1 else 0, "DYNAMIC": bool(dynamic_work)}, _paged_attention_kernel
  if key_splits > 1:
    raise ValueError("key_splits is not written for key_groups")
  if dynamic_work:
    raise ValueError("dynamic_work is not written for key_groups")
  if dot_fp8:
    raise ValueError("dot_fp8 is not written for key_groups")
  if swap_ab:
    raise ValueError("key_groups and swap_ab are two layouts of the same dots: choose one")
  if block_n % key_groups or block_n // key_groups < 16:
    raise ValueError(f"key_groups {key_groups} must split block_n {block_n} into groups of >= 16 keys "
                     "(the dots' smallest side)")
  return programs, {**meta, "KEY_GROUPS": key_groups, "GROUP_N": block_n // key_groups}, \
      _paged_attention_groups_kernel


def paged_attention_call(q, k_cache, v_cache, layer, page_table, slots, positions, block_start, block_len,
                         num_blocks, *,
                         num_sms: int, block_q: int = 1, block_n: int = 128, sliding_window: int | None = None,
                         num_warps: int = 4, num_stages: int = 3, programs_per_sm: int = 1, heavy_first: bool = False,
                         dot_f16: bool = False, prefetch_pages: bool = False, swap_ab: bool = False,
                         mask_all: bool = False, key_groups: int = 0, dot_fp8: bool = False, key_splits: int = 1,
                         dynamic_work: bool = False, out=None):
  """Arguments as pallas_kernels.paged_attention.paged_attention_call. The page table is read up to the
  end of the last block of keys: its columns are padded here to a multiple of block_n // page_size unless
  they are already (the engine allocates them so, and saves the copy). dot_f16: the dots in f16 (for fp8
  caches: DECODE_CONFIG_FP8 sets it, measured in docs/history/perf-notes.md). prefetch_pages: each key block's page
  ids are loaded one iteration ahead (a variant for the bandwidth per SM beside a GEMM; perf-notes).
  swap_ab: the dots as K q^T and V^T P, keys on the M side, so that with one query token per sequence the
  tensor-core tiles are filled by keys, not padded query rows (a decode variant; perf-notes). mask_all: one
  key loop per work item with every block masked, instead of a loop over the blocks needing no mask and a
  second over the rest (each loop fills and drains its own load pipeline). key_groups: each key block in
  this many groups with their own softmax states (_paged_attention_groups_kernel; page ids always ahead).
  dot_fp8 (fp8 caches): the queries quantized per row to e4m3 (quantize_queries) and the scores' dot run on
  e4m3 operands, K read without conversion; V and P in f16. key_splits: each work item's keys shared out over
  this many programs, their partial results merged after (merge_splits; for small decode batches).
  dynamic_work: the programs take work items from a counter as they finish (a prefill's causal items differ
  in length up to the chunk's key blocks), not a fixed every-NUM_PROGRAMS-th share."""
  import jax
  import jax.numpy as jnp
  import jax_triton as jt
  programs, meta, kernel = _constants(q.shape, k_cache.shape, page_table.shape, num_sms=num_sms, block_q=block_q,
                                      block_n=block_n, sliding_window=sliding_window, num_stages=num_stages,
                                      programs_per_sm=programs_per_sm, heavy_first=heavy_first, dot_f16=dot_f16,
                                      prefetch_pages=prefetch_pages, swap_ab=swap_ab, mask_all=mask_all,
                                      key_groups=key_groups, dot_fp8=dot_fp8, key_splits=key_splits,
                                      dynamic_work=dynamic_work)
  if dot_fp8:
    q_in, q_scale = quantize_queries(q)
  else:
    q_in, q_scale = q, jnp.ones((1,), jnp.float32)
  if out is None:
    out = jnp.zeros(q.shape, q.dtype)
  per_block = block_n // k_cache.shape[3]
  if page_table.shape[1] % per_block:  # lax.pad, not jnp.pad: no nested jit under stream annotation
    page_table = jax.lax.pad(jnp.asarray(page_table, jnp.int32), jnp.int32(0),
                             [(0, 0, 0), (0, -page_table.shape[1] % per_block, 0)])
    meta["PT_STRIDE"] = page_table.shape[1]
  i32 = lambda x: jnp.asarray(x, jnp.int32)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  inputs = [i32(layer).reshape(1), i32(num_blocks).reshape(1), i32(block_start), i32(block_len), i32(slots),
            i32(positions), i32(page_table), q_in, q_scale, k_cache, v_cache, out]
  aliases = {11: 0}
  if kernel is _paged_attention_kernel:
    t, hq, d = q.shape
    # the work counter, then the split partials (a word each where there are no splits). The counter starts at
    # zero only with dynamic_work (the output aliased to a zero input: XLA copies the constant in, one tiny op a
    # call); without it both are unused, and an unaliased output costs nothing.
    inputs.append(jnp.zeros((1,), jnp.int32))
    parts = (key_splits * t * hq * d, key_splits * t * hq * 2) if key_splits > 1 else (1, 1)
    out_shape += [jax.ShapeDtypeStruct((n,), jnp.float32) for n in parts] + [jax.ShapeDtypeStruct((1,), jnp.int32)]
    if dynamic_work:
      aliases[12] = 3
  res = jt.triton_call(*inputs, kernel=kernel, out_shape=out_shape, grid=(programs,), input_output_aliases=aliases,
                       num_warps=num_warps, num_stages=num_stages, name="paged_attention_triton", **meta)
  if key_splits == 1:
    return res[0]
  return merge_splits(res[0], res[1], res[2], block_start, block_len, num_blocks, key_splits, block_q)


def interpret_call(q, k_cache, v_cache, layer, page_table, slots, positions, block_start, block_len, num_blocks, *,
                   num_sms: int, block_q: int = 1, block_n: int = 128, sliding_window: int | None = None,
                   num_warps: int = 4, num_stages: int = 3, programs_per_sm: int = 1,
                   heavy_first: bool = False, dot_f16: bool = False, prefetch_pages: bool = False,
                   swap_ab: bool = False, mask_all: bool = False, key_groups: int = 0,
                   dot_fp8: bool = False, key_splits: int = 1, dynamic_work: bool = False) -> np.ndarray:
  """The same kernel in Triton's interpreter on the CPU (numpy in, numpy out): the tests' path. With dot_fp8
  the queries reach it quantized (as float32 values e4m3 holds exactly: the interpreter's float32 -> e4m3
  conversion mis-rounds where the mantissa carries), and so must the caches."""
  import torch
  from pallas_kernels.triton_interpret import f32, i32, interpreted
  page_table = np.asarray(page_table)
  page_table = np.pad(page_table, ((0, 0), (0, -page_table.shape[1] % (block_n // k_cache.shape[3]))))
  programs, meta, kernel = _constants(q.shape, k_cache.shape, page_table.shape, num_sms=num_sms, block_q=block_q,
                                      block_n=block_n, sliding_window=sliding_window, num_stages=num_stages,
                                      programs_per_sm=programs_per_sm, heavy_first=heavy_first, dot_f16=dot_f16,
                                      prefetch_pages=prefetch_pages, swap_ab=swap_ab, mask_all=mask_all,
                                      key_groups=key_groups, dot_fp8=dot_fp8, key_splits=key_splits,
                                      dynamic_work=dynamic_work)
  q_in, q_scale = quantize_queries(q) if dot_fp8 else (q, np.ones(1, np.float32))
  out = torch.zeros(q.shape, dtype=torch.float32)
  work, extra = (), ()
  if kernel is _paged_attention_kernel:
    t, hq, d = q.shape
    counter = torch.zeros(1, dtype=torch.int32)
    work = (counter,)
    # (NaN-filled: a partial the kernel fails to write shows in the merged result)
    extra = tuple(torch.full((n,), float("nan")) for n in (key_splits * t * hq * d, key_splits * t * hq * 2))
    extra += (counter,)
  interpreted(kernel)[(programs,)](i32(layer), i32(num_blocks), i32(block_start), i32(block_len), i32(slots), i32(positions),
                      i32(page_table), f32(q_in), f32(q_scale), f32(k_cache), f32(v_cache), out, *work, out, *extra,
                      **meta)
  if key_splits == 1:
    return out.numpy()
  return merge_splits(out.numpy(), extra[0].numpy(), extra[1].numpy(), np.asarray(block_start),
                      np.asarray(block_len), np.asarray(num_blocks), key_splits, block_q, xp=np)
