"""The SM-share GEMM (Mosaic GPU, interpret mode on the CPU) against its jnp reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_utils import gpu_interpret
from nanoflow_jax.models import layers
from pallas_kernels import gemm


def _rand(shape, key):
  return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.bfloat16)


@pytest.mark.parametrize("num_sms", [1, 2, 5])
@pytest.mark.parametrize("residual", [False, True])
def test_gemm_matches_reference(num_sms, residual):
  seed = np.random.default_rng().integers(1 << 30)
  a, b = _rand((256, 128), seed), _rand((128, 512), seed + 1)
  c = _rand((256, 512), seed + 2) if residual else None
  with gpu_interpret():
    out = gemm.gemm(a, b, c, num_sms=num_sms)
  ref = gemm.gemm_reference(a, b, c)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=6e-2)


def test_unsupported_shapes_are_refused():
  assert not gemm.supported(100, 256, 64) and gemm.supported(128, 256, 64)
  with pytest.raises(ValueError, match="multiples"):
    gemm.gemm(_rand((100, 64), 0), _rand((64, 256), 1), num_sms=2)


def test_linear_routes_through_an_installed_gemm():
  calls = []

  def fake(a, b, r, stacked):
    calls.append((a.shape, b.shape, r is not None))
    return gemm.gemm_reference(a, b, r)
  x, w, res = _rand((4, 8, 6, 16), 0), _rand((6, 16, 32), 1), _rand((4, 8, 32), 2)
  with layers.use_gemm(fake):
    y = layers.linear(x, w, "...nd,ndh->...h", res)
  assert calls == [((32, 96), (96, 32), True)]
  ref = layers.linear(x, w, "...nd,ndh->...h", res)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("cfg", [
    next(c for c in gemm.TUNE_SPACE if c["wg_dimension"] == "M" and c["grid_minor_dim"] == "M"),
    next(c for c in gemm.TUNE_SPACE if c["tile_n"] == 64)])
def test_tuner_configurations_compute_the_same_product(cfg):
  """The tuner's other tilings (grid order M, warpgroups split along M, 64-wide tiles) are exact too."""
  seed = np.random.default_rng().integers(1 << 30)
  a, b = _rand((256, 128), seed), _rand((128, 256), seed + 1)
  with gpu_interpret():
    out = gemm.gemm(a, b, num_sms=2, config={**gemm.DEFAULT, **cfg})
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(gemm.gemm_reference(a, b), np.float32),
                             rtol=2e-2, atol=6e-2)


def test_executor_gemm_choice():
  """gemm="xla" leaves the GEMMs to XLA's dot (the layer's einsum); a bad choice is refused before anything
  is built."""
  import jax.numpy as jnp
  from nanoflow_jax.engine import EngineConfig
  from nanoflow_jax.model import load_model
  from nanoflow_jax.runtime.executor import Executor
  model = load_model("tiny", dtype="bfloat16", random_weights=True)
  make = lambda **kw: Executor(model, 16, 16, 2, 64, 128, **kw)
  a, b = jnp.ones((128, 256), jnp.bfloat16), jnp.ones((256, 256), jnp.bfloat16)
  assert make(kernels="interpret", gemm="xla")._gemm(a, b, None, None) is None   # falls back to the einsum
  with gpu_interpret():
    out = make(kernels="interpret")._gemm(a, b, None, None)
  assert out is not None and float(jnp.max(jnp.abs(out.astype(jnp.float32) - 256))) == 0
  with pytest.raises(ValueError, match="gemm"):
    make(gemm="cublas")
  with pytest.raises(ValueError, match="gemm"):
    EngineConfig(gemm="cublas").validate()


@pytest.mark.parametrize("residual", [False, True])
def test_gemm_reads_one_layer_of_a_stack(residual):
  """With a layer index the kernel takes the stacked weight [L, K, N] and reads that layer in place."""
  seed = np.random.default_rng().integers(1 << 30)
  a, b = _rand((128, 64), seed), _rand((3, 64, 256), seed + 1)
  c = _rand((128, 256), seed + 2) if residual else None
  for layer in (2, 0):
    with gpu_interpret():
      out = jax.jit(lambda a, b, c, i: gemm.gemm(a, b, c, num_sms=2, layer=i))(a, b, c, jnp.int32(layer))
    ref = gemm.gemm_reference(a, b[layer], c)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=6e-2)
  with pytest.raises(ValueError, match="stack"):
    gemm.gemm(a, b[0], num_sms=2, layer=0)


def test_executor_hands_the_gemm_the_weight_stack():
  """Where stacked_gemm is on (stream annotation; interpret mode, here) the executor's GEMMs get the whole
  stacked weight and the layer index instead of the layer's slice, and the tokens do not change."""
  from nanoflow_jax.engine import Engine, EngineConfig
  from nanoflow_jax.model import load_model
  from nanoflow_jax.sampling_params import SamplingParams
  model = load_model("tiny", dtype="bfloat16", random_weights=True)
  calls = []

  def recording_gemm(a, b, residual=None, *, num_sms, config=None, layer=None):
    calls.append((b.ndim, layer is not None))
    return gemm.gemm_reference(a, b if layer is None else b[layer], residual)
  outs = {}
  for kernels in ("reference", "interpret"):
    engine = Engine(model, EngineConfig(dense_batch=128, page_size=16, num_pages=64, max_num_seqs=2,
                                        kernels=kernels, compilation_cache_dir=None))
    assert engine.executor.stacked_gemm == (kernels == "interpret")
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(gemm, "gemm", recording_gemm)
      engine.add_request("r", list(range(40, 160)), SamplingParams(max_tokens=4, temperature=0))   # a 128-row step
      engine.run_until_done()
    outs[kernels] = engine.pop_output("r").outputs[0].token_ids
  assert calls and all(c == (3, True) for c in calls)   # qkv and gate_up qualify in the tiny shape
  assert outs["interpret"] == outs["reference"]
