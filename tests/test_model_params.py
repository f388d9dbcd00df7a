"""Model.stacked_params: one copy of the weights once the runtime has stacked them, and the per-layer view
(the reference forward pass) still gives the same logits."""
import jax
import numpy as np

from nanoflow_jax import layer_stack
from nanoflow_jax.model import load_model


def test_stacked_params_replace_the_per_layer_copy():
  model = load_model("tiny", dtype="float32", random_weights=True)
  ids = [[5, 9, 2, 77, 31]]
  before = np.asarray(model.forward(ids))
  layer0 = {k: np.asarray(v) for k, v in model.params["layers_0"].items()}
  top, stacked = model.stacked_params()
  assert model._params is None                                    # the per-layer arrays are gone
  assert all(w.shape[0] == model.config.num_layers for w in jax.tree.leaves(stacked))
  assert model.stacked_params()[1] is stacked                     # built once, shared by every executor
  for k, v in layer0.items():
    np.testing.assert_array_equal(np.asarray(model.params["layers_0"][k]), v)
  np.testing.assert_allclose(np.asarray(model.forward(ids)), before, rtol=1e-6, atol=1e-6)
  assert set(top) == {k for k in model.params if not k.startswith("layers_")}


def test_loaders_write_layers_into_the_stack():
  """Random weights drawn straight into the stack equal the per-layer draws stacked; each layer is
  written in place (the stack's buffer is donated, not copied)."""
  import jax.numpy as jnp
  from nanoflow_jax import checkpoint, config as config_lib
  cfg = config_lib.tiny_config()
  per_layer = checkpoint.random_params(cfg, "float32", seed=3)
  top, stacked = checkpoint.random_params(cfg, "float32", seed=3, stacked=True)
  assert set(top) == {k for k in per_layer if not k.startswith("layers_")}
  for name, w in stacked.items():
    want = np.stack([np.asarray(per_layer[f"layers_{i}"][name]) for i in range(cfg.num_layers)])
    np.testing.assert_array_equal(np.asarray(w), want)
  stack = layer_stack.LayerStack(2)
  stack.put(("layers_0", "w"), jnp.ones((3,)))
  first = stack._stacks[("w",)]
  stack.put(("layers_1", "w"), jnp.full((3,), 2.0))
  assert first.is_deleted()                        # donated: the update reused its buffer
  np.testing.assert_array_equal(np.asarray(stack.result()[1]["w"]), [[1, 1, 1], [2, 2, 2]])


def test_layer_stack_refuses_incomplete_or_mismatched_layers():
  import jax.numpy as jnp
  import pytest
  stack = layer_stack.LayerStack(3)
  stack.put(("embed",), jnp.zeros((4,)))
  stack.put(("layers_0", "attn", "w"), jnp.zeros((2,)))
  stack.put(("layers_2", "attn", "w"), jnp.zeros((2,)))
  with pytest.raises(ValueError, match=r"attn/w: layers \[1\] were never loaded"):
    stack.result()
  with pytest.raises(ValueError, match="shape"):
    stack.put(("layers_1", "attn", "w"), jnp.zeros((5,)))
  with pytest.raises(ValueError, match="layer 3 of a 3-layer model"):
    stack.put(("layers_3", "attn", "w"), jnp.zeros((2,)))
  stack.put(("layers_1", "attn", "w"), jnp.zeros((2,)))
  top, layers = stack.result()
  assert set(top) == {"embed"} and layers["attn"]["w"].shape == (3, 2)
