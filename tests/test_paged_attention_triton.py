"""The Triton paged-attention kernel, run in Triton's interpreter on the CPU, against the jnp reference:
ragged lengths, partial pages, chunked prefill continuing from cached pages, GQA, sliding windows,
masked and unmasked key blocks, every SM-share path (fewer programs than work items and more)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_utils import paged_batch
from pallas_kernels import paged_attention_triton as pat
from pallas_kernels.paged_attention import paged_attention_reference, query_blocks

pytest.importorskip("triton")


def _check(rng, *, num_sms, block_q, window=None, block_n=16, hkv=2, g=2, d=16, ctx=(5, 17, 1, 40), chunk=(1, 6, 1, 33),
           tol=(2e-5, 1e-5), page_size=4, **kw):
  q, (kc, vc, layer), table, slots, positions, lengths, _ = paged_batch(rng, hkv=hkv, g=g, d=d, page_size=page_size,
                                                                          ctx=ctx, chunk=chunk)
  ref = paged_attention_reference(q, kc, vc, layer, table, slots, positions, window)
  start, length, nb = query_blocks(lengths, len(slots), block_q)
  out = pat.interpret_call(q, kc, vc, layer, table, slots, positions, start, length, nb, num_sms=num_sms,
                           block_q=block_q, block_n=block_n, sliding_window=window, **kw)
  np.testing.assert_allclose(out, np.asarray(ref), atol=tol[0], rtol=tol[1])   # float32 in the interpreter
  return out, np.asarray(ref)


@pytest.mark.parametrize("num_sms", [1, 5])
@pytest.mark.parametrize("block_q", [1, 8])
@pytest.mark.parametrize("window", [None, 6])
def test_triton_kernel_matches_reference(num_sms, block_q, window):
  _check(np.random.default_rng(), num_sms=num_sms, block_q=block_q, window=window)


@pytest.mark.parametrize("page_size,block_n", [(16, 16), (16, 32), (32, 32)])
def test_triton_kernel_with_large_pages(page_size, block_n):
  """Pages as large as a key block (one page id per block) or half of it: the layouts an fp8 cache's larger
  pages give (kernel_bench --attention_page_size)."""
  _check(np.random.default_rng(), num_sms=3, block_q=4, block_n=block_n, page_size=page_size,
         ctx=(5, 70, 1, 40), chunk=(1, 6, 1, 33))


def test_triton_kernel_gqa_wide_group_and_blocks_of_many_pages():
  """8 query heads per KV head (rows = block_q x 8), key blocks of 8 pages, two programs per SM."""
  _check(np.random.default_rng(), num_sms=2, block_q=4, hkv=1, g=8, d=32, block_n=32, programs_per_sm=2,
         heavy_first=True, ctx=(70, 3), chunk=(20, 3))


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("block_n", [4, 16])
@pytest.mark.parametrize("block_q", [1, 8])
def test_triton_kernel_with_page_ids_loaded_ahead(window, block_n, block_q):
  """prefetch_pages: each iteration loads the next key block's page ids; one-page blocks (block_n 4) make
  every iteration cross a page, and contexts of one block test the loop that never runs its prefetch;
  block_q 8: prefill chunks (the candidate prefill configuration, perf-notes session 8)."""
  _check(np.random.default_rng(), num_sms=3, block_q=block_q, window=window, block_n=block_n, prefetch_pages=True,
         num_stages=4, ctx=(5, 17, 1, 40, 16), chunk=(1, 6, 1, 33, 1))


@pytest.mark.parametrize("block_q", [1, 8])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("prefetch_pages", [False, True])
def test_triton_kernel_with_keys_as_the_dots_rows(block_q, window, prefetch_pages):
  """swap_ab: the dots as K q^T and V^T P and the output stored transposed; chunked prefill blocks (block_q
  8: several query tokens per column set), masked blocks and windows take the transposed masks."""
  _check(np.random.default_rng(), num_sms=3, block_q=block_q, window=window, swap_ab=True,
         prefetch_pages=prefetch_pages)


@pytest.mark.parametrize("block_q", [1, 8])
@pytest.mark.parametrize("swap_ab", [False, True])
def test_triton_kernel_with_one_masked_key_loop(block_q, swap_ab):
  """mask_all: every key block through the masked loop (prefill chunks included, where the mask matters in
  all but the first blocks)."""
  _check(np.random.default_rng(), num_sms=3, block_q=block_q, mask_all=True, swap_ab=swap_ab)


@pytest.mark.parametrize("block_q", [1, 8])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("key_groups", [2, 4])
def test_triton_kernel_with_key_groups(block_q, window, key_groups):
  """key_groups: each key block's groups keep their own softmax states, merged at the end of the work item;
  contexts shorter than one group leave whole groups empty (their weight must be 0), masked blocks and
  windows cut groups part-way."""
  _check(np.random.default_rng(), num_sms=3, block_q=block_q, window=window, block_n=64, key_groups=key_groups,
         ctx=(5, 17, 1, 140, 64), chunk=(1, 6, 1, 33, 1))


def test_key_groups_are_refused_with_swap_ab_or_groups_under_16_keys():
  with pytest.raises(ValueError, match="choose one"):
    pat._constants((4, 4, 16), (1, 2, 8, 4, 16), (2, 4), num_sms=1, block_q=1, block_n=64, sliding_window=None,
                   num_stages=2, programs_per_sm=1, swap_ab=True, key_groups=2)
  with pytest.raises(ValueError, match=">= 16 keys"):
    pat._constants((4, 4, 16), (1, 2, 8, 4, 16), (2, 4), num_sms=1, block_q=1, block_n=64, sliding_window=None,
                   num_stages=2, programs_per_sm=1, key_groups=8)


def test_triton_kernel_with_keys_as_rows_f16_dots_and_wide_groups():
  """swap_ab with f16 dots (the fp8 cache's configuration) and 8 query heads per KV head."""
  _check(np.random.default_rng(), num_sms=2, block_q=1, hkv=1, g=8, d=32, block_n=32, swap_ab=True, dot_f16=True,
         ctx=(70, 3), chunk=(1, 1), tol=(3e-3, 3e-3))


@pytest.mark.parametrize("block_q", [1, 8])
def test_triton_kernel_with_f16_dots(block_q):
  """dot_f16 (the candidate for fp8 caches): the dots in f16, within f16 rounding of the reference."""
  _check(np.random.default_rng(), num_sms=3, block_q=block_q, window=None, dot_f16=True, tol=(3e-3, 3e-3))


@pytest.mark.parametrize("block_q", [1, 8])
@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("window", [None, 6])
def test_triton_kernel_with_fp8_scores(block_q, swap_ab, window):
  """dot_fp8 (for fp8 caches): the queries quantized per (token, head) row to e4m3, the scores' dot on e4m3
  operands and the row's scale applied after it. Against the reference on the dequantized queries (the
  same math: within the f16 rounding of V and P); against the unquantized queries the difference is
  e4m3's, which must be visible (else the queries were never quantized)."""
  rng = np.random.default_rng()
  q, (kc, vc, layer), table, slots, positions, lengths, _ = paged_batch(rng, hkv=2, g=4, d=32, page_size=4,
                                                                          ctx=(5, 17, 1, 40), chunk=(1, 6, 1, 33))
  kc, vc = (c.astype(jnp.float8_e4m3fn).astype(jnp.float32) for c in (kc, vc))   # an fp8 cache's values
  q8, scale = pat.quantize_queries(q)
  assert q8.dtype == jnp.float8_e4m3fn and scale.shape == q.shape[:2]
  q_dq = q8.astype(jnp.float32) * scale[..., None]
  start, length, nb = query_blocks(lengths, len(slots), block_q)
  out = pat.interpret_call(q, kc, vc, layer, table, slots, positions, start, length, nb, num_sms=3,
                           block_q=block_q, block_n=16, sliding_window=window, swap_ab=swap_ab, dot_fp8=True)
  ref = np.asarray(paged_attention_reference(q_dq, kc, vc, layer, table, slots, positions, window))
  np.testing.assert_allclose(out, ref, atol=3e-3, rtol=3e-3)
  exact = np.asarray(paged_attention_reference(q, kc, vc, layer, table, slots, positions, window))
  assert np.abs(out - exact).max() > 1e-2


def test_fp8_scores_are_refused_with_key_groups():
  with pytest.raises(ValueError, match="dot_fp8"):
    pat._constants((4, 4, 16), (1, 2, 8, 4, 16), (2, 4), num_sms=1, block_q=1, block_n=64, sliding_window=None,
                   num_stages=2, programs_per_sm=1, key_groups=2, dot_fp8=True)


def test_triton_kernel_output_is_not_constant():
  """Guards the comparison itself: different queries give different outputs."""
  out, ref = _check(np.random.default_rng(1), num_sms=3, block_q=1)
  assert np.std(out) > 0.1 and np.abs(out - ref).max() < 2e-5


def test_block_n_must_cover_whole_pages():
  with pytest.raises(ValueError, match="multiple of the page size"):
    pat._constants((4, 4, 16), (1, 2, 8, 4, 16), (2, 4), num_sms=1, block_q=1, block_n=6, sliding_window=None,
                   num_stages=2, programs_per_sm=1)


def test_configs_pick_f16_dots_for_fp8_caches():
  """The engine's fp8 cache gets the f16-dot decode and prefill configurations; bf16 caches keep theirs."""
  from pallas_kernels import paged_attention as pa
  from pallas_kernels import paged_attention_triton as pat
  assert pa.configs("triton", jnp.float8_e4m3fn) == (pat.DECODE_CONFIG_FP8, pat.PREFILL_CONFIG_FP8)
  assert pat.PREFILL_CONFIG_FP8["dot_f16"] and pat.PREFILL_CONFIG_FP8["block_q"] > 1
  assert pa.configs("triton", jnp.bfloat16)[0] == pat.DECODE_CONFIG
  assert pa.configs("triton")[0] == pat.DECODE_CONFIG
  assert "dot_f16" not in pa.configs("pallas", jnp.float8_e4m3fn)[0]


def test_configs_take_pages_larger_than_their_key_blocks():
  """A page larger than a configuration's key block grows the block to the page (vLLM's block sizes go to 128);
  smaller pages leave it; a page size the power-of-two tiles cannot hold is refused by name."""
  from pallas_kernels import paged_attention as pa
  from pallas_kernels import paged_attention_triton as pat
  decode, prefill = pa.configs("triton", jnp.float8_e4m3fn, head_dim=128, page_size=128)
  assert decode == {**pat.DECODE_CONFIG_FP8, "block_n": 128} and prefill == {**pat.PREFILL_CONFIG_FP8, "block_n": 128}
  assert pa.configs("triton", jnp.float8_e4m3fn, head_dim=128, page_size=32) == (pat.DECODE_CONFIG_FP8,
                                                                                  pat.PREFILL_CONFIG_FP8)
  assert pa.configs("triton", jnp.bfloat16, head_dim=128, page_size=256)[0]["block_n"] == 256
  with pytest.raises(ValueError, match="power-of-two size, got 24"):
    pa.configs("triton", jnp.float8_e4m3fn, head_dim=128, page_size=24)


def test_configs_pick_the_mosaic_prefill_kernel_where_it_takes_the_cache():
  from pallas_kernels import paged_attention as pa
  from pallas_kernels import paged_attention_triton as pat
  mosaic = pa.MOSAIC_PREFILL_CONFIG
  assert pa.configs("triton", jnp.bfloat16, head_dim=128, page_size=16)[1] == mosaic
  assert pa.configs("triton", jnp.float8_e4m3fn, head_dim=128, page_size=16)[1] == pat.PREFILL_CONFIG_FP8
  for kv, kw in ((jnp.bfloat16, {"sliding_window": 4096}),        # (fp8: wgmma takes no e4m3 beside bf16)        # the kernel has no window
                 (jnp.bfloat16, {"head_dim": 96}),                # not a multiple of 64
                 (jnp.bfloat16, {"page_size": 4}),                # TMA copies of whole 8-row tiles
                 (jnp.float16, {"q_dtype": jnp.bfloat16}),        # queries of another type
                 (None, {})):
    kw = {"head_dim": 128, "page_size": 16, **kw}
    assert pa.configs("triton", kv, **kw)[1] == pat.PREFILL_CONFIG, (kv, kw)
  assert pa.configs("pallas", jnp.bfloat16, head_dim=128, page_size=16)[1] == pa.PREFILL_CONFIG


def test_attention_call_runs_the_mosaic_prefill_kernel(monkeypatch):
  """The configuration routes attention_call to prefill_attention_mgpu (its kernel replaced by its jnp
  statement here; the GPU test runs it), with 128-row blocks into the decode rows' output."""
  from kernel_utils import page_layout
  from pallas_kernels import paged_attention as pa
  from pallas_kernels import prefill_attention_mgpu as pam
  calls = []
  monkeypatch.setattr(pam, "_call", lambda *a, **kw: calls.append(kw) or pam.blocks_reference(*a, **kw))
  rng = np.random.default_rng()
  ctx, chunk = (9, 40, 300), (1, 1, 200)
  table, slots, positions = page_layout(rng, ctx, chunk, 16, 64, (3, 24))
  key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
  kc, vc = (jax.random.normal(jax.random.fold_in(key, i), (1, 2, 64, 16, 64), jnp.bfloat16) for i in (0, 1))
  q = jax.random.normal(key, (len(slots), 4, 64), jnp.bfloat16)
  start, length, nb = pa.query_blocks([200], len(slots), pa.MOSAIC_PREFILL_CONFIG["block_q"])
  start[:nb] += 2
  marked = jnp.full_like(q, 3)
  out = jax.jit(lambda q: pa.attention_call("triton", q, kc, vc, 0, table, slots, positions, start, length,
                                            np.array([nb], np.int32), num_sms=5, config=pa.MOSAIC_PREFILL_CONFIG,
                                            out=marked))(q)
  ref = pa.paged_attention_reference(q, kc, vc, 0, table, slots, positions)
  assert calls and calls[0]["num_sms"] == 5 and calls[0]["block_kv"] == 128
  assert float(jnp.max(jnp.abs(out[:2].astype(jnp.float32) - 3))) == 0
  np.testing.assert_allclose(np.asarray(out[2:], np.float32), np.asarray(ref[2:], np.float32), atol=2e-2)


@pytest.mark.parametrize("key_splits", [2, 5])
@pytest.mark.parametrize("block_q", [1, 8])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("swap_ab", [False, True])
def test_triton_kernel_with_key_splits(key_splits, block_q, window, swap_ab):
  """key_splits (flash-decoding): each work item's key blocks shared out over programs and merged after;
  five splits of at most three blocks leave splits empty (weight 0), windows and masked blocks cut them."""
  _check(np.random.default_rng(), num_sms=3, block_q=block_q, window=window, swap_ab=swap_ab,
         key_splits=key_splits)


@pytest.mark.parametrize("block_q,key_splits,heavy_first", [(8, 1, False), (8, 1, True), (1, 1, False),
                                                           (8, 3, True), (1, 2, False)])
def test_triton_kernel_with_dynamic_work(block_q, key_splits, heavy_first):
  """dynamic_work: programs take work units from a counter as they finish (prefill blocks of causal lengths,
  decode rows, key splits); every unit is run once: the output equals the reference (a unit run twice or
  skipped would show: splits' partials start as NaN)."""
  _check(np.random.default_rng(), num_sms=2, block_q=block_q, block_n=16, key_splits=key_splits,
         heavy_first=heavy_first, dynamic_work=True)


def test_dynamic_work_is_not_written_for_key_groups():
  with pytest.raises(ValueError, match="dynamic_work is not written for key_groups"):
    pat._constants((4, 4, 16), (1, 2, 8, 4, 16), (2, 4), num_sms=1, block_q=1, block_n=16, sliding_window=None,
                   num_stages=2, programs_per_sm=1, key_groups=2, dynamic_work=True)


def test_key_splits_merge_only_the_rows_of_the_blocks_run():
  """With fewer query blocks run than exist (the decode call of a mixed step covers only the decode rows),
  the merged rows are the reference's and every other row keeps what `out` held; bad counts are refused."""
  rng = np.random.default_rng()
  q, (kc, vc, layer), table, slots, positions, lengths, _ = paged_batch(rng, hkv=2, g=2, d=16, page_size=4,
                                                                          ctx=(5, 17, 1, 40), chunk=(1, 6, 1, 33))
  ref = np.asarray(paged_attention_reference(q, kc, vc, layer, table, slots, positions, None))
  start, length, nb = query_blocks(lengths, len(slots), 1)
  run = int(np.asarray(nb).reshape(-1)[0]) - 20
  out = pat.interpret_call(q, kc, vc, layer, table, slots, positions, start, length, np.int32(run), num_sms=3,
                           block_q=1, block_n=16, key_splits=3)
  rows = np.asarray(start)[:run]
  np.testing.assert_allclose(out[rows], ref[rows], atol=2e-5, rtol=1e-5)
  others = np.setdiff1d(np.arange(len(q)), rows)
  assert len(others) == 20 and np.all(out[others] == 0)
  with pytest.raises(ValueError, match="key_splits"):
    pat.interpret_call(q, kc, vc, layer, table, slots, positions, start, length, nb, num_sms=3, block_q=1,
                       block_n=16, key_splits=0)
  with pytest.raises(ValueError, match="key_splits"):
    pat.interpret_call(q, kc, vc, layer, table, slots, positions, start, length, nb, num_sms=3, block_q=1,
                       block_n=64, key_groups=2, key_splits=2)


def test_kernel_constants_follow_the_token_count_only_with_splits():
  """Without key_splits the kernel's compile-time constants are the same for every step size (one Triton
  compile for all buckets); with them the partials' row count is one."""
  consts = lambda t, ks: pat._constants((t, 4, 16), (1, 2, 8, 4, 16), (2, 4), num_sms=1, block_q=1, block_n=16,
                                        sliding_window=None, num_stages=2, programs_per_sm=1, key_splits=ks)[1]
  assert consts(16, 1) == consts(512, 1)
  assert consts(16, 4)["ROWS"] == 64 and consts(512, 4)["ROWS"] == 2048


def test_key_splits_for_fills_the_decode_programs():
  assert pat.key_splits_for(1, 8, 2112) == 32          # capped
  assert pat.key_splits_for(16, 8, 2112) == 16         # a batch-1 step's bucket of 16 tokens
  assert pat.key_splits_for(512, 8, 2112) == 1         # a large step: no split
  assert pat.key_splits_for(0, 8, 2112, max_splits=4) == 4


def test_engine_splits_small_decode_steps_keys(monkeypatch):
  """split_decode_keys: on the Triton backend each step's decode call gets key_splits for its bucket (the
  prefill call none), and the outputs are those without (the kernel is replaced by the reference here; the
  tests above check the kernel's splits against it). Off, no call gets key_splits."""
  from nanoflow_jax.engine import Engine, EngineConfig
  from nanoflow_jax.model import load_model
  from nanoflow_jax.runtime import executor as executor_module
  from nanoflow_jax.sampling_params import SamplingParams
  model = load_model("tiny", dtype="float32", random_weights=True)
  seen = []

  def recording(backend, q, k_cache, v_cache, layer, page_table, slots, positions, *blocks, config, out=None, **kw):
    seen.append((q.shape[0], config.get("block_q"), config.get("key_splits")))
    return paged_attention_reference(q, k_cache, v_cache, layer, page_table, slots, positions, None)
  monkeypatch.setattr(executor_module, "attention_call", recording)
  outs = {}
  for split in (False, True):
    seen.clear()
    engine = Engine(model, EngineConfig(dense_batch=64, page_size=16, num_pages=64, max_num_seqs=2,
                                        kernels="interpret", split_decode_keys=split, compilation_cache_dir=None))
    ex = engine.executor
    ex.attention_backend, ex.split_decode_keys = "triton", split   # as on a GPU (the CPU runs the Pallas path)
    ex.attention_configs = (pat.DECODE_CONFIG_FP8, pat.PREFILL_CONFIG_FP8)
    engine.add_request("r", list(range(40, 60)), SamplingParams(max_tokens=4, temperature=0))
    engine.run_until_done()
    outs[split] = engine.pop_output("r").outputs[0].token_ids
    decode_calls = {(t, ks) for t, bq, ks in seen if bq == 1}
    assert decode_calls
    if not split:
      assert all(ks is None for _, _, ks in seen)
    else:
      heads = model.config.num_kv_heads
      assert decode_calls == {(t, pat.key_splits_for(t, heads, ex.num_sms * 16)) for t, _ in decode_calls}
      assert all(ks is None for _, bq, ks in seen if bq != 1)
  assert outs[True] == outs[False]


def test_merge_splits_under_jax_matches_numpy_with_no_nested_jit():
  """The engine's merge (jax.numpy, inside the attention's stream-annotated computation: no nested jit, which
  fails there on the GPU) gives the interpreter path's (numpy) result, and keeps the rows no block covers."""
  rng = np.random.default_rng()
  t, hq, d, splits = 8, 4, 16, 3
  part = rng.normal(size=splits * t * hq * d).astype(np.float32)
  ml = np.stack([rng.normal(size=(splits, t, hq)) * 4, rng.uniform(0.5, 2, size=(splits, t, hq))], -1)
  ml = ml.astype(np.float32).reshape(-1)
  out = rng.normal(size=(t, hq, d)).astype(np.float32)
  start, length, nb = np.arange(t, dtype=np.int32), np.ones(t, np.int32), np.int32(5)
  f = lambda *a: pat.merge_splits(*a, splits, 1)
  jaxpr = jax.make_jaxpr(f)(out, part, ml, start, length, nb)
  assert not [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("pjit", "jit")]
  got = np.asarray(jax.jit(f)(out, part, ml, start, length, nb))
  want = pat.merge_splits(out, part, ml, start, length, nb, splits, 1, xp=np)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[5:], out[5:])
