"""The kernels on the GPU against their references, at real model shapes and every SM share.

  NANOFLOW_GPU_TESTS=1 PYTHONPATH=. python3 -m pytest -q tests/gpu
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_utils import page_layout
from pallas_kernels import gemm
from pallas_kernels import grouped_gemm
from pallas_kernels import paged_attention_triton
from pallas_kernels.paged_attention import (attention_call, configs, paged_attention, paged_attention_reference,
                                            query_blocks)

pytestmark = pytest.mark.gpu
SHARES = [132, 112, 96, 64, 48, 32]


@pytest.mark.parametrize("mnk", [(2048, 6144, 4096), (1024, 4096, 4096), (512, 28672, 4096), (2048, 4096, 14336)])
@pytest.mark.parametrize("num_sms", SHARES)
def test_gemm_llama3_8b_shapes(mnk, num_sms):
  m, n, k = mnk
  keys = jax.random.split(jax.random.PRNGKey(m + n + num_sms), 3)
  a = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
  b = jax.random.normal(keys[1], (k, n), jnp.bfloat16) * 0.02
  c = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
  out = jax.jit(lambda a, b, c: gemm.gemm(a, b, c, num_sms=num_sms))(a, b, c)
  ref = gemm.gemm_reference(a, b, c)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=0.1, rtol=0.02)


@pytest.mark.parametrize("mnk", [(2048, 28672, 4096), (128, 28672, 4096), (1536, 14336, 8192)])
@pytest.mark.parametrize("num_sms", [132, 96, 33])
def test_gemm_silu_mul_gate_up_shapes(mnk, num_sms):
  """The fused gate_up (LLaMA-3-8B at 2048 and 128 rows, LLaMA-2-70B's TP-4 shard) read from a layer of
  a stack, against the unfused reference."""
  m, n, k = mnk
  keys = jax.random.split(jax.random.PRNGKey(m + n + num_sms), 2)
  a = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
  b = jax.random.normal(keys[1], (2, k, n), jnp.bfloat16) * 0.02
  out = jax.jit(lambda a, b: gemm.gemm_silu_mul(a, b, num_sms=num_sms, layer=1))(a, b)
  ref = gemm.gemm_silu_mul_reference(a, b[1])
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=0.05, rtol=0.02)


FP8_CONFIGS = [{}, dict(tile_m=64, tile_n=256, wg_dimension="M"), dict(tile_k=64, max_concurrent_steps=5)]


@pytest.mark.parametrize("mnk", [(2048, 6144, 4096), (512, 4096, 14336), (128, 4096, 4096)])
@pytest.mark.parametrize("num_sms", [132, 33])
@pytest.mark.parametrize("cfg", range(len(FP8_CONFIGS)))
def test_gemm_fp8_llama3_8b_shapes(mnk, num_sms, cfg):
  """Our fp8 GEMM (the default 128 x 256 CTA tiles the interpreter cannot run, and the tuner's others) at the
  8B's qkv, down (with the residual) and a decode-sized o, from a layer of the weight and scale stacks."""
  from pallas_kernels import gemm_fp8
  m, n, k = mnk
  rng = np.random.default_rng(m + n + num_sms + cfg)
  a8 = jnp.asarray(rng.normal(size=(m, k)) * 60, jnp.float32).astype(gemm_fp8.FP8)
  w8 = jnp.asarray(rng.normal(size=(2, n, k)) * 60, jnp.float32).astype(gemm_fp8.FP8)
  a_scale = jnp.asarray(rng.uniform(0.2, 3, size=m) * 1e-3, jnp.float32)
  w_scale = jnp.asarray(rng.uniform(0.2, 3, size=(2, n)) * 1e-4, jnp.float32)
  res = jnp.asarray(rng.normal(size=(m, n)), jnp.bfloat16) if k == 14336 else None
  out = jax.jit(lambda a, w, s, t: gemm_fp8.gemm_fp8(a, w, s, t, res, num_sms=num_sms, config=FP8_CONFIGS[cfg],
                                                      layer=1))(a8, w8, a_scale, w_scale)
  ref = np.asarray(gemm_fp8.gemm_fp8_reference(a8, w8[1], a_scale, w_scale[1], res), np.float32)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=0.02, atol=0.02 * np.abs(ref).max())


@pytest.mark.parametrize("m,layer", [(2048, None), (128, None), (1024, 1)])
@pytest.mark.parametrize("num_sms", [132, 96])
def test_gemm_fp8_silu_mul_gate_up(m, layer, num_sms):
  """gate_up with SiLU-and-multiply; with `layer`, from a layer of the weight and scale stacks, as the engine's
  scanned layers call it (session 30: not run on a GPU before)."""
  from pallas_kernels import gemm_fp8
  rng = np.random.default_rng(m + num_sms)
  k, n = 4096, 28672
  stack = () if layer is None else (2,)
  a8 = jnp.asarray(rng.normal(size=(m, k)) * 60, jnp.float32).astype(gemm_fp8.FP8)
  w8 = jnp.asarray(rng.normal(size=(*stack, n, k)) * 60, jnp.float32).astype(gemm_fp8.FP8)
  a_scale = jnp.asarray(rng.uniform(0.2, 3, size=m) * 1e-3, jnp.float32)
  w_scale = jnp.asarray(rng.uniform(0.2, 3, size=(*stack, n)) * 1e-4, jnp.float32)
  out = jax.jit(lambda a, w, s, t: gemm_fp8.gemm_fp8_silu_mul(a, w, s, t, num_sms=num_sms, layer=layer))(
      a8, w8, a_scale, w_scale)
  w_ref, s_ref = (w8, w_scale) if layer is None else (w8[layer], w_scale[layer])
  ref = np.asarray(gemm_fp8.gemm_fp8_silu_mul_reference(a8, w_ref, a_scale, s_ref), np.float32)
  # elementwise too: the max-relative atol alone would pass a small-valued tile computed wrong
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=0.02, atol=0.02 * np.abs(ref).max())
  assert np.median(np.abs(np.asarray(out, np.float32) - ref) / (np.abs(ref) + 1e-6)) < 0.01


