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


@pytest.mark.parametrize("num_sms", [1, 3])
@pytest.mark.parametrize("cfg", [{}, dict(wg_dimension="N", tile_n=64, grid_minor_dim="M", grid_tile_width=2),
                                 dict(max_concurrent_steps=2, epi_tile_n=128)])
def test_gemm_silu_mul_matches_reference(num_sms, cfg):
  """The fused gate_up: silu(a @ gate) * (a @ up) for b = [gate | up], on more output tiles than CTAs,
  warpgroups split along M or N, a K loop longer than the pipeline, against the unfused reference."""
  seed = np.random.default_rng().integers(1 << 30)
  a = _rand((256, 192), seed)
  b = _rand((192, 512), seed + 1) * 0.2
  with gpu_interpret():
    out = gemm.gemm_silu_mul(a, b, num_sms=num_sms, config=cfg)
  assert out.shape == (256, 256)
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(gemm.gemm_silu_mul_reference(a, b), np.float32), rtol=2e-2, atol=2e-2)
  # The reference itself is the model's unfused path: the GEMM, then silu_and_mul over [M, 2, I].
  unfused = layers.silu_and_mul(gemm.gemm_reference(a, b).reshape(256, 2, 256))
  np.testing.assert_allclose(np.asarray(gemm.gemm_silu_mul_reference(a, b), np.float32),
                             np.asarray(unfused, np.float32), rtol=2e-2, atol=2e-2)


def test_gemm_silu_mul_reads_one_layer_of_a_stack_and_refuses_bad_shapes():
  seed = np.random.default_rng().integers(1 << 30)
  a, b = _rand((128, 64), seed), _rand((3, 64, 256), seed + 1) * 0.2
  with gpu_interpret():
    out = jax.jit(lambda a, b, i: gemm.gemm_silu_mul(a, b, num_sms=2, layer=i))(a, b, jnp.int32(2))
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(gemm.gemm_silu_mul_reference(a, b[2]), np.float32), rtol=2e-2, atol=2e-2)
  assert not gemm.silu_mul_supported(128, 128, 64)     # I = 64: less than one tile of output columns
  assert not gemm.silu_mul_supported(64, 256, 64)      # M = 64: less than the CTA's 128 rows
  with pytest.raises(ValueError, match="tiles"):
    gemm.gemm_silu_mul(a, b[0, :, :128], num_sms=2)
  with pytest.raises(ValueError, match="incompatible"):
    gemm.gemm_silu_mul(a, b[0, :32], num_sms=2)


def test_linear_silu_mul_fuses_through_the_installed_gemm_or_falls_back():
  """With a GEMM that fuses, one call with the "silu_mul" epilogue on [K, 2I]; with one that declines (None),
  the plain GEMM then silu_and_mul: both equal to the unfused layer."""
  x, w = _rand((4, 8, 16), 0), _rand((16, 2, 32), 1)
  ref = layers.silu_and_mul(layers.linear(x, w, "...h,hti->...ti"))
  for fuses in (True, False):
    calls = []

    def fake(a, b, r, stacked, epilogue=None):
      calls.append((a.shape, b.shape, epilogue))
      if epilogue == "silu_mul":
        return gemm.gemm_silu_mul_reference(a, b) if fuses else None
      return gemm.gemm_reference(a, b, r)
    with layers.use_gemm(fake):
      y = layers.linear_silu_mul(x, w, "...h,hti->...ti")
    assert y.shape == (4, 8, 32)
    want = [((32, 16), (16, 64), "silu_mul")] + ([] if fuses else [((32, 16), (16, 64), None)])
    assert calls == want
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=5e-2)


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
  assert make(kernels="interpret", gemm="mosaic")._gemm(a, b, None, None, epilogue="silu_mul") is None   # unfused
  with gpu_interpret():
    out = make(kernels="interpret")._gemm(a, b, None, None)
  assert out is not None and float(jnp.max(jnp.abs(out.astype(jnp.float32) - 256))) == 0
  x, w = _rand((128, 256), 3), _rand((256, 256), 4) * 0.1
  with gpu_interpret():
    fused = make(kernels="interpret", gemm="mosaic_fused")._gemm(x, w, None, None, epilogue="silu_mul")
  np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(gemm.gemm_silu_mul_reference(x, w), np.float32),
                             rtol=2e-2, atol=2e-2)
  with pytest.raises(ValueError, match="gemm"):
    make(gemm="cublas")
  with pytest.raises(ValueError, match="gemm"):
    EngineConfig(gemm="cublas").validate()


