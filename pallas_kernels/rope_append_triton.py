"""RoPE (rotate-half, any inverse frequencies: default, linear or llama3 scaling) fused with the KV
append: one Triton kernel (through jax-triton) that rotates a step's queries and keys and writes the
rotated keys and the values into their cache pages, instead of XLA's rotation fusions and two scatters.

Reference: `rope_append_reference` (the model's apply_rope + paged_attention.append_kv), which the tests
compare with in Triton's interpreter. Cache layout as paged_attention: [layers, kv_heads, pages,
page_size, head_dim]; a row whose page is `num_pages` (padding) writes nothing. The grid: one program per
token, up to PROGRAMS_PER_SM per SM (then each walks several tokens).

Not wired into the engine yet: it has not been measured on the GPU against the XLA fusions it would
replace (lab/kernel_bench.py --rope_append times both).
"""
from __future__ import annotations

import numpy as np

from pallas_kernels.triton_shared import row_programs

try:
  import triton
  import triton.language as tl
except ImportError:
  triton = None


def rope_append_reference(q, k, v, positions, inv_freq, k_cache, v_cache, layer, pages, offsets):
  """q [N, Hq, D], k/v [N, Hkv, D] -> (rotated q, k_cache, v_cache)."""
  from pallas_kernels.ops_reference import apply_rope
  from pallas_kernels.paged_kv import append_kv
  k_cache, v_cache = append_kv(k_cache, v_cache, layer, apply_rope(k, positions, inv_freq), v, pages, offsets)
  return apply_rope(q, positions, inv_freq), k_cache, v_cache