def _mixed_batch(seed, pages=4096, layers=2, sliding_window=None):
  """60 decodes at ragged contexts and one 300-token prefill chunk continuing a 600-token prefix, in
  layer 1 of the cache, with its reference output."""
  rng = np.random.default_rng(seed)
  hkv, g, d, s = 8, 4, 128, 16
  ctx = list(rng.integers(1, 700, size=60)) + [900]
  chunk = [1] * 60 + [300]
  table, slots, positions = page_layout(rng, ctx, chunk, s, pages, (64, 64))
  kc = jax.random.normal(jax.random.PRNGKey(seed + 1), (layers, hkv, pages, s, d), jnp.bfloat16)
  vc = jax.random.normal(jax.random.PRNGKey(seed + 7), (layers, hkv, pages, s, d), jnp.bfloat16)
  q = jax.random.normal(jax.random.PRNGKey(seed + 2), (len(slots), hkv * g, d), jnp.bfloat16)
  ref = paged_attention_reference(q, kc, vc, 1, table, slots, positions, sliding_window)
  return q, kc, vc, table, slots, positions, chunk, ref


@pytest.mark.parametrize("num_sms", SHARES)
def test_paged_attention_mixed_batch(num_sms):
  q, kc, vc, table, slots, positions, chunk, ref = _mixed_batch(num_sms)
  start, length, nb = query_blocks(chunk, len(slots), 16)
  out = paged_attention(q, kc, vc, 1, table, slots, positions, start, length, jnp.int32(nb), num_sms=num_sms)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)


@pytest.mark.parametrize("cfg", [{}, {"num_sms": 132}, {"num_sms": 7}, {"block_kv": 64},
                                 {"block_kv": 64, "max_concurrent_steps": 3, "num_sms": 32}])
