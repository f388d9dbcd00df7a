"""The compiled step holds no device conditional: on the GPU, XLA runs a conditional by reading its
predicate on the host, so the thread launching the step waits for everything before it (measured: the
device idle 19 ms of every 67 ms step, docs/history/perf-notes.md). The sampler's branches are picked on the
host instead (sampler.Modes)."""
import jax
import numpy as np
import pytest

from nanoflow_jax import sampler
from nanoflow_jax.llm import build_engine
from nanoflow_jax.sampling_params import SamplingParams


def _hlo_texts(executor):
  return [c.as_text() for c in executor._compiled.values()] + [c.as_text() for c in executor._samplers.values()]


def test_no_conditionals_whatever_the_sampling():
  eng = build_engine("tiny", random_weights=True, dense_batch=64, num_pages=64, max_num_seqs=4)
  asks = [SamplingParams(max_tokens=3, temperature=0),
          SamplingParams(max_tokens=3, temperature=0.8, top_p=0.9, top_k=5, seed=1),
          SamplingParams(max_tokens=3, temperature=0.7, repetition_penalty=1.3, logprobs=2, seed=2)]
  for i, sp in enumerate(asks):   # one at a time: each step's Modes is the union of its rows'
    eng.add_request(f"r{i}", [1, 2, 3, 4 + i], sp)
    eng.run_until_done()
  assert len(eng.executor._samplers) == 3     # a sampler per Modes
  for text in _hlo_texts(eng.executor):
    assert "conditional(" not in text


def test_the_device_decided_sampler_would_hold_conditionals():
  """The check above can fail: the same sampler deciding its branches on the device has conditionals."""
  r, v = 4, 50
  p = sampler.SamplingArrays.empty(r)
  text = jax.jit(sampler.sample).lower(np.zeros((r, v), np.float32), np.zeros((r, v), np.int32),
                                       np.zeros((r, v), bool), p).compile().as_text()
  assert "conditional(" in text
