"""The plan's dependencies between nano-batches that carry no data (attention@0 after attention@1, nano-batch
0's GEMMs after nano-batch 1's) are held in the traced step, and holding them changes no token."""
import numpy as np
import pytest

from nanoflow_jax.engine import Engine, EngineConfig
from nanoflow_jax.model import load_model
from nanoflow_jax.runtime import executor as executor_lib
from nanoflow_jax.runtime import plan as plan_lib
from nanoflow_jax.sampling_params import SamplingParams


def _cross_deps(cfg):
  """Nano-op -> its dependencies on other nano-batches of the same layer."""
  return {o.id: {d for d in o.deps if not d.startswith("prev:") and not d.endswith(f"@{o.nano_batch}")}
          for o in cfg.ops}


@pytest.mark.parametrize("beside", [plan_lib.BESIDE_ALL, ("o", "gate_up")])
def test_decode_overlap_order_is_held_and_tokens_are_unchanged(tmp_path, monkeypatch, beside):
  # [16, 16]: lead 1, attention@0 beside o@1..down@1 (or o@1, gate_up@1, with down@1 after attention@0)
  cfg = plan_lib.decode_overlap(32, 132, decode_rows=4, beside=beside)
  path = tmp_path / "plan.json"
  path.write_text(cfg.to_json())
  held = {}
  real = executor_lib._order_after

  def recording(op, state, outs):
    out = real(op, state, outs)
    if out is not state:   # values went through a barrier: record the ops whose outputs they waited for
      held[op.id] = {d for d in _cross_deps(cfg)[op.id] if outs.get(d)}
    return out

  monkeypatch.setattr(executor_lib, "_order_after", recording)
  model = load_model("tiny", dtype="float32", random_weights=True)
  prompts = [list(np.random.default_rng(3).integers(1, 250, n)) for n in (5, 23, 9, 14)]
  tokens = {}
  for mode in ("sequential", "nanoflow"):
    eng = Engine(model, EngineConfig(dense_batch=32, num_pages=64, max_num_seqs=4, mode=mode, compilation_cache_dir=None,
                                     pipeline_config=str(path) if mode == "nanoflow" else None))
    if mode == "nanoflow":
      assert eng.executor.nano_sizes(32) == [16, 16]
    for i, p in enumerate(prompts):
      eng.add_request(f"r{i}", [int(t) for t in p], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    eng.run_until_done()
    tokens[mode] = [eng.pop_output(f"r{i}").outputs[0].token_ids for i in range(len(prompts))]
  assert tokens["nanoflow"] == tokens["sequential"]
  # Every cross-nano-batch dependency of the plan was held, with the outputs it names.
  want = {op: deps for op, deps in _cross_deps(cfg).items() if deps}
  assert held == want
  assert want["attention@0"] == {"rope_append@1", "attention@1"} and want["o@0"] == {"down@1"}
  assert ("down@1" in want) == ("down" not in beside)
  if "down" not in beside:
    assert want["down@1"] == {"attention@0"}


def test_order_after_passes_values_through_unchanged():
  import jax.numpy as jnp
  op = plan_lib.NanoOp("attention", 0, deps=["rope_append@0", "attention@1", "prev:down@0"])
  state = {"q": jnp.arange(6.0).reshape(2, 3), "x": jnp.ones(4)}
  assert executor_lib._order_after(op, state, {"rope_append@0": [jnp.zeros(2)]}) is state  # same nano-batch only
  out = executor_lib._order_after(op, state, {"attention@1": [jnp.zeros(3)]})
  assert out is not state and all(np.array_equal(out[k], state[k]) for k in state)