def test_prefill_attention_mgpu_mixed_batch(cfg):
  """The warp-specialized paged prefill kernel on the mixed batch (60 one-row chunks and a 300-token chunk
  after a 600-token prefix; partial pages, a block of 44 rows) and on chunks of 1000 and 130 fresh tokens,
  against the reference."""
  from pallas_kernels import prefill_attention_mgpu as pam
  q, kc, vc, table, slots, positions, chunk, ref = _mixed_batch(11)
  start, length, nb = query_blocks(chunk, len(slots), pam.BLOCK_Q)
  out = pam.prefill_attention(q, kc, vc, 1, table, slots, positions, start, length, jnp.int32(nb),
                              max_blocks=pam.max_query_blocks(len(slots), len(chunk)), **cfg)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)
  # As the engine calls it: blocks over the prefill chunk only, into an output holding the decode rows.
  start, length, nb = query_blocks(chunk[60:], len(slots), pam.BLOCK_Q)
  start[:nb] += 60
  marked = jnp.full_like(q, 7)
  out = pam.prefill_attention(q, kc, vc, 1, table, slots, positions, start, length, jnp.int32(nb),
                              max_blocks=pam.max_query_blocks(300, 1), out=marked, **cfg)
  assert float(jnp.max(jnp.abs(out[:60].astype(jnp.float32) - 7))) == 0
  np.testing.assert_allclose(np.asarray(out[60:], np.float32), np.asarray(ref[60:], np.float32), atol=2e-2)
  # The kernel against its jnp statement (rows outside the blocks keep `marked`).
  info = pam.block_info(slots, positions, start, length, nb, nb)
  args = (info, jnp.ones((1,), jnp.int32), jnp.asarray(table), q, kc, vc, marked)
  got = pam._call(*args, **{**pam.CONFIG, **cfg})
  want = pam.blocks_reference(*args)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2)
  rng = np.random.default_rng(5)
  for chunk in ([1000, 130], [512, 136]):   # 1130 rows: staged copies only; 648: tiled copies where aligned
    table, slots, positions = page_layout(rng, chunk, chunk, 16, 4096, (2, 64))
    q = jax.random.normal(jax.random.PRNGKey(9), (len(slots), 32, 128), jnp.bfloat16)
    ref = paged_attention_reference(q, kc, vc, 0, table, slots, positions)
    start, length, nb = query_blocks(chunk, len(slots), pam.BLOCK_Q)
    out = pam.prefill_attention(q, kc, vc, 0, table, slots, positions, start, length, jnp.int32(nb),
                                max_blocks=pam.max_query_blocks(len(slots), len(chunk)), **cfg)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)


def _both_configs(backend, q, kc, vc, table, slots, positions, chunk, num_sms, sliding_window=None,
                  decode_changes=None, prefill_changes=None):
  """Decode blocks then prefill blocks into one output, as the engine calls the kernels; *_changes: to the
  engine's decode and prefill configurations."""
  dec, pre = configs(backend, kc.dtype)
  dec, pre = {**dec, **(decode_changes or {})}, {**pre, **(prefill_changes or {})}
  n = len(slots)
  d_start, d_len, d_nb = query_blocks(chunk[:60], n, dec["block_q"])
  p_start, p_len, p_nb = query_blocks(chunk[60:], n, pre["block_q"])
  p_start[:p_nb] += 60

  @jax.jit
  def run(q, kc, vc):
    out = attention_call(backend, q, kc, vc, 1, table, slots, positions, d_start, d_len, jnp.int32(d_nb),
                         num_sms=num_sms, config=dec, sliding_window=sliding_window)
    return attention_call(backend, q, kc, vc, 1, table, slots, positions, p_start, p_len, jnp.int32(p_nb),
                          num_sms=num_sms, config=pre, sliding_window=sliding_window, out=out)
  return run(q, kc, vc)


needs_triton = pytest.mark.skipif(not paged_attention_triton.available(), reason="jax-triton does not import")


