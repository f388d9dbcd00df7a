"""launch/mixed_step.py's MixedStep on the CPU with the tiny model: the step holds the asked-for decodes
and prefill tokens, and runs sequentially and split (the GPU numbers come from the same code)."""
from launch.mixed_step import MixedStep
from nanoflow_jax.model import load_model
from nanoflow_jax.runtime.plan import generic_default


def test_mixed_step_runs_in_both_modes():
  model = load_model("tiny", dtype="float32", random_weights=True)
  step = MixedStep(model, decodes=6, context=20, prefill=10)
  assert step.decodes == 6 and step.batch.num_tokens == 16
  assert "6 decodes at context 20-" in step.describe
  assert step.time(None, "reference", iters=1) > 0
  plan = generic_default(16, 132)
  plan.nano_batches = [8, 8]
  assert step.time(plan, "reference", iters=1) > 0


def test_dense_batch_sets_the_executors_bucket_ladder():
  # A 4-decode step timed in an executor of the engine's dense batch (step-tail): the ladder reaches it.
  model = load_model("tiny", dtype="float32", random_weights=True)
  step = MixedStep(model, decodes=4, context=20, prefill=0, dense_batch=64)
  assert step.dense == 64 and step.batch.num_tokens == 4
  with step.prepared(None, "reference") as (run, args):
    assert step.engine.executor.buckets[-1] == 64
    out = run(*args)
    assert out is not None
  assert step.engine.executor is None    # the executor's buffers go on exit
