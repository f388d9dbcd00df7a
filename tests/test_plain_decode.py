"""launch/plain_decode.py: the plain JAX decode step (issue 27's same-run baseline) is a real decode. Fed a
prompt one token at a time, its logits are the model's full forward pass's at every position (bf16 and fp8
weights: the same layer ops either way); its timing loop runs on the CPU."""
import jax.numpy as jnp
import numpy as np
import pytest

from launch import plain_decode
from nanoflow_jax.model import load_model


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_plain_step_fed_a_prompt_gives_the_forward_pass_logits(quantization):
  model = load_model("tiny", dtype="float32", random_weights=True, quantization=quantization,
                     seed=int(np.random.default_rng().integers(1000)))
  assert (model.config.quantization is not None) == bool(quantization)
  rng = np.random.default_rng()
  prompts = rng.integers(0, model.config.vocab_size, (2, 9)).astype(np.int32)
  want = np.asarray(model.forward(prompts))
  step = plain_decode.make_step(model)
  top, layers = model.layer_list()
  ks, vs = plain_decode.empty_cache(model, 2, 12)
  for t in range(prompts.shape[1]):
    logits, ks, vs = step(top, layers, ks, vs, jnp.asarray(prompts[:, t]), jnp.int32(t))
    np.testing.assert_allclose(np.asarray(logits), want[:, t], rtol=2e-3, atol=2e-3)
  assert not np.asarray(ks[0][:, prompts.shape[1]:]).any()   # nothing written past the last position


def test_plain_step_keeps_a_sliding_window():
  import dataclasses
  from nanoflow_jax.model import Model
  base = load_model("tiny", dtype="float32", random_weights=True)
  model = Model(dataclasses.replace(base.config, sliding_window=3), base.params, jnp.float32)
  prompts = np.random.default_rng().integers(0, model.config.vocab_size, (1, 8)).astype(np.int32)
  want = np.asarray(model.forward(prompts))
  step, (top, layers) = plain_decode.make_step(model), model.layer_list()
  ks, vs = plain_decode.empty_cache(model, 1, 8)
  for t in range(8):
    logits, ks, vs = step(top, layers, ks, vs, jnp.asarray(prompts[:, t]), jnp.int32(t))
  np.testing.assert_allclose(np.asarray(logits), want[:, -1], rtol=2e-3, atol=2e-3)


def test_plain_sweep_times_each_batch():
  model = load_model("tiny", dtype="bfloat16", random_weights=True)
  out = plain_decode.sweep(model, [1, 3], context=16, steps=2)
  assert sorted(out) == [1, 3] and all(ms > 0 for ms in out.values())


def test_a_batch_that_fails_is_reported_and_left_out(monkeypatch, capsys):
  model = load_model("tiny", dtype="bfloat16", random_weights=True)
  real = plain_decode.time_step

  def flaky(model, b, context, steps):
    if b == 2:
      raise MemoryError("RESOURCE_EXHAUSTED: out of memory")
    return real(model, b, context, steps)
  monkeypatch.setattr(plain_decode, "time_step", flaky)
  out = plain_decode.sweep(model, [1, 2], context=16, steps=1)
  assert list(out) == [1] and "batch    2: failed: MemoryError" in capsys.readouterr().out