@needs_triton
@pytest.mark.parametrize("num_sms", SHARES)
@pytest.mark.parametrize("window", [None, 200])
def test_triton_attention_mixed_batch(num_sms, window):
  q, kc, vc, table, slots, positions, chunk, ref = _mixed_batch(num_sms + (window or 0), sliding_window=window)
  out = _both_configs("triton", q, kc, vc, table, slots, positions, chunk, num_sms, window)
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-2
  np.testing.assert_allclose(out, ref, atol=3e-2)


@needs_triton
@pytest.mark.parametrize("num_sms", [132, 33])
@pytest.mark.parametrize("kv_dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_triton_attention_swap_ab_decode(num_sms, kv_dtype):
  """The decode variant with keys as the dots' rows (wgmma), bf16 and fp8 caches, a sliding window."""
  q, kc, vc, table, slots, positions, chunk, _ = _mixed_batch(21 + num_sms, sliding_window=200)
  kc, vc = kc.astype(kv_dtype), vc.astype(kv_dtype)
  ref = np.asarray(paged_attention_reference(q, kc, vc, 1, table, slots, positions, 200), np.float32)
  out = np.asarray(_both_configs("triton", q, kc, vc, table, slots, positions, chunk, num_sms, 200,
                                 decode_changes={"swap_ab": True}), np.float32)
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-2
  np.testing.assert_allclose(out, ref, atol=3e-2)


@needs_triton
@pytest.mark.parametrize("num_stages", [3, 4])
def test_triton_attention_pipelined_prefill_and_decode(num_stages):
  """Page ids one block ahead with 3-4 stages (the configurations whose K/V loads Triton pipelines) in both
  the decode and the prefill configuration, a sliding window included."""
  q, kc, vc, table, slots, positions, chunk, ref = _mixed_batch(31 + num_stages, sliding_window=200)
  changes = {"prefetch_pages": True, "num_stages": num_stages}
  out = _both_configs("triton", q, kc, vc, table, slots, positions, chunk, 132, 200,
                      decode_changes={**changes, "programs_per_sm": 1}, prefill_changes=changes)
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-2
  np.testing.assert_allclose(out, ref, atol=3e-2)


@needs_triton
@pytest.mark.parametrize("key_groups,num_warps", [(4, 4), (8, 8)])
@pytest.mark.parametrize("kv_dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_triton_attention_key_groups_decode(key_groups, num_warps, kv_dtype):
  """The decode kernel with a softmax state per key group (_paged_attention_groups_kernel), bf16 and fp8
  caches, a sliding window."""
  q, kc, vc, table, slots, positions, chunk, _ = _mixed_batch(41 + key_groups, sliding_window=200)
  kc, vc = kc.astype(kv_dtype), vc.astype(kv_dtype)
  ref = np.asarray(paged_attention_reference(q, kc, vc, 1, table, slots, positions, 200), np.float32)
  changes = {"key_groups": key_groups, "num_warps": num_warps, "num_stages": 3, "programs_per_sm": 1}
  out = np.asarray(_both_configs("triton", q, kc, vc, table, slots, positions, chunk, 132, 200,
                                 decode_changes=changes), np.float32)
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-2
  np.testing.assert_allclose(out, ref, atol=3e-2)


@needs_triton
@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("programs_per_sm", [2, 4])
def test_triton_attention_fp8_scores_decode(swap_ab, programs_per_sm):
  """dot_fp8 on an fp8 cache: the decode rows against the reference on their e4m3-quantized queries (the same
  math), the prefill rows (the engine's prefill config, unquantized) against the plain reference."""
  q, kc, vc, table, slots, positions, chunk, _ = _mixed_batch(51 + programs_per_sm, sliding_window=200)
  kc, vc = kc.astype(jnp.float8_e4m3fn), vc.astype(jnp.float8_e4m3fn)
  q8, scale = paged_attention_triton.quantize_queries(q)
  q_dq = (q8.astype(jnp.float32) * scale[..., None]).astype(q.dtype)
  n_dec = int(sum(chunk[:60]))
  ref = np.asarray(paged_attention_reference(q, kc, vc, 1, table, slots, positions, 200), np.float32)
  ref_dq = np.asarray(paged_attention_reference(q_dq, kc, vc, 1, table, slots, positions, 200), np.float32)
  out = np.asarray(_both_configs("triton", q, kc, vc, table, slots, positions, chunk, 132, 200,
                                 decode_changes={"dot_fp8": True, "swap_ab": swap_ab,
                                                 "programs_per_sm": programs_per_sm}), np.float32)
  np.testing.assert_allclose(out[:n_dec], ref_dq[:n_dec], atol=3e-2)
  np.testing.assert_allclose(out[n_dec:], ref[n_dec:], atol=3e-2)
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 3e-2


@needs_triton
def test_triton_attention_cache_over_4gib():
  """Page offsets past 2**31 elements (a real cache is ~90 GB): the kernel's 64-bit offsets."""
  pages = 1 << 17     # 2 layers x 8 heads x 131072 pages x 4 KiB = 8.6 GB per K and V
  q, kc, vc, table, slots, positions, chunk, ref = _mixed_batch(5, pages=pages)
  out = _both_configs("triton", q, kc, vc, table, slots, positions, chunk, 132)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=3e-2)


@needs_triton
def test_rope_append_kernel_matches_reference():
  """The fused RoPE + KV-append kernel compiled, against the XLA reference (bf16, LLaMA-3-8B heads, llama3
  frequencies, padding rows)."""
  from nanoflow_jax.config import RopeConfig
  from nanoflow_jax.models.layers import rope_inv_freq
  from pallas_kernels import rope_append_triton as rat
  n, hq, hkv, d, pages = 300, 32, 8, 128, 512
  keys = jax.random.split(jax.random.PRNGKey(3), 5)
  q = jax.random.normal(keys[0], (n, hq, d), jnp.bfloat16)
  k = jax.random.normal(keys[1], (n, hkv, d), jnp.bfloat16)
  v = jax.random.normal(keys[2], (n, hkv, d), jnp.bfloat16)
  pos = jax.random.randint(keys[3], (n,), 0, 8000)
  slot = np.random.default_rng(0).permutation(pages * 16)[:n]
  page, off = np.asarray(slot // 16, np.int32), np.asarray(slot % 16, np.int32)
  page[::7] = pages                                            # padding rows
  inv = rope_inv_freq(RopeConfig(theta=500000.0, type="llama3", factor=8.0), d)
  kc = jax.random.normal(keys[4], (2, hkv, pages, 16, d), jnp.bfloat16)
  vc = -kc
  ref = rat.rope_append_reference(q, k, v, pos, inv, kc, vc, 1, jnp.asarray(page), jnp.asarray(off))
  out = jax.jit(lambda kc, vc: rat.rope_append(q, k, v, pos, inv, kc, vc, 1, page, off, num_sms=64))(kc, vc)
  for a, b in zip(out, ref):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=2e-2)


@needs_triton
def test_rms_norm_residual_kernel_matches_reference():
  from pallas_kernels import rms_norm_triton as rnt
  keys = jax.random.split(jax.random.PRNGKey(5), 3)
  x, r = (jax.random.normal(k, (1000, 4096), jnp.bfloat16) for k in keys[:2])
  scale = jax.random.normal(keys[2], (4096,), jnp.bfloat16)
  ref = rnt.rms_norm_residual_reference(x, r, scale, 1e-5)
  out = jax.jit(lambda x, r: rnt.rms_norm_residual(x, r, scale, 1e-5, num_sms=96))(x, r)
  for a, b in zip(out, ref):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=5e-2, rtol=2e-2)


