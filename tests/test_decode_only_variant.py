"""Decode-only steps of small buckets run a variant compiled without the prefill attention call (on the GPU that
call is one host launch a layer with no work, and it splits XLA's command buffers: lab/gpu_aot.py). The tokens
and log-probabilities are those of the two-call step; a step with a prefill chunk keeps both calls; warm-up
compiles the variants without running them."""
import numpy as np
import pytest

from nanoflow_jax.engine import Engine, EngineConfig, _attention_blocks
from nanoflow_jax.model import load_model
from nanoflow_jax.runtime import executor as executor_mod
from nanoflow_jax.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True, detokenize=False)
REAL_CALL, REAL_COMPILED_FOR = executor_mod.attention_call, executor_mod.Executor._compiled_for


@pytest.fixture(scope="module")
def model():
  return load_model("tiny", dtype="float32", random_weights=True)


def _run(model, monkeypatch, up_to):
  """Three greedy requests through the interpret kernels: a and b prefill, then decode alone, then c's prompt joins
  their decodes. Returns the outputs and, per compiled step, the attention calls its trace made."""
  monkeypatch.setattr(executor_mod, "DECODE_ONLY_UP_TO", up_to)
  traced = {}   # step key -> {"decode", "prefill"}: the calls made while it was traced
  tracing = []
  real_call, real_compile = REAL_CALL, REAL_COMPILED_FOR   # (not the last run's wrappers)

  def compiled_for(self, key, inp):
    tracing.append(key)
    try:
      return real_compile(self, key, inp)
    finally:
      tracing.pop()

  def recording(backend, q, *a, config, **kw):
    decode = engine.executor.attention_configs[0]   # (with split_decode_keys: key_splits added)
    kind = "decode" if {k: v for k, v in config.items() if k != "key_splits"} == decode else "prefill"
    traced.setdefault(tracing[-1], set()).add(kind)
    return real_call(backend, q, *a, config=config, **kw)
  monkeypatch.setattr(executor_mod, "attention_call", recording)
  monkeypatch.setattr(executor_mod.Executor, "_compiled_for", compiled_for)
  engine = Engine(model, EngineConfig(dense_batch=64, page_size=4, num_pages=96, max_num_seqs=4, kernels="interpret",
                                      compilation_cache_dir=None))
  rng = np.random.default_rng(3)
  params = SamplingParams(max_tokens=6, logprobs=2, **GREEDY)
  engine.add_request("a", rng.integers(3, 200, 11).tolist(), params)
  engine.add_request("b", rng.integers(3, 200, 5).tolist(), params)
  engine.step()
  engine.step()
  engine.step()
  engine.add_request("c", rng.integers(3, 200, 7).tolist(), params)
  engine.run_until_done()
  return {r: engine.pop_output(r).outputs[0] for r in "abc"}, traced


def test_decode_only_steps_make_one_call_and_the_same_tokens(model, monkeypatch):
  two_calls, traced_before = _run(model, monkeypatch, up_to=0)
  one_call, traced = _run(model, monkeypatch, up_to=64)
  assert traced_before == {16: {"decode", "prefill"}}
  # decode-only steps run the variant (the decode kernel alone); the steps with a prompt chunk, both calls
  assert traced == {16: {"decode", "prefill"}, (16, "decode"): {"decode"}}
  for r in "abc":
    assert one_call[r].token_ids == two_calls[r].token_ids
    np.testing.assert_allclose([lp.logprob for lp in one_call[r].logprobs],
                               [lp.logprob for lp in two_calls[r].logprobs], atol=1e-6)


def test_the_variant_is_only_for_small_whole_steps_on_the_kernels(model):
  engine = Engine(model, EngineConfig(dense_batch=128, num_pages=64, max_num_seqs=4, kernels="interpret",
                                      compilation_cache_dir=None))
  ex = engine.executor
  assert ex.decode_only_variant(16) and ex.decode_only_variant(executor_mod.DECODE_ONLY_UP_TO)
  assert not ex.decode_only_variant(128)
  ref = Engine(model, EngineConfig(dense_batch=128, num_pages=64, max_num_seqs=4, kernels="reference",
                                   compilation_cache_dir=None))
  assert not ref.executor.decode_only_variant(16)     # the jnp attention takes no blocks


