"""The offline API as a vLLM user writes it: prompt forms, vLLM's keyword names, get_tokenizer, cumulative_logprob."""
import pytest

from nanoflow_jax import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
  return LLM("tiny", dense_batch=64, num_pages=128, max_num_seqs=4, gpu_memory_utilization=0.5,
             tensor_parallel_size=1, async_scheduling=True)


def test_vllm_prompt_forms_give_the_same_output(llm):
  ids = llm.get_tokenizer().encode("hello")
  forms = ["hello", ids, {"prompt": "hello"}, {"prompt_token_ids": ids}]
  outs = [llm.generate(f, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for f in forms]
  assert all(o == outs[0] for o in outs)
  both = llm.generate([{"prompt": "hello"}, {"prompt_token_ids": ids}], GREEDY, use_tqdm=False)
  assert [o.outputs[0].token_ids for o in both] == [outs[0], outs[0]]
  with pytest.raises(ValueError, match="exactly one"):
    llm.generate({"prompt": "a", "prompt_token_ids": [1]}, GREEDY, use_tqdm=False)


def test_vllm_keyword_names(llm):
  assert llm.engine.config.kv_memory_fraction == 0.5 and llm.engine.config.tensor_parallel == 1
  assert llm.engine.config.overlap_dispatch
  with pytest.raises(TypeError, match="same setting"):
    LLM("tiny", tensor_parallel_size=1, tensor_parallel=1)


def test_cumulative_logprob(llm):
  out = llm.generate("hi", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=0),
                     use_tqdm=False)[0].outputs[0]
  assert out.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in out.logprobs)) and out.cumulative_logprob < 0
  assert llm.generate("hi", GREEDY, use_tqdm=False)[0].outputs[0].cumulative_logprob is None


def test_logit_bias_offline_and_its_checks():
  from nanoflow_jax.llm import LLM
  from nanoflow_jax.sampling_params import SamplingParams
  llm = LLM("tiny", dense_batch=64, num_pages=128, max_num_seqs=4)
  free = SamplingParams(max_tokens=5, temperature=0)
  biased, plain = llm.generate(["Hello", "World"], [SamplingParams(max_tokens=5, temperature=0, logit_bias={65: 100}),
                                                    free], use_tqdm=False)
  assert biased.outputs[0].token_ids == [65] * 5
  assert plain.outputs[0].token_ids == llm.generate(["World"], free, use_tqdm=False)[0].outputs[0].token_ids
  for bad in ({65: 101}, {-1: 1}, {"65": 1}, {65: float("nan")}, {i: 1 for i in range(301)}):
    with pytest.raises(ValueError, match="logit_bias"):
      SamplingParams(logit_bias=bad)


def test_seed_unseeded_makes_unseeded_requests_repeat():
  from nanoflow_jax.llm import LLM
  from nanoflow_jax.sampling_params import SamplingParams
  llm = LLM("tiny", dense_batch=64, num_pages=128, max_num_seqs=4)
  sp = SamplingParams(max_tokens=8, temperature=1.0)
  runs = []
  for _ in range(2):
    llm.engine.seed_unseeded(11)
    runs.append([o.outputs[0].token_ids for o in llm.generate(["a", "b"], sp, use_tqdm=False)])
  assert runs[0] == runs[1]
  llm.engine.seed_unseeded(12)
  assert [o.outputs[0].token_ids for o in llm.generate(["a", "b"], sp, use_tqdm=False)] != runs[0]


def test_the_periodic_throughput_line(caplog):
  import logging
  from nanoflow_jax.async_engine import AsyncEngine
  from nanoflow_jax.llm import LLM
  llm = LLM("tiny", dense_batch=64, num_pages=128, max_num_seqs=4)
  ae = AsyncEngine(llm.engine)
  ae.THROUGHPUT_LOG_S = 0.0
  with caplog.at_level(logging.INFO, logger="nanoflow_jax.async_engine"):
    ae._throughput_line()   # the first call starts the window
    llm.engine.stats.prompt_tokens += 100
    ae._throughput_line()
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("throughput:")]
  assert len(lines) == 1 and "prompt" in lines[0] and "running 0, waiting 0" in lines[0] and "KV 0.0% of 128 pages" in lines[0]