@needs_triton
@pytest.mark.parametrize("m,num_sms", [(2048, 132), (1000, 96), (1, 132)])
def test_silu_mul_quant_kernel_matches_reference(m, num_sms):
  """The fp8 MLP's middle at the 8B shape (I = 14336), bf16: the row scales to float32 rounding and the e4m3
  values to one e4m3 step where an input rounds differently (silu's exp), against the unfused ops."""
  from pallas_kernels import silu_mul_quant_triton as smq
  keys = jax.random.split(jax.random.PRNGKey(m), 3)
  acc = (jax.random.normal(keys[0], (m, 2 * 14336), jnp.float32) * 300).astype(jnp.bfloat16)
  a_scale = jax.random.uniform(keys[1], (m, 1), jnp.float32, 0.002, 0.02)
  w_scale = jax.random.uniform(keys[2], (2 * 14336,), jnp.float32, 1e-4, 1e-3)
  ref8, ref_s = jax.jit(lambda *a: smq.silu_mul_quant_reference(*a, jnp.bfloat16))(acc, a_scale, w_scale)
  q8, s = jax.jit(lambda *a: smq.silu_mul_quant(*a, jnp.bfloat16, num_sms=num_sms))(acc, a_scale, w_scale)
  # XLA drops the reference's f32 -> bf16 -> f32 round trips inside a fusion (excess precision), the kernel
  # keeps them: the scales agree to bf16's step, the e4m3 values to one e4m3 step
  np.testing.assert_allclose(np.asarray(s), np.asarray(ref_s), rtol=8e-3)
  q, r = np.asarray(q8.astype(jnp.float32)), np.asarray(ref8.astype(jnp.float32))
  np.testing.assert_allclose(q, r, rtol=0.13, atol=2 ** -8)
  assert np.mean(q == r) > 0.9, np.mean(q == r)
  assert np.abs(r).max() == 448.0


