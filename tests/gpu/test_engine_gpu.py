"""The engine on the GPU: the kernel paths (Pallas, Triton attention) against the jnp reference path,
LLaMA-3-8B shape."""
import time

import numpy as np
import pytest

from nanoflow_jax.engine import Engine, EngineConfig
from nanoflow_jax.model import load_model
from nanoflow_jax.sampling_params import MAX_LOGPROBS, SamplingParams

from agreement import first_differences, max_first_logprob_diff, real_disagreements

pytestmark = pytest.mark.gpu


def test_kernel_path_agrees_with_reference_on_llama3_8b_shape():
  model = load_model("llama-3-8b", dtype="bfloat16", random_weights=True)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 128000, size=int(n)).tolist() for n in rng.integers(50, 600, size=24)]
  firsts, timing = {}, {}
  from pallas_kernels.paged_attention import paged_attention_triton_available
  kernel_sets = ["pallas", "triton"] if paged_attention_triton_available() else ["pallas"]
  kernel_sets.append(kernel_sets[-1] + "+fused")   # the same with gate_up's SiLU-and-multiply fused
  for kernels in ["reference", *kernel_sets]:
    eng = Engine(model, EngineConfig(dense_batch=1024, num_pages=4096, max_num_seqs=32,
                                     kernels=kernels.removesuffix("+fused"),
                                     gemm="mosaic_fused" if kernels.endswith("+fused") else "mosaic",
                                     compilation_cache_dir=None))
    for i, p in enumerate(prompts):
      eng.add_request(f"r{i}", p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=MAX_LOGPROBS))
    eng.run_until_done()
    t = time.perf_counter()
    for i, p in enumerate(prompts):
      eng.add_request(f"t{i}", p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    eng.run_until_done()
    timing[kernels] = time.perf_counter() - t
    firsts[kernels] = [eng.pop_output(f"r{i}").outputs[0] for i in range(len(prompts))]
    del eng
  for kernels in kernel_sets:
    same = sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(firsts["reference"], firsts[kernels]))
    lp_diff = max_first_logprob_diff(firsts["reference"], firsts[kernels])
    bad = real_disagreements(firsts["reference"], firsts[kernels])
    print(f"{kernels}: first tokens equal: {same}/{len(prompts)}; not near ties: {bad}; max logprob diff "
          f"{lp_diff:.3f}; times {timing}; first differences (sequence, position, gap): "
          f"{first_differences(firsts['reference'], firsts[kernels])}")
    assert bad == 0 and lp_diff < 0.25


def test_nanoflow_split_agrees_with_sequential_on_llama3_8b_shape(tmp_path):
  """The stream-annotated two-nano-batch step (generic split) against the sequential step: the same
  tokens and first log-probabilities."""
  from nanoflow_jax import compat
  from nanoflow_jax.runtime.plan import generic_default
  compat.enable_concurrent_command_buffers()
  model = load_model("llama-3-8b", dtype="bfloat16", random_weights=True)
  plan_path = tmp_path / "split.json"
  plan_path.write_text(generic_default(1024, 132).to_json())
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, 128000, size=int(n)).tolist() for n in rng.integers(50, 400, size=16)]
  firsts = {}
  for mode in ("sequential", "nanoflow"):
    eng = Engine(model, EngineConfig(dense_batch=1024, num_pages=4096, max_num_seqs=32, mode=mode,
                                     pipeline_config=str(plan_path) if mode == "nanoflow" else None,
                                     compilation_cache_dir=None))
    assert (eng.executor.plan is not None) == (mode == "nanoflow")
    # the full prefill steps (1024 tokens) do split: MIN_NANO_BATCH leaves only small steps whole
    assert eng.executor.nano_sizes(1024) == ([512, 512] if mode == "nanoflow" else [1024])
    for i, p in enumerate(prompts):
      eng.add_request(f"r{i}", p, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=MAX_LOGPROBS))
    eng.run_until_done()
    firsts[mode] = [eng.pop_output(f"r{i}").outputs[0] for i in range(len(prompts))]
    del eng
  same = sum(a.token_ids == b.token_ids for a, b in zip(firsts["sequential"], firsts["nanoflow"]))
  lp = max_first_logprob_diff(firsts["sequential"], firsts["nanoflow"])
  bad = real_disagreements(firsts["sequential"], firsts["nanoflow"])
  print(f"nanoflow vs sequential: {same}/{len(prompts)} equal; not near ties: {bad}; max first logprob diff {lp:.3f}")
  assert bad == 0 and lp < 0.25


def test_small_steps_on_the_pallas_attention_agree_with_the_triton_path():
  """small_step_attention (issue 27): steps of up to 64 tokens on the Pallas attention kernel (which XLA's command
  buffers record), larger ones on Triton's; the first tokens and log-probabilities against the Triton path."""
  from pallas_kernels.paged_attention import paged_attention_triton_available
  if not paged_attention_triton_available():
    pytest.skip("the Triton path is what small steps leave")
  model = load_model("llama-3-8b", dtype="bfloat16", random_weights=True)
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, 128000, size=int(n)).tolist() for n in rng.integers(20, 300, size=8)]
  outs = {}
  for small in (0, 64):
    eng = Engine(model, EngineConfig(dense_batch=256, num_pages=2048, max_num_seqs=8, kv_cache_dtype="fp8",
                                     small_step_attention=small, compilation_cache_dir=None))
    for i, p in enumerate(prompts):   # one at a time: each prompt's prefill is a step of its own, the decodes small
      eng.add_request(f"r{i}", p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=MAX_LOGPROBS))
      eng.step()
    eng.run_until_done()
    outs[small] = [eng.pop_output(f"r{i}").outputs[0] for i in range(len(prompts))]
    del eng
  assert real_disagreements(outs[0], outs[64]) == 0 and max_first_logprob_diff(outs[0], outs[64]) < 0.25


def test_steps_dispatched_on_a_thread_give_the_same_outputs():
  """overlap_dispatch (issue 27) on the GPU: XLA's launches of each step from a thread of their own, the Triton
  and Mosaic kernels included; the tokens and log-probabilities of the engine without the thread."""
  model = load_model("llama-3-8b", dtype="bfloat16", random_weights=True)
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, 128000, size=int(n)).tolist() for n in rng.integers(20, 400, size=16)]
  outs, times = {}, {}
  for overlap in (False, True):
    eng = Engine(model, EngineConfig(dense_batch=512, num_pages=4096, max_num_seqs=16, kv_cache_dtype="fp8",
                                     overlap_dispatch=overlap, compilation_cache_dir=None))
    for i, p in enumerate(prompts):
      eng.add_request(f"w{i}", p, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    eng.run_until_done()   # (compiles)
    t = time.perf_counter()
    for i, p in enumerate(prompts):
      eng.add_request(f"r{i}", p, SamplingParams(max_tokens=24, temperature=0.8, seed=i, ignore_eos=True,
                                                 logprobs=MAX_LOGPROBS))
    eng.run_until_done()
    times[overlap] = time.perf_counter() - t
    outs[overlap] = [eng.pop_output(f"r{i}").outputs[0] for i in range(len(prompts))]
    eng.shutdown()
    del eng
  print(f"16 requests x 24 tokens: inline {times[False]:.3f} s, dispatch thread {times[True]:.3f} s")
  assert [o.token_ids for o in outs[True]] == [o.token_ids for o in outs[False]]
  assert max_first_logprob_diff(outs[False], outs[True]) < 1e-3