def test_decode_only_blocks_leave_the_prefill_blocks_empty():
  from nanoflow_jax.engine import _Chunk
  from nanoflow_jax.scheduler import Batch
  configs = ({"block_q": 1}, {"block_q": 8})
  batch = Batch(chunks=[_Chunk(1, True)] * 3, num_tokens=3, reset_slots=[])
  (dec, pre), = _attention_blocks(batch, [16], configs, decode_only=True)
  assert dec[2][0] == 3 and list(dec[0][:3]) == [0, 1, 2] and len(dec[0]) == 16
  assert len(pre[0]) == len(pre[1]) == 0 and pre[2][0] == 0
  (_, pre), = _attention_blocks(batch, [16], configs)
  assert len(pre[0]) == 16 and pre[2][0] == 0


def test_warm_up_compiles_the_variants_and_leaves_no_trace(model):
  engine = Engine(model, EngineConfig(dense_batch=64, num_pages=64, max_num_seqs=4, kernels="interpret",
                                      compilation_cache_dir=None))
  engine.warm_up()
  keys = set(engine.executor._compiled)
  assert {(16, "decode"), (32, "decode"), (64, "decode"), 16, 32, 64} <= keys
  assert engine.pool.num_free == engine.pool.num_pages
  # what /metrics counts is as before: a warmed-up server has served nothing
  assert engine.stats.steps == engine.stats.prompt_tokens == engine.stats.generated_tokens == 0
  assert engine.pool.queried_tokens == engine.pool.hit_tokens == 0
  samplers = set(engine.executor._samplers)
  engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=3, **GREEDY))
  # the sampler's common kinds too: greedy with top log-probabilities, temperature and top-p
  # sampling (chat clients), with log-probabilities; alone in a step and mixed
  engine.add_request("lp", [5, 6, 8], SamplingParams(max_tokens=3, logprobs=1, **GREEDY))
  engine.run_until_done()
  for i, kind in enumerate([dict(temperature=0.8), dict(temperature=0.8, top_p=0.9),
                            dict(temperature=0.8, top_k=5, logprobs=2)]):
    engine.add_request(f"s{i}", [5, 6, 9 + i], SamplingParams(max_tokens=3, seed=i, **kind))
    engine.run_until_done()
  assert set(engine.executor._compiled) == keys        # nothing left to compile
  assert set(engine.executor._samplers) == samplers


def test_split_decode_keys_on_the_pallas_kernel_keeps_the_tokens(model, monkeypatch):
  """split_decode_keys where the decode call is the Pallas kernel (small_step_attention's steps on the GPU; every
  step here): the small decode steps' calls get key splits, and the tokens and log-probabilities are those
  without."""
  monkeypatch.setattr(executor_mod, "SPLIT_ITEMS_PER_SM", 64)   # 4 interpret SMs: enough items to split
  seen = []
  real = REAL_CALL

  def recording(backend, q, *a, config, **kw):
    seen.append((backend, q.shape[0], config.get("key_splits", 1)))
    return real(backend, q, *a, config=config, **kw)
  monkeypatch.setattr(executor_mod, "attention_call", recording)
  outs = {}
  for split in (False, True):
    seen.clear()
    engine = Engine(model, EngineConfig(dense_batch=64, page_size=4, num_pages=96, max_num_seqs=4, kernels="interpret",
                                        split_decode_keys=split, compilation_cache_dir=None))
    rng = np.random.default_rng(5)
    for r in "ab":
      engine.add_request(r, rng.integers(3, 200, 30).tolist(), SamplingParams(max_tokens=5, logprobs=1, **GREEDY))
    engine.run_until_done()
    outs[split] = [engine.pop_output(r).outputs[0] for r in "ab"]
    splits = {ks for backend, n, ks in seen if backend == "pallas"}
    # 4 SMs x 64 items / (bucket x 2 KV heads): 8 in the 16-token steps, 2 in the 64-token one; prefill calls 1
    assert splits == ({1} if not split else {1, 2, 8}), splits
  for got, want in zip(outs[True], outs[False]):
    assert got.token_ids == want.token_ids
    np.testing.assert_allclose([lp.logprob for lp in got.logprobs], [lp.logprob for lp in want.logprobs], atol=1e-5)
