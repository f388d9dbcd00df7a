"""The engine's greedy output equals transformers' request by request, through chunked prefill,
arrivals mid-run, sliding windows, MoE and preemption."""
import numpy as np
import pytest

import engine_fixtures as fx
from nanoflow_jax.engine import Engine, EngineConfig
from nanoflow_jax.model import load_model
from nanoflow_jax.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama3", "mistral", "mixtral", "qwen2"])
def arch_model(request, tmp_path_factory):
  hf, ckpt = fx.make_converted(request.param, tmp_path_factory.mktemp(request.param))
  return request.param, hf, load_model(ckpt, dtype="float32")


def _run(engine, requests, arrivals=None, logprobs=None):
  """requests: {rid: (prompt, max_tokens)}; arrivals: {step: [rid, ...]} added mid-run."""
  arrivals = arrivals or {}
  later = {rid for rids in arrivals.values() for rid in rids}
  for rid, (prompt, n) in requests.items():
    if rid not in later:
      engine.add_request(rid, prompt, SamplingParams(max_tokens=n, logprobs=logprobs, **GREEDY))
  step = 0
  while engine.has_work() or any(s > step for s in arrivals):
    for rid in arrivals.get(step, []):
      prompt, n = requests[rid]
      engine.add_request(rid, prompt, SamplingParams(max_tokens=n, logprobs=logprobs, **GREEDY))
    engine.step()
    step += 1
  return {rid: engine.pop_output(rid).outputs[0] for rid in requests}


def test_mixed_batch_with_chunking_and_arrivals(arch_model):
  arch, hf, model = arch_model
  rng = np.random.default_rng(0)
  lengths = [3, 17, 40, 9, 1, 26]
  prompts = fx.random_prompts(rng, lengths)
  requests = {f"r{i}": (p, 6 + i) for i, p in enumerate(prompts)}
  # dense_batch 32: the 40-token prompt is chunked; page size 4: many partial pages.
  engine = Engine(model, EngineConfig(dense_batch=32, page_size=4, num_pages=200, max_num_seqs=4,
                                      compilation_cache_dir=None))
  outs = _run(engine, requests, arrivals={2: ["r4"], 5: ["r5"]})
  for rid, (prompt, n) in requests.items():
    assert outs[rid].token_ids == fx.hf_greedy(hf, prompt, n), (arch, rid)
    assert outs[rid].finish_reason == "length"
  assert engine.pool.num_free == engine.pool.num_pages


def test_preemption_recomputes_exactly(arch_model):
  arch, hf, model = arch_model
  if arch != "llama3":
    pytest.skip("one architecture suffices for the preemption path")
  rng = np.random.default_rng(1)
  prompts = fx.random_prompts(rng, [10, 14, 6, 12, 9])
  # Sequences run to max_model_len (no max_tokens); the scheduler expects 1 output token, so it admits
  # more than the 24 pages can hold and must preempt.
  engine = Engine(model, EngineConfig(dense_batch=64, page_size=4, num_pages=24, max_num_seqs=5,
                                      max_model_len=40, compilation_cache_dir=None))
  engine.scheduler._default_expected = 1
  for i, p in enumerate(prompts):
    engine.add_request(f"r{i}", p, SamplingParams(max_tokens=None, **GREEDY))
  engine.run_until_done()
  assert engine.scheduler.num_preemptions > 0
  for i, p in enumerate(prompts):
    out = engine.pop_output(f"r{i}").outputs[0]
    assert out.finish_reason == "length"
    assert out.token_ids == fx.hf_greedy(hf, p, 40 - len(p)), i
  assert engine.pool.num_free == engine.pool.num_pages


def test_kernel_path_in_interpret_mode_equals_reference(tmp_path_factory):
  """The executor wired to the Pallas kernels (interpret mode) gives the reference path's tokens."""
  hf, ckpt = fx.make_converted("llama3", tmp_path_factory.mktemp("kern"))
  model = load_model(ckpt, dtype="float32")
  prompts = fx.random_prompts(np.random.default_rng(5), [3, 21, 9])
  outs = {}
  for kernels in ("reference", "interpret"):
    engine = Engine(model, EngineConfig(dense_batch=32, page_size=4, num_pages=64, max_num_seqs=4,
                                        kernels=kernels, compilation_cache_dir=None))
    outs[kernels] = _run(engine, {f"r{i}": (p, 5) for i, p in enumerate(prompts)}, logprobs=1)
  for rid, ref in outs["reference"].items():
    got = outs["interpret"][rid]
    assert got.token_ids == ref.token_ids
    # and the log-probabilities: the tiny model's greedy tokens survive attention errors that these do not
    np.testing.assert_allclose([lp.logprob for lp in got.logprobs], [lp.logprob for lp in ref.logprobs], atol=1e-4)