def test_the_final_text_decodes_the_whole_output():
  """Issue 29: an output that ends inside a UTF-8 character keeps its bytes as U+FFFD, as transformers' decode of
  the whole output gives it (before, the incomplete tail was dropped and text != decode(ids))."""
  from nanoflow_jax.llm import LLM
  from nanoflow_jax.sampling_params import SamplingParams
  llm = LLM("tiny", dense_batch=64, num_pages=128, max_num_seqs=4)
  tok = llm.get_tokenizer()
  for bias, n in (({195: 100}, 1), ({226: 100}, 3)):   # lead bytes of 2- and 3-byte characters, forced
    out = llm.generate(["x"], SamplingParams(max_tokens=n, temperature=0, logit_bias=bias), use_tqdm=False)[0]
    ids = out.outputs[0].token_ids
    assert out.outputs[0].text == tok.decode(ids) and out.outputs[0].text.endswith("\ufffd")


def test_prompt_logprobs_match_the_models_forward_pass():
  import jax
  import numpy as np
  from nanoflow_jax.llm import LLM
  from nanoflow_jax.sampling_params import SamplingParams
  llm = LLM("tiny", dtype="float32", dense_batch=16, num_pages=128, max_num_seqs=4)   # 40 tokens: three chunks
  prompt = list(range(60, 100))
  for _ in range(2):   # the second time the prefix cache holds the prompt: prompt_logprobs still computes it all
    out = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3), use_tqdm=False)[0]
    plp = out.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None and out.num_cached_tokens == 0
    ref = jax.nn.log_softmax(np.asarray(llm.engine.model.forward([prompt]))[0], axis=-1)
    for i in range(1, len(prompt)):
      assert plp[i].token_id == prompt[i] and abs(plp[i].logprob - float(ref[i - 1, prompt[i]])) < 1e-4
      assert list(plp[i].top) == [int(t) for t in np.argsort(-ref[i - 1])[:3]]
  assert llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)[0].prompt_logprobs is None


def test_llm_seed_makes_unseeded_sampling_repeat():
  from nanoflow_jax.llm import LLM
  from nanoflow_jax.sampling_params import SamplingParams
  sp = SamplingParams(max_tokens=6, temperature=1.0)
  runs = [[o.outputs[0].token_ids for o in LLM("tiny", seed=9, dense_batch=64, num_pages=128, max_num_seqs=4)
           .generate(["a", "b"], sp, use_tqdm=False)] for _ in range(2)]
  assert runs[0] == runs[1]


def test_reset_prefix_cache_makes_the_next_prompt_a_miss(llm):
  """vLLM's LLM.reset_prefix_cache: the prompt cached a moment ago computes everything again, with the same text."""
  prompt = list(range(3, 70))
  sp = SamplingParams(max_tokens=3, temperature=0)
  first, hit = (llm.generate([prompt], sp, use_tqdm=False)[0] for _ in range(2))
  llm.reset_prefix_cache()
  again = llm.generate([prompt], sp, use_tqdm=False)[0]
  assert hit.num_cached_tokens > 0 and again.num_cached_tokens == 0
  assert first.outputs[0].token_ids == hit.outputs[0].token_ids == again.outputs[0].token_ids


def test_logprobs_zero_skips_the_top_k(llm):
  """logprobs=0 (the sampled token's log-probability alone: what benchmark clients ask) compiles and runs the
  sampler without the vocabulary's top-K (5.1 ms at 512 rows on an H100); logprobs=2 runs it for 16 (XLA's TopK
  kernel), logprobs=20 for 20 (a sort). The log-probabilities of the sampled tokens are the same either way."""
  import numpy as np
  ex = llm.engine.executor
  outs, modes = {}, {}
  for k in (0, 2, 20):
    ex._samplers.clear()   # what this request's steps compile is what they run
    outs[k] = llm.generate("hi", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=k),
                           use_tqdm=False)[0].outputs[0]
    modes[k] = {(key[0].logprobs, key[0].many_logprobs) for key in ex._samplers}
  # up to 16 top log-probabilities through XLA's TopK kernel, more through the sort
  assert modes == {0: {(False, None)}, 2: {(True, False)}, 20: {(True, True)}}
  assert [lp.top for lp in outs[0].logprobs] == [{}] * 4 and all(len(lp.top) == 2 for lp in outs[2].logprobs)
  assert all(len(lp.top) == 20 for lp in outs[20].logprobs)
  assert [list(lp.top.items())[:2] for lp in outs[20].logprobs] == [list(lp.top.items()) for lp in outs[2].logprobs]
  np.testing.assert_allclose([lp.logprob for lp in outs[0].logprobs], [lp.logprob for lp in outs[2].logprobs],
                             atol=1e-5)