@needs_triton
@pytest.mark.parametrize("m", [1, 7, 16])
@pytest.mark.parametrize("kind", ["qkv", "o", "gate_up", "down"])
def test_small_gemm_fp8_kernel_matches_reference(kind, m):
  """The small-step fp8 GEMM (norm, per-token e4m3, the GEMM, the scales, residual or SiLU-and-multiply) at the
  8B's shapes against the engine's ops under XLA: an input rounding differently near an e4m3 step moves a row by
  that step's share, so the whole to ~1% and most outputs closer."""
  from pallas_kernels import small_gemm_fp8_triton as sg
  _small_gemm_case(sg, kind, m)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("kind", ["qkv", "o", "gate_up", "down"])
def test_small_gemm_fp8_pallas_kernel_matches_reference(kind, m):
  """The same op as the Pallas kernel the engine runs with --small_gemm (XLA compiles it: it stays in the
  step's command buffer), the same bounds."""
  from pallas_kernels import small_gemm_fp8 as sg
  _small_gemm_case(sg, kind, m)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("kind", ["qkv", "o", "gate_up", "down"])
def test_small_gemm_bf16_pallas_kernel_matches_reference(kind, m):
  """--small_gemm with bf16 weights: the Pallas kernel (norm, GEMM, residual or SiLU-and-multiply) at the 8B's
  shapes against the engine's ops under XLA (which may keep the norm in f32 across its bf16 cast: a bf16 step
  apart at most, so the whole to 1%)."""
  from pallas_kernels import small_gemm as sg
  k, n = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 2 * 14336), "down": (14336, 4096)}[kind]
  keys = jax.random.split(jax.random.PRNGKey(m + 100), 4)
  x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
  w = (0.02 * jax.random.normal(keys[1], (k, n), jnp.float32)).astype(jnp.bfloat16)
  kw = {"qkv": dict(norm_scale=(1 + 0.1 * jax.random.normal(keys[2], (k,))).astype(jnp.bfloat16)),
        "o": dict(residual=jax.random.normal(keys[3], (m, n), jnp.bfloat16)),
        "gate_up": dict(norm_scale=(1 + 0.1 * jax.random.normal(keys[2], (k,))).astype(jnp.bfloat16), silu_mul=True),
        "down": dict(residual=jax.random.normal(keys[3], (m, n), jnp.bfloat16))}[kind]
  want = np.asarray(jax.jit(lambda x: sg.small_gemm_reference(x, w, **kw))(x), np.float32)
  got = np.asarray(jax.jit(lambda x: sg.small_gemm(x, w, **kw))(x), np.float32)
  assert got.shape == want.shape
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