if triton is not None:

  @triton.jit
  def _rope_append_kernel(layer_ptr, pos_ptr, page_ptr, off_ptr, inv_ptr, q_ptr, k_ptr, v_ptr, kc_in, vc_in,
                          q_out, kc_ptr, vc_ptr,
                          N: tl.constexpr, HQ: tl.constexpr, HQ_P2: tl.constexpr, HKV: tl.constexpr,
                          HKV_P2: tl.constexpr, HALF: tl.constexpr, NUM_PAGES: tl.constexpr,
                          PAGE_SIZE: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(layer_ptr).to(tl.int64)
    d = tl.arange(0, HALF)
    inv = tl.load(inv_ptr + d)
    hq = tl.arange(0, HQ_P2)
    hk = tl.arange(0, HKV_P2)
    for t in range(pid, N, NUM_PROGRAMS):
      ang = tl.load(pos_ptr + t).to(tl.float32) * inv
      cos = tl.cos(ang)[None, :]
      sin = tl.sin(ang)[None, :]
      # queries: every head of the token, both halves
      qm = (hq[:, None] < HQ) & (d[None, :] < HALF)
      qa = (t * HQ + hq[:, None]).to(tl.int64) * (2 * HALF) + d[None, :]
      x1 = tl.load(q_ptr + qa, mask=qm, other=0.0).to(tl.float32)
      x2 = tl.load(q_ptr + qa + HALF, mask=qm, other=0.0).to(tl.float32)
      tl.store(q_out + qa, (x1 * cos - x2 * sin).to(q_out.dtype.element_ty), mask=qm)
      tl.store(q_out + qa + HALF, (x2 * cos + x1 * sin).to(q_out.dtype.element_ty), mask=qm)
      # keys rotated, values as they are, into (layer, head, page, offset) unless the row is padding
      page = tl.load(page_ptr + t)
      # (page broadcast to a tensor first: Triton's interpreter rejects a scalar term in a mask)
      km = (hk[:, None] < HKV) & (d[None, :] < HALF) & (hk[:, None] * 0 + page < NUM_PAGES)
      ka = (t * HKV + hk[:, None]).to(tl.int64) * (2 * HALF) + d[None, :]
      y1 = tl.load(k_ptr + ka, mask=km, other=0.0).to(tl.float32)
      y2 = tl.load(k_ptr + ka + HALF, mask=km, other=0.0).to(tl.float32)
      v1 = tl.load(v_ptr + ka, mask=km, other=0.0)
      v2 = tl.load(v_ptr + ka + HALF, mask=km, other=0.0)
      slot = ((layer * HKV + hk[:, None]) * NUM_PAGES + page) * PAGE_SIZE + tl.load(off_ptr + t)
      ca = slot * (2 * HALF) + d[None, :]
      # the rotated keys rounded to the model dtype first (as the reference's append of apply_rope's output):
      # an fp8 cache then holds the same bytes
      k1 = (y1 * cos - y2 * sin).to(k_ptr.dtype.element_ty)
      k2 = (y2 * cos + y1 * sin).to(k_ptr.dtype.element_ty)
      tl.store(kc_ptr + ca, k1.to(kc_ptr.dtype.element_ty), mask=km)
      tl.store(kc_ptr + ca + HALF, k2.to(kc_ptr.dtype.element_ty), mask=km)
      tl.store(vc_ptr + ca, v1.to(vc_ptr.dtype.element_ty), mask=km)
      tl.store(vc_ptr + ca + HALF, v2.to(vc_ptr.dtype.element_ty), mask=km)


# Programs per SM: with one program per token (up to this many per SM) each program's loads are in flight at
# once across the GPU; one persistent program per SM walking ~16 tokens in turn waited on each token's loads
# (60 us a layer call at 2048 tokens, session 3).
PROGRAMS_PER_SM = 16


def _meta(q_shape, k_shape, cache_shape, num_sms: int) -> tuple[int, dict]:
  n, hq, d = q_shape
  _, hkv, _ = k_shape
  _, hkv_c, num_pages, page_size, d_c = cache_shape
  if d % 2 or d != d_c or hkv != hkv_c:
    raise ValueError(f"rope_append: q {q_shape}, k {k_shape} and cache {cache_shape} do not match")
  p2 = lambda x: 1 << (x - 1).bit_length()
  programs = row_programs(n, num_sms, PROGRAMS_PER_SM)
  return programs, dict(N=n, HQ=hq, HQ_P2=p2(hq), HKV=hkv, HKV_P2=p2(hkv), HALF=d // 2, NUM_PAGES=num_pages,
                        PAGE_SIZE=page_size, NUM_PROGRAMS=programs)


def rope_append(q, k, v, positions, inv_freq, k_cache, v_cache, layer, pages, offsets, *, num_sms: int,
                num_warps: int = 4):
  """The compiled kernel (GPU, jax-triton); arguments and results as rope_append_reference. The caches are
  updated in place (aliased), so donate them."""
  import jax
  import jax.numpy as jnp
  import jax_triton as jt
  programs, meta = _meta(q.shape, k.shape, k_cache.shape, num_sms)
  i32 = lambda x: jnp.asarray(x, jnp.int32)
  return jt.triton_call(
      i32(layer).reshape(1), i32(positions), i32(pages), i32(offsets), jnp.asarray(inv_freq, jnp.float32), q, k, v,
      k_cache, v_cache, kernel=_rope_append_kernel,
      out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
      grid=(programs,), input_output_aliases={8: 1, 9: 2}, num_warps=num_warps, num_stages=1,
      name="rope_append_triton", **meta)


def interpret_call(q, k, v, positions, inv_freq, k_cache, v_cache, layer, pages, offsets, *, num_sms: int):
  """The same kernel in Triton's interpreter (float32, numpy in and out): the tests' path."""
  import torch
  from pallas_kernels.triton_interpret import f32, i32, interpreted
  kernel = interpreted(_rope_append_kernel)
  programs, meta = _meta(np.shape(q), np.shape(k), np.shape(k_cache), num_sms)
  q_out = torch.zeros(np.shape(q), dtype=torch.float32)
  kc, vc = f32(k_cache), f32(v_cache)
  kernel[(programs,)](i32(layer), i32(positions), i32(pages), i32(offsets), f32(inv_freq), f32(q), f32(k), f32(v),
                      kc, vc, q_out, kc, vc, **meta)
  return q_out.numpy(), kc.numpy(), vc.numpy()
