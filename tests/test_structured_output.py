"""Structured output offline (llguidance grammars, nanoflow_jax/structured.py): the device mask against a numpy
reference, constrained and unconstrained sequences in one batch (the unconstrained ones unchanged), every kind of
constraint, and constraints that cannot be compiled refused before anything is queued."""
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax.engine import RequestError
from nanoflow_jax.llm import LLM
from nanoflow_jax.sampling_params import SamplingParams
from nanoflow_jax.structured import apply_bitmask

SCHEMA = {"type": "object", "properties": {"k": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 0,
                                                                            "maximum": 9}},
          "required": ["k", "n"], "additionalProperties": False}


def test_the_mask_keeps_exactly_the_allowed_tokens():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 70)).astype(np.float32)
  allowed = rng.random((3, 70)) < 0.3
  words = np.zeros((3, 3), np.uint32)
  for r, t in zip(*np.nonzero(allowed)):
    words[r, t // 32] |= np.uint32(1) << np.uint32(t % 32)
  got = np.asarray(apply_bitmask(jnp.asarray(logits), jnp.asarray(words.view(np.int32))))
  np.testing.assert_array_equal(got, np.where(allowed, logits, -np.inf))


@pytest.fixture(scope="module")
def llm():
  return LLM("tiny", dense_batch=64, num_pages=256, max_num_seqs=6)


def test_constrained_and_free_sequences_share_a_batch(llm):
  free = SamplingParams(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True)
  alone = llm.generate(["free one", "free two"], free, use_tqdm=False)
  mixed = llm.generate(["free one", "json please", "free two"],
                       [free, SamplingParams(max_tokens=60, temperature=1.0, seed=1, n=2,
                                             structured_outputs={"json": SCHEMA}), free], use_tqdm=False)
  assert [o.outputs[0].token_ids for o in (mixed[0], mixed[2])] == [o.outputs[0].token_ids for o in alone]
  for c in mixed[1].outputs:
    v = json.loads(c.text)
    assert v["k"] in "ab" and 0 <= v["n"] <= 9 and c.finish_reason == "stop"


@pytest.mark.parametrize("spec,seed,check", [
    ({"regex": "[0-9]{2}x[a-c]+"}, 3, lambda t: re.fullmatch("[0-9]{2}x[a-c]+", t)),
    ({"choice": ["yes", "no", "maybe"]}, 3, lambda t: t in ("yes", "no", "maybe")),
    ({"grammar": 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]/'}, 4, lambda t: re.fullmatch(r"\([0-9](,[0-9])*\)", t)),
    # any JSON object: a random model writes long strings in it; this seed closes it within the tokens
    ({"json_object": True}, 4, lambda t: isinstance(json.loads(t), dict)),
])
def test_each_kind_of_constraint(llm, spec, seed, check):
  out = llm.generate(["go"], SamplingParams(max_tokens=40, temperature=1.0, seed=seed, structured_outputs=spec),
                     use_tqdm=False)[0].outputs[0]
  assert out.finish_reason == "stop" and check(out.text), out.text


def test_bad_constraints_are_refused_before_anything_is_queued(llm):
  for spec in ({"regex": "(unclosed"}, {"json": {"type": "no-such-type"}}, {"grammar": "start: nothing_defined"}):
    with pytest.raises((RequestError, ValueError)):
      llm.engine.add_request("bad", [1, 2], SamplingParams(max_tokens=4, structured_outputs=spec))
    assert "bad" not in llm.engine.requests and not llm.engine.scheduler.waiting
  for spec in ({}, {"regex": "a", "choice": ["b"]}, {"choice": []}, {"jsonn": {}}):
    with pytest.raises(ValueError):
      SamplingParams(structured_outputs=spec)