def _small_gemm_case(sg, kind, m):
  from nanoflow_jax import quantization
  k, n = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 2 * 14336), "down": (14336, 4096)}[kind]
  keys = jax.random.split(jax.random.PRNGKey(m), 4)
  x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
  w8, ws = quantization.quantize_weight(0.02 * jax.random.normal(keys[1], (k, n), jnp.float32), 1)
  kw = {"qkv": dict(norm_scale=(1 + 0.1 * jax.random.normal(keys[2], (k,))).astype(jnp.bfloat16)),
        "o": dict(residual=jax.random.normal(keys[3], (m, n), jnp.bfloat16)),
        "gate_up": dict(norm_scale=(1 + 0.1 * jax.random.normal(keys[2], (k,))).astype(jnp.bfloat16), silu_mul=True),
        "down": dict(residual=jax.random.normal(keys[3], (m, n), jnp.bfloat16))}[kind]
  want = np.asarray(jax.jit(lambda x: sg.small_gemm_fp8_reference(x, w8, ws.reshape(-1), **kw))(x), np.float32)
  got = np.asarray(jax.jit(lambda x: sg.small_gemm_fp8(x, w8, ws.reshape(-1), **kw))(x), np.float32)
  assert got.shape == want.shape
  # The norm's bf16 casts are kept by the kernel and may be dropped by XLA in the reference's fusion (excess
  # precision): a normed input a bf16 step apart flips its e4m3 rounding. On the CPU that put the two 1.2-2.6%
  # apart, and 0 with --xla_allow_excess_precision=false (tests/test_small_gemm_fp8.py).
  bound = 3e-2 if "norm_scale" in kw else 1e-2
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < bound
  assert np.mean(np.isclose(got, want, rtol=2e-2, atol=1e-3)) > (0.9 if "norm_scale" in kw else 0.95)


@needs_triton
@pytest.mark.parametrize("m,num_sms", [(2048, 132), (1000, 96), (1, 132)])
def test_rms_norm_quant_kernel_matches_reference(m, num_sms):
  """RMSNorm + per-token e4m3 at the 8B's hidden size, bf16, against the unfused ops (tolerances as the MLP
  middle's: XLA's excess precision inside the reference's fusion)."""
  from pallas_kernels import rms_norm_quant_triton as rnq
  keys = jax.random.split(jax.random.PRNGKey(m + 1), 2)
  x = (jax.random.normal(keys[0], (m, 4096), jnp.float32) * 3).astype(jnp.bfloat16)
  w = (1 + 0.1 * jax.random.normal(keys[1], (4096,), jnp.float32)).astype(jnp.bfloat16)
  ref8, ref_s = jax.jit(lambda x: rnq.rms_norm_quant_reference(x, w, 1e-5))(x)
  q8, s = jax.jit(lambda x: rnq.rms_norm_quant(x, w, 1e-5, num_sms=num_sms))(x)
  np.testing.assert_allclose(np.asarray(s), np.asarray(ref_s), rtol=8e-3)
  q, r = np.asarray(q8.astype(jnp.float32)), np.asarray(ref8.astype(jnp.float32))
  np.testing.assert_allclose(q, r, rtol=0.13, atol=2 ** -8)
  assert np.mean(q == r) > 0.9, np.mean(q == r)


@needs_triton
@pytest.mark.parametrize("key_splits", [4, 16])
def test_triton_attention_fp8_cache_with_key_splits(key_splits):
  """split_decode_keys: the fp8 cache's decode configuration with its keys split (the mixed batch's decode
  call merged, then the prefill call into the same output) against the reference."""
  q, kc, vc, table, slots, positions, chunk, _ = _mixed_batch(13)
  kc, vc = kc.astype(jnp.float8_e4m3fn), vc.astype(jnp.float8_e4m3fn)
  ref = paged_attention_reference(q, kc, vc, 1, table, slots, positions)
  out = _both_configs("triton", q, kc, vc, table, slots, positions, chunk, 132,
                      decode_changes={"key_splits": key_splits})
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=3e-2)