def test_prefill_attention_choice_reaches_the_executor():
  """EngineConfig.prefill_attention (--prefill_attention) chooses the executor's prefill kernel; a bad name is
  refused before anything loads."""
  from nanoflow_jax.engine import Engine, EngineConfig
  from nanoflow_jax.model import load_model
  with pytest.raises(ValueError, match="prefill_attention"):
    EngineConfig(prefill_attention="flash").validate()
  model = load_model("tiny", dtype="float32", random_weights=True)
  for choice, mosaic in (("auto", True), ("triton", False)):
    eng = Engine(model, EngineConfig(dense_batch=64, num_pages=64, max_num_seqs=4, prefill_attention=choice,
                                     compilation_cache_dir=None))
    assert eng.executor.mosaic_prefill is mosaic


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


@pytest.mark.parametrize("choice", ["mosaic", "mosaic_fused"])
def test_executor_hands_the_gemm_the_weight_stack(choice):
  """Where stacked_gemm is on (stream annotation; interpret mode, here) the executor's GEMMs get the whole
  stacked weight and the layer index instead of the layer's slice, and the tokens do not change; with
  mosaic_fused, gate_up goes through the fused kernel, also reading the stack in place."""
  from nanoflow_jax.engine import Engine, EngineConfig
  from nanoflow_jax.model import load_model
  from nanoflow_jax.sampling_params import SamplingParams
  model = load_model("tiny", dtype="bfloat16", random_weights=True)
  calls = []

  def recording_gemm(a, b, residual=None, *, num_sms, config=None, layer=None):
    calls.append(("gemm", b.ndim, layer is not None))
    return gemm.gemm_reference(a, b if layer is None else b[layer], residual)

  def recording_silu_mul(a, b, *, num_sms, config=None, layer=None):
    calls.append(("silu_mul", b.ndim, layer is not None))
    return gemm.gemm_silu_mul_reference(a, b if layer is None else b[layer])
  outs = {}
  for kernels in ("reference", "interpret"):
    engine = Engine(model, EngineConfig(dense_batch=128, page_size=16, num_pages=64, max_num_seqs=2,
                                        kernels=kernels, gemm=choice, compilation_cache_dir=None))
    assert engine.executor.stacked_gemm == (kernels == "interpret")
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(gemm, "gemm", recording_gemm)
      mp.setattr(gemm, "gemm_silu_mul", recording_silu_mul)
      engine.add_request("r", list(range(40, 160)), SamplingParams(max_tokens=4, temperature=0))   # a 128-row step
      engine.run_until_done()
    outs[kernels] = engine.pop_output("r").outputs[0].token_ids
  # qkv and gate_up qualify in the tiny shape; with mosaic_fused, gate_up is the fused call.
  assert {c[0] for c in calls} == ({"gemm", "silu_mul"} if choice == "mosaic_fused" else {"gemm"})
  assert all(c[1:] == (3, True) for c in calls)
  assert outs["interpret"] == outs["reference"]


@pytest.mark.parametrize("layer_loop,stacked", [("scan", True), ("unrolled", False)])
def test_gpu_layer_scan_hands_the_gemms_the_weight_stack(layer_loop, stacked):
  """On a GPU's kernel path the scanned layers' GEMMs read the weight stack at the layer index, stream-annotated
  or not: a slice reaches a custom call as a copy (session 30's deviceless census: every layer's weights copied
  each step, 14 GB for the bf16 8B). Unrolled layers have arrays of their own. (The executor built as on a GPU,
  lab/gpu_aot's target; nothing compiled.)"""
  from lab import gpu_aot
  from nanoflow_jax.model import load_model
  from nanoflow_jax.runtime.executor import Executor
  model = load_model("tiny", dtype="bfloat16", random_weights=True)
  with gpu_aot.gpu_target():
    ex = Executor(model, 64, 16, 4, 256, 128, kernels="auto", num_sms=132, layer_loop=layer_loop)
  assert ex.on_kernels and ex.stacked_gemm == stacked   # (triton where jax-triton is installed, else pallas)