def test_small_steps_on_their_own_attention_configuration(tmp_path_factory, monkeypatch):
  """small_step_attention: steps of up to 16 tokens run the attention in another configuration than larger ones
  (on a GPU the Pallas kernel beside the Triton one; here both Pallas in interpret mode, the small steps' prefill
  blocks 8 queries instead of 32). The kernel runs each step's configuration, the host builds that step's query
  blocks for it (a 9-token prompt beside two decodes: blocks of 8 + 1), and the tokens and log-probabilities
  are the reference path's (blocks longer than the kernel's block_q leave rows uncomputed: log-probabilities
  0.05 apart, the tokens still equal)."""
  from nanoflow_jax import engine as engine_mod
  from nanoflow_jax.runtime import executor as executor_mod
  from pallas_kernels.paged_attention import DECODE_CONFIG, PREFILL_CONFIG
  hf, ckpt = fx.make_converted("llama3", tmp_path_factory.mktemp("small"))
  model = load_model(ckpt, dtype="float32")
  prompts = fx.random_prompts(np.random.default_rng(7), [3, 21, 9])
  built, ran = [], []
  blocks, call = engine_mod._attention_blocks, executor_mod.attention_call
  monkeypatch.setattr(engine_mod, "_attention_blocks", lambda batch, sizes, configs, *rest: built.append(
      (sizes[0], configs[1]["block_q"], [ch.length for ch in batch.chunks])) or blocks(batch, sizes, configs, *rest))
  monkeypatch.setattr(executor_mod, "attention_call", lambda backend, q, *a, **kw: ran.append(
      (q.shape[0], kw["config"]["block_q"])) or call(backend, q, *a, **kw))
  outs = {}
  for kernels in ("reference", "interpret"):
    engine = Engine(model, EngineConfig(dense_batch=32, page_size=4, num_pages=64, max_num_seqs=4,
                                        kernels=kernels, compilation_cache_dir=None))
    if kernels == "interpret":
      ex = engine.executor
      assert ex.small_step_attention == 0          # off unless asked, and only ever for the Triton kernels
      ex.small_step_attention = 16
      ex.small_attention_configs = ({**DECODE_CONFIG, "programs_per_sm": 2}, {**PREFILL_CONFIG, "block_q": 8})
      built.clear()
    for i, p in enumerate(prompts[:2]):
      engine.add_request(f"r{i}", p, SamplingParams(max_tokens=5, logprobs=1, **GREEDY))
    engine.step()
    engine.step()   # r2's 9-token prompt then prefills beside two decodes: a 16-token (small) step
    engine.add_request("r2", prompts[2], SamplingParams(max_tokens=5, logprobs=1, **GREEDY))
    engine.run_until_done()
    outs[kernels] = [engine.pop_output(f"r{i}").outputs[0] for i in range(3)]
  for ref, got in zip(outs["reference"], outs["interpret"]):
    assert got.token_ids == ref.token_ids
    np.testing.assert_allclose([lp.logprob for lp in got.logprobs], [lp.logprob for lp in ref.logprobs], atol=1e-4)
  assert (32, 32, [3, 21]) in built and (16, 8, [1, 1, 9]) in built
  assert all(block_q == (8 if size <= 16 else 32) for size, block_q, _ in built)
  assert {(16, 1), (16, 8), (32, 1), (32, 32)} == set(ran)     # the kernels' side: decode and prefill calls


@pytest.mark.parametrize("kernels", ["reference", "interpret"])
def test_nanoflow_mode_equals_sequential(tmp_path_factory, kernels):
  """The nano-batch split (generic two-nano-batch pipeline, chunks cut at the boundary) changes nothing."""
  hf, ckpt = fx.make_converted("llama3", tmp_path_factory.mktemp(f"nano-{kernels}"))
  model = load_model(ckpt, dtype="float32")
  prompts = fx.random_prompts(np.random.default_rng(6), [3, 40, 9, 17, 2])
  requests = {f"r{i}": (p, 6) for i, p in enumerate(prompts)}
  outs = {}
  for mode in ("sequential", "nanoflow"):
    engine = Engine(model, EngineConfig(dense_batch=32, page_size=4, num_pages=128, max_num_seqs=5, mode=mode,
                                        kernels=kernels, compilation_cache_dir=None))
    if mode == "nanoflow":
      assert engine.executor.nano_sizes(32) == [16, 16]
    outs[mode] = _run(engine, requests, arrivals={3: ["r4"]})
  for rid, (prompt, n) in requests.items():
    assert outs["nanoflow"][rid].token_ids == outs["sequential"][rid].token_ids == fx.hf_greedy(hf, prompt, n)


def test_fused_rope_append_path_equals_the_unfused_one():
  """The executor's fused RoPE + KV-append op (here its jnp reference; the Triton kernel on a GPU) gives
  the unfused step's tokens, in both modes."""
  from nanoflow_jax.engine import Engine, EngineConfig
  from nanoflow_jax.model import load_model
  from nanoflow_jax.sampling_params import SamplingParams
  model = load_model("tiny", dtype="float32", random_weights=True)
  prompts = [[5, 9, 2, 77, 31, 8], [100, 3, 3, 250, 1], list(range(40, 90))]
  out = {}
  for fused in (False, True):
    for mode in ("sequential", "nanoflow"):
      eng = Engine(model, EngineConfig(dense_batch=64, num_pages=64, max_num_seqs=4, mode=mode,
                                       fused_rope_append=fused, compilation_cache_dir=None))
      assert eng.executor.fused_rope_append == fused
      for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
      eng.run_until_done()
      out[fused, mode] = [eng.pop_output(f"r{i}").outputs[0].token_ids for i in range(len(prompts))]
  assert len({str(v) for v in out.values()}) == 1
