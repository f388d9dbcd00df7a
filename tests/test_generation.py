"""Sampling parameters end to end through LLM / Engine on the built-in tiny model: each test fails if
its parameter is ignored."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from nanoflow_jax.llm import LLM
from nanoflow_jax.sampling_params import SamplingParams

PROMPTS = ["Hello there", "The quick brown fox", "a"]


@pytest.fixture(scope="module")
def llm():
  return LLM("tiny", dense_batch=64, num_pages=512, max_num_seqs=8)


def gen(llm, prompts=PROMPTS, **kw):
  return llm.generate(prompts, SamplingParams(**kw), use_tqdm=False)


def ids(outs):
  return [o.outputs[0].token_ids for o in outs]


def test_max_tokens_and_length_finish(llm):
  outs = gen(llm, max_tokens=7, temperature=0, ignore_eos=True)
  assert all(len(t) == 7 for t in ids(outs))
  assert all(o.outputs[0].finish_reason == "length" for o in outs)


def test_seed_reproduces_and_batch_composition_does_not_matter(llm):
  a = gen(llm, max_tokens=12, temperature=1.0, seed=123, ignore_eos=True)
  b = gen(llm, prompts=[PROMPTS[1]], max_tokens=12, temperature=1.0, seed=123, ignore_eos=True)
  c = gen(llm, max_tokens=12, temperature=1.0, seed=124, ignore_eos=True)
  assert ids(a)[1] == ids(b)[0]
  assert ids(a) != ids(c)


def test_temperature_zero_is_greedy_and_high_temperature_is_not(llm):
  greedy = ids(gen(llm, max_tokens=10, temperature=0, ignore_eos=True))
  hot = ids(gen(llm, max_tokens=10, temperature=3.0, seed=1, ignore_eos=True))
  assert greedy != hot
  # greedy equals the reference forward's argmax, token by token
  model = llm.engine.model
  seq = llm.tokenizer.encode(PROMPTS[0]) + greedy[0]
  logits = np.asarray(model.forward(np.array([seq])))[0]
  p = len(seq) - 10
  assert greedy[0] == list(np.argmax(logits[p - 1:-1], axis=-1))


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_truncation_to_one_token_equals_greedy(llm, kw):
  greedy = ids(gen(llm, max_tokens=10, temperature=0, ignore_eos=True))
  truncated = ids(gen(llm, max_tokens=10, temperature=2.0, seed=5, ignore_eos=True, **kw))
  free = ids(gen(llm, max_tokens=10, temperature=2.0, seed=5, ignore_eos=True))
  assert truncated == greedy
  assert free != greedy


@pytest.mark.parametrize("kw", [dict(repetition_penalty=5.0), dict(presence_penalty=2.0),
                                dict(frequency_penalty=2.0)])
def test_penalties_reduce_repetition(llm, kw):
  base = ids(gen(llm, max_tokens=24, temperature=0, ignore_eos=True))
  pen = ids(gen(llm, max_tokens=24, temperature=0, ignore_eos=True, **kw))
  repeats = lambda toks: sum(len(t) - len(set(t)) for t in toks)
  assert repeats(pen) < repeats(base)


def test_n_samples(llm):
  out = gen(llm, prompts=[PROMPTS[0]], n=3, max_tokens=8, temperature=1.0, seed=9, ignore_eos=True)[0]
  assert [o.index for o in out.outputs] == [0, 1, 2]
  assert len({tuple(o.token_ids) for o in out.outputs}) == 3


def test_stop_token_ids_and_min_tokens(llm):
  base = ids(gen(llm, prompts=[PROMPTS[1]], max_tokens=12, temperature=0, ignore_eos=True))[0]
  stop_id = base[3]
  first = base.index(stop_id)
  out = gen(llm, prompts=[PROMPTS[1]], max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop_id])[0]
  assert out.outputs[0].token_ids == base[:first + 1]
  assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_id
  out = gen(llm, prompts=[PROMPTS[1]], max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop_id],
            min_tokens=first + 3)[0].outputs[0]
  assert len(out.token_ids) >= first + 3 and stop_id not in out.token_ids[:first + 3]


def test_eos_and_ignore_eos(llm):
  base = ids(gen(llm, prompts=[PROMPTS[2]], max_tokens=10, temperature=0, ignore_eos=True))[0]
  saved = llm.engine.eos_ids
  llm.engine.eos_ids = (base[2],)
  try:
    stopped = gen(llm, prompts=[PROMPTS[2]], max_tokens=10, temperature=0)[0].outputs[0]
    ignored = gen(llm, prompts=[PROMPTS[2]], max_tokens=10, temperature=0, ignore_eos=True)[0].outputs[0]
  finally:
    llm.engine.eos_ids = saved
  assert stopped.token_ids == base[:base.index(base[2]) + 1] and stopped.finish_reason == "stop"
  assert ignored.token_ids == base


def test_stop_strings_cut_exactly(llm):
  full = gen(llm, prompts=[PROMPTS[0]], max_tokens=40, temperature=1.0, seed=3, ignore_eos=True)[0].outputs[0].text
  assert len(full) > 12
  stop = full[8:10]
  cut = full[:full.find(stop)]
  out = gen(llm, prompts=[PROMPTS[0]], max_tokens=40, temperature=1.0, seed=3, ignore_eos=True, stop=[stop])[0]
  assert out.outputs[0].text == cut and out.outputs[0].finish_reason == "stop"
  assert out.outputs[0].stop_reason == stop
  inc = gen(llm, prompts=[PROMPTS[0]], max_tokens=40, temperature=1.0, seed=3, ignore_eos=True, stop=[stop],
            include_stop_str_in_output=True)[0]
  assert inc.outputs[0].text == cut + stop


def test_logprobs_are_the_models(llm):
  out = gen(llm, prompts=[PROMPTS[0]], max_tokens=5, temperature=0, ignore_eos=True, logprobs=3)[0].outputs[0]
  seq = llm.tokenizer.encode(PROMPTS[0]) + out.token_ids
  ref = np.asarray(jax.nn.log_softmax(llm.engine.model.forward(np.array([seq]))[0], axis=-1))
  p = len(seq) - 5
  for i, lp in enumerate(out.logprobs):
    assert lp.token_id == out.token_ids[i]
    np.testing.assert_allclose(lp.logprob, ref[p - 1 + i, lp.token_id], atol=1e-4)
    assert len(lp.top) == 3
    top_ref = np.argsort(-ref[p - 1 + i])[:3]
    assert list(lp.top) == list(top_ref)


def test_bad_prompts_are_rejected_and_lose_nothing(llm):
  with pytest.raises(ValueError, match="max_model_len"):
    gen(llm, prompts=["ok", [5] * 9000], max_tokens=2)
  with pytest.raises(ValueError, match="token ids"):
    gen(llm, prompts=[[1, 2, 10 ** 6]], max_tokens=2)
  with pytest.raises(ValueError, match="top_p"):
    SamplingParams(top_p=0)
  assert not llm.engine.requests and llm.engine.pool.num_free == llm.engine.pool.num_pages
  assert len(gen(llm, max_tokens=2, temperature=0)) == 3


def test_abort_frees_pages(llm):
  eng = llm.engine
  eng.add_request("a", [1, 2, 3] * 10, SamplingParams(max_tokens=50, ignore_eos=True))
  eng.add_request("b", [4, 5], SamplingParams(max_tokens=50, ignore_eos=True))
  for _ in range(3):
    eng.step()
  assert eng.pool.num_used > 0
  eng.abort("a")
  assert eng.pop_output("a").outputs[0].finish_reason == "abort"
  eng.abort("b")
  eng.run_until_done()
  eng.pop_output("b")
  assert eng.pool.num_free == eng.pool.num_pages and not eng.scheduler.has_work()


def test_chat(llm):
  out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
                 use_tqdm=False)[0]
  assert out.prompt_token_ids == llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
  assert len(out.outputs[0].token_ids) == 3


def test_fp8_kv_cache_runs_and_stays_close():
  """kv_cache_dtype="fp8": the cache holds float8_e4m3fn (twice the pages in the same bytes), generation
  runs, and the first tokens' log-probabilities stay close to the full-precision cache's."""
  from nanoflow_jax.llm import build_engine
  from nanoflow_jax.model import load_model
  from nanoflow_jax.sampling_params import SamplingParams
  model = load_model("tiny", dtype="float32", random_weights=True)
  prompts = [[5, 9, 2, 77, 31, 8], [100, 3, 3, 250, 1], list(range(40, 70))]
  out = {}
  for kv in ("auto", "fp8"):
    eng = build_engine("tiny", model_obj=model, dense_batch=64, num_pages=64, max_num_seqs=4, kv_cache_dtype=kv)
    assert eng.executor.kv[0].dtype == (jnp.float8_e4m3fn if kv == "fp8" else jnp.float32)
    for i, p in enumerate(prompts):
      eng.add_request(f"r{i}", p, SamplingParams(max_tokens=4, temperature=0, logprobs=1, ignore_eos=True))
    eng.run_until_done()
    out[kv] = [eng.pop_output(f"r{i}").outputs[0] for i in range(len(prompts))]
  for a, b in zip(out["auto"], out["fp8"]):
    assert len(b.token_ids) == 4
    assert abs(a.logprobs[0].logprob - b.logprobs[0].logprob) < 0.2


def test_bad_kv_cache_dtype_is_refused_before_loading():
  from nanoflow_jax.llm import build_engine
  with pytest.raises(ValueError, match="kv_cache_dtype"):
    build_engine("no-such-model-dir", kv_cache_dtype="int4")


def test_nanoflow_picks_the_shipped_config_unless_generic_is_asked_for():
  """mode=nanoflow takes the shipped config for the model and device (tiny on a CPU at dense batch 256);
  pipeline_config="generic" takes the generic split instead (to measure a split the search turned down)."""
  from nanoflow_jax.llm import build_engine
  from nanoflow_jax.model import load_model
  model = load_model("tiny", dtype="float32", random_weights=True)
  names = {}
  for config in (None, "generic"):
    eng = build_engine("tiny", model_obj=model, dense_batch=256, num_pages=32, max_num_seqs=4, mode="nanoflow",
                       pipeline_config=config)
    names[config] = eng.executor.plan.name
  assert names[None].startswith("tiny-cpu") and names["generic"] == "generic-2"


def test_head_and_sampler_run_on_the_sampled_rows_only():
  """The LM head and the sampler take min(slots, step bucket) rows, not one per slot: with 64 slots and
  16-token steps they run on 16 rows, and a slot's seeded draws do not depend on which other slots sample
  beside it (each sampled row reads its own slot's parameters)."""
  llm = LLM("tiny", dense_batch=64, num_pages=512, max_num_seqs=64)
  a = gen(llm, prompts=["a"], max_tokens=6, temperature=1.0, seed=7, ignore_eos=True)
  rows = {key[1] for key in llm.engine.executor._samplers}
  assert rows == {16}, rows   # every step of one 1-2 token prompt is in the 16-token bucket
  b = gen(llm, max_tokens=6, temperature=1.0, seed=7, ignore_eos=True)   # "a" is PROMPTS[2]
  assert ids(a)[0] == ids(b)[2]


def test_a_reused_slot_starts_with_clean_penalty_state():
  """A slot's output counts and prompt mask are cleared when a new sequence takes it: with one slot, a
  penalized request gives the same tokens after another request used that slot as in a fresh engine."""
  kw = dict(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=3.0, frequency_penalty=2.0,
            presence_penalty=1.0)
  fresh = LLM("tiny", dense_batch=64, num_pages=512, max_num_seqs=1)
  alone = ids(gen(fresh, prompts=[PROMPTS[1]], **kw))
  used = LLM("tiny", dense_batch=64, num_pages=512, max_num_seqs=1)
  first = ids(gen(used, prompts=[PROMPTS[0]], **{**kw, "max_tokens": 30}))
  after = ids(gen(used, prompts=[PROMPTS[1]], **kw))
  assert after == alone
  # the check can fail: the first request's tokens, had they stayed counted, overlap the second's
  assert set(first[0]) & set(alone[0]) or set(first[0]) & set(fresh.tokenizer.encode(PROMPTS[1]))


def test_nanoflow_sets_the_stream_flags_only_where_the_plan_splits(monkeypatch, tmp_path):
  """build_engine(mode="nanoflow") sets the XLA stream flags (before the backend starts) only where its
  plan will split the step: a whole-batch config runs the sequential schedule, which the flags slow."""
  from nanoflow_jax import compat
  from nanoflow_jax.llm import build_engine
  from nanoflow_jax.model import load_model
  from nanoflow_jax.runtime import autosearch
  calls = []
  monkeypatch.setattr(compat, "enable_concurrent_command_buffers", lambda tp=1: calls.append(tp))
  monkeypatch.setattr(compat, "gpu_name_before_backend", lambda: "NVIDIA H200")
  model = load_model("tiny", dtype="float32", random_weights=True)
  whole = tmp_path / "whole.json"
  whole.write_text(autosearch.shipped_config_for_kind("llama-3-8b", "h200", 2048).to_json())
  kw = dict(model_obj=model, dense_batch=2048, num_pages=32, max_num_seqs=4, mode="nanoflow")
  build_engine("tiny", pipeline_config=str(whole), **kw)
  assert calls == []
  build_engine("tiny", pipeline_config="generic", **kw)
  assert calls == [1]