@pytest.mark.parametrize("key_splits", [2, 8])
@pytest.mark.parametrize("kv_dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_pallas_attention_with_key_splits(key_splits, kv_dtype):
  """small_step_attention + split_decode_keys: the Pallas kernel's decode call with its keys split and merged,
  then the prefill call into the same output, compiled by XLA (issue 27's one-graph small step)."""
  q, kc, vc, table, slots, positions, chunk, _ = _mixed_batch(17)
  kc, vc = kc.astype(kv_dtype), vc.astype(kv_dtype)
  ref = paged_attention_reference(q, kc, vc, 1, table, slots, positions)
  out = _both_configs("pallas", q, kc, vc, table, slots, positions, chunk, 132,
                      decode_changes={"key_splits": key_splits})
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=3e-2)


@needs_triton
@pytest.mark.parametrize("changes", [{"dynamic_work": True}, {"dynamic_work": True, "heavy_first": True},
                                     {"dynamic_work": True, "key_splits": 3}])
def test_triton_attention_fp8_cache_with_dynamic_work(changes):
  """dynamic_work (work items from an atomic counter, zeroed per call) in both calls of the mixed batch, twice in
  one program (the second call's counter must start at zero again), against the reference."""
  q, kc, vc, table, slots, positions, chunk, _ = _mixed_batch(17)
  kc, vc = kc.astype(jnp.float8_e4m3fn), vc.astype(jnp.float8_e4m3fn)
  ref = paged_attention_reference(q, kc, vc, 1, table, slots, positions)
  for _ in range(2):
    out = _both_configs("triton", q, kc, vc, table, slots, positions, chunk, 132, decode_changes=changes,
                        prefill_changes=changes)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=3e-2)


@needs_triton
def test_triton_attention_fp8_cache():
  """An fp8 (e4m3) cache read by the Triton kernel (K/V tiles upcast to bf16) against the reference."""
  q, kc, vc, table, slots, positions, chunk, _ = _mixed_batch(11)
  kc, vc = kc.astype(jnp.float8_e4m3fn), vc.astype(jnp.float8_e4m3fn)
  ref = paged_attention_reference(q, kc, vc, 1, table, slots, positions)
  out = _both_configs("triton", q, kc, vc, table, slots, positions, chunk, 132)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=3e-2)


@pytest.mark.parametrize("epilogue", [None, "silu_mul"])
@pytest.mark.parametrize("num_sms", [132, 64, 32])
def test_grouped_gemm_mixtral_experts(epilogue, num_sms):
  """Mixtral-8x7B's expert GEMMs for 1024 routed rows, uneven over 8 experts (one empty), 37 rows past them."""
  sizes = np.array([300, 0, 17, 129, 64, 200, 1, 276], np.int32)
  k, n = (4096, 2 * 14336) if epilogue else (14336, 4096)
  keys = jax.random.split(jax.random.PRNGKey(num_sms), 2)
  lhs = jax.random.normal(keys[0], (int(sizes.sum()) + 37, k), jnp.bfloat16)
  rhs = jax.random.normal(keys[1], (8, k, n), jnp.bfloat16) * 0.02
  out = jax.jit(lambda a, b, g: grouped_gemm.grouped_gemm(a, b, g, num_sms=num_sms, epilogue=epilogue))(
      lhs, rhs, jnp.asarray(sizes))
  ref = grouped_gemm.grouped_gemm_reference(lhs, rhs, jnp.asarray(sizes), epilogue)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=0.1, rtol=0.02)


def test_this_hopper_keeps_the_mosaic_kernels():
  """The generation check (pallas_kernels/hardware.py) reads the device's compute capability on the GPU
  machine and leaves the Mosaic GPU kernels on: a misread would silently cost the H200 its GEMM."""
  from pallas_kernels import hardware
  assert hardware.compute_capability() is not None and hardware.compute_capability()[0] == 9
  assert hardware.mosaic_kernel_choices("mosaic_fused", True, True) == ("mosaic_fused", True, None)
