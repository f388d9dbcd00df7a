"""Model.stacked_params: one copy of the weights once the runtime has stacked them, and the per-layer view
(the reference forward pass) still gives the same logits."""
import jax
import numpy as np

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
