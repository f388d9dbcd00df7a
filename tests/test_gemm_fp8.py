"""The fp8 GEMM (Mosaic GPU, interpret mode on the CPU) against its jnp reference, and the reference against
numpy's float64 product of the e4m3 values.

Interpret mode (jax 0.10.2) stalls now and then on CTA tiles whose weight block is 256 rows (a TMA box of
[256, 128] e4m3; seen with and without the transposed operand, not understood), so these tests run CTA
tiles of 128 x 128; the default 128 x 256 tile runs in the GPU tests (tests/gpu) and the CUDA lowering test.
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kernel_utils import gpu_interpret
from pallas_kernels import gemm, gemm_fp8

# CTA tiles of 128 x 128: the consumer warpgroups split along M (64-row tiles) or along N (64 columns each).
SPLIT_M = dict(tile_m=64, tile_n=128, wg_dimension="M")
SPLIT_N = dict(tile_m=128, tile_n=64, wg_dimension="N", grid_minor_dim="M", grid_tile_width=2)


def _operands(rng, m, n, k):
  """e4m3 operands spread over the format's range, and scales of different sizes per row and channel."""
  a8 = jnp.asarray(rng.normal(size=(m, k)) * 60, jnp.float32).astype(gemm_fp8.FP8)
  w8 = jnp.asarray(rng.normal(size=(n, k)) * 60, jnp.float32).astype(gemm_fp8.FP8)
  a_scale = jnp.asarray(rng.uniform(0.2, 3, size=m) * 1e-3, jnp.float32)
  w_scale = jnp.asarray(rng.uniform(0.2, 3, size=n) * 1e-3, jnp.float32)
  return a8, w8, a_scale, w_scale


def _close(got, want, rtol=1e-2):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_reference_is_the_scaled_float64_product():
  rng = np.random.default_rng()
  a8, w8, a_scale, w_scale = _operands(rng, 64, 96, 128)
  exact = (np.asarray(a8).astype(np.float64) @ np.asarray(w8).astype(np.float64).T
           * np.asarray(a_scale, np.float64)[:, None] * np.asarray(w_scale, np.float64)[None, :])
  ref = gemm_fp8.gemm_fp8_reference(a8, w8, a_scale, w_scale, out_dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(ref), exact, rtol=1e-5, atol=1e-6 * np.abs(exact).max())
  gate, up = np.split(exact, 2, axis=1)
  silu = gate / (1 + np.exp(-gate)) * up
  np.testing.assert_allclose(np.asarray(gemm_fp8.gemm_fp8_silu_mul_reference(a8, w8, a_scale, w_scale,
                                                                             out_dtype=jnp.float32)),
                             silu, rtol=1e-4, atol=1e-5 * np.abs(silu).max())


@pytest.mark.parametrize("cfg,num_sms", [(SPLIT_M, 1), (SPLIT_N, 3)])
def test_gemm_fp8_matches_reference(cfg, num_sms):
  """More output tiles than CTAs (the persistent loop), a K loop longer than the pipeline's stages, every
  row and column scaled by its own factor."""
  rng = np.random.default_rng()
  a8, w8, a_scale, w_scale = _operands(rng, 256, 256, 640)
  with gpu_interpret():
    out = gemm_fp8.gemm_fp8(a8, w8, a_scale, w_scale, num_sms=num_sms, config=cfg)
  assert out.dtype == jnp.bfloat16 and out.shape == (256, 256)
  _close(out, gemm_fp8.gemm_fp8_reference(a8, w8, a_scale, w_scale))


def test_gemm_fp8_adds_the_residual_and_reads_one_layer_of_a_stack():
  """With `layer` the kernel reads the weight and scale stacks at that layer; the residual joins in its dtype."""
  rng = np.random.default_rng()
  a8, _, a_scale, _ = _operands(rng, 128, 256, 256)
  stacks = [_operands(rng, 128, 256, 256) for _ in range(3)]
  w_stack = jnp.stack([s[1] for s in stacks])
  s_stack = jnp.stack([s[3] for s in stacks])
  residual = jnp.asarray(rng.normal(size=(128, 256)), jnp.bfloat16)
  with gpu_interpret():
    out = jax.jit(lambda a, w, s, r, i: gemm_fp8.gemm_fp8(a, w, a_scale, s, r, num_sms=2, config=SPLIT_M,
                                                         layer=i))(a8, w_stack, s_stack, residual, jnp.int32(2))
  _close(out, gemm_fp8.gemm_fp8_reference(a8, w_stack[2], a_scale, s_stack[2], residual))


@pytest.mark.parametrize("num_sms", [1, 3])
def test_gemm_fp8_silu_mul_matches_reference(num_sms):
  """gate_up: w8 = [gate; up] [2I, K], each with its own channel scales; silu(gate) * up [M, I]."""
  rng = np.random.default_rng()
  a8, w8, a_scale, w_scale = _operands(rng, 256, 512, 384)
  with gpu_interpret():
    out = gemm_fp8.gemm_fp8_silu_mul(a8, w8, a_scale, w_scale, num_sms=num_sms)
  assert out.shape == (256, 256)
  _close(out, gemm_fp8.gemm_fp8_silu_mul_reference(a8, w8, a_scale, w_scale), rtol=2e-2)


def test_bad_operands_are_refused_by_name():
  rng = np.random.default_rng(0)
  a8, w8, a_scale, w_scale = _operands(rng, 128, 256, 256)
  with pytest.raises(ValueError, match="float8_e4m3fn"):
    gemm_fp8.gemm_fp8(a8.astype(jnp.bfloat16), w8, a_scale, w_scale, num_sms=2)
  with pytest.raises(ValueError, match="incompatible"):
    gemm_fp8.gemm_fp8(a8, w8[:, :128], a_scale, w_scale, num_sms=2)
  with pytest.raises(ValueError, match="scales"):
    gemm_fp8.gemm_fp8(a8, w8, a_scale[:64], w_scale, num_sms=2)
  with pytest.raises(ValueError, match="tiles"):
    gemm_fp8.gemm_fp8(a8[:64], w8, a_scale[:64], w_scale, num_sms=2)
  with pytest.raises(ValueError, match="residual"):
    gemm_fp8.gemm_fp8(a8, w8, a_scale, w_scale, jnp.zeros((128, 128), jnp.bfloat16), num_sms=2)
  assert gemm_fp8.supported(128, 256, 256, silu_mul=True)
  assert not gemm_fp8.supported(128, 128, 256, silu_mul=True)   # I = 64: less than the CTA's 128 columns
  assert not gemm_fp8.supported(64, 256, 256)                   # M = 64: less than the CTA's 128 rows
  assert not gemm_fp8.supported(128, 256, 192)                  # K: not whole 128-byte steps


@pytest.mark.parametrize("silu_mul,residual", [(False, False), (False, True), (True, False)])
def test_default_tiles_lower_for_cuda(silu_mul, residual):
  """The default configurations (CTA tiles 128 x 256 and the gate_up's 128 x 128 of two streams) lower
  through Mosaic GPU for sm_90, as the GPU compiles them; on a stack too (as under stream annotation)."""
  m, n, k = 256, 512, 512
  a8 = jnp.zeros((m, k), gemm_fp8.FP8)
  w8 = jnp.zeros((2, n, k), gemm_fp8.FP8)
  scales = (jnp.ones((m,), jnp.float32), jnp.ones((2, n), jnp.float32))
  res = jnp.zeros((m, n), jnp.bfloat16) if residual else None
  if silu_mul:
    f = lambda a, w, s, t: gemm_fp8.gemm_fp8_silu_mul(a, w, s, t, num_sms=132, layer=1)
  else:
    f = lambda a, w, s, t: gemm_fp8.gemm_fp8(a, w, s, t, res, num_sms=132, layer=1)
  text = jax.jit(f).trace(a8, w8, *scales).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_engine_hands_its_fp8_gemms_to_the_kernel(monkeypatch):
  """fp8_gemm="mosaic": in a 128-row step qkv, o and down (with the residual) go to gemm_fp8 and gate_up to
  gemm_fp8_silu_mul, each with its layer of the weight and scale stacks (stacked_gemm, as under stream
  annotation); the one-row decode steps stay on XLA's fp8 dot; the log-probabilities match fp8_gemm="xla"'s. The
  kernels are replaced by their references here (the kernel tests above check those against the kernels;
  a whole step of interpreted kernels inside the layer scan stalls the interpreter). A bad choice is refused
  before anything loads."""
  from nanoflow_jax.engine import Engine, EngineConfig
  from nanoflow_jax.model import load_model
  from nanoflow_jax.sampling_params import SamplingParams
  with pytest.raises(ValueError, match="fp8_gemm"):
    EngineConfig(fp8_gemm="cutlass").validate()
  model = load_model("tiny", dtype="bfloat16", random_weights=True, quantization="fp8")
  monkeypatch.setattr(gemm_fp8, "DEFAULT", {**gemm_fp8.DEFAULT, **SPLIT_M})   # 128-column tiles: o, down take them
  calls = []

  def recording(reference, name):
    def kernel(a8, w8, a_scale, w_scale, *rest, num_sms, config=None, layer=None, out_dtype=jnp.bfloat16):
      calls.append((name, a8.shape, w8.shape[1:], layer is not None, bool(rest)))
      if layer is not None:
        w8, w_scale = w8[layer], w_scale[layer]
      return reference(a8, w8, a_scale, w_scale, *rest, out_dtype=out_dtype)
    return kernel
  monkeypatch.setattr(gemm_fp8, "gemm_fp8", recording(gemm_fp8.gemm_fp8_reference, "gemm_fp8"))
  monkeypatch.setattr(gemm_fp8, "gemm_fp8_silu_mul", recording(gemm_fp8.gemm_fp8_silu_mul_reference, "silu_mul"))
  outs = {}
  for choice in ("xla", "mosaic"):
    engine = Engine(model, EngineConfig(dense_batch=128, page_size=16, num_pages=64, max_num_seqs=2,
                                        kernels="interpret", fp8_gemm=choice, compilation_cache_dir=None))
    assert engine.executor.fp8_gemm == choice
    engine.add_request("r", list(range(40, 168)), SamplingParams(max_tokens=3, temperature=0, logprobs=1))
    engine.run_until_done()
    outs[choice] = engine.pop_output("r").outputs[0]
  assert sorted(set(calls)) == [("gemm_fp8", (128, 128), (128, 128), True, True),      # o, + residual
                                ("gemm_fp8", (128, 128), (256, 128), True, False),     # qkv
                                ("gemm_fp8", (128, 384), (128, 384), True, True),      # down, + residual
                                ("silu_mul", (128, 128), (768, 128), True, False)]
  assert outs["mosaic"].token_ids == outs["xla"].token_ids
  np.testing.assert_allclose([lp.logprob for lp in outs["mosaic"].logprobs],
                             [lp.logprob for lp in outs["xla"].logprobs], atol=0.02)


def test_lowers_under_stream_annotation_with_no_nested_jit():
  """As the nanoflow executor calls it: inside compute_on (a stream), the stacks read at a traced layer; no
  jitted jnp function inside (one nested in a stream annotation's computation fails on the GPU at run time)."""
  from nanoflow_jax import compat
  m, n, k = 256, 512, 512
  a8, w8 = jnp.zeros((m, k), gemm_fp8.FP8), jnp.zeros((2, n, k), gemm_fp8.FP8)
  a_scale, w_scale, res = jnp.ones((m, 1), jnp.float32), jnp.ones((2, n), jnp.float32), jnp.zeros((m, n), jnp.bfloat16)
  call = lambda a, s, w, t, r, i: gemm_fp8.gemm_fp8(a, w, s, t, r, num_sms=66, layer=i)
  silu = lambda a, s, w, t, i: gemm_fp8.gemm_fp8_silu_mul(a, w, s, t, num_sms=66, layer=i)
  for f, args in ((call, (a8, a_scale, w8, w_scale, res, jnp.int32(1))), (silu, (a8, a_scale, w8, w_scale, jnp.int32(0)))):
    jaxpr = jax.make_jaxpr(f)(*args)
    assert not [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("pjit", "jit")]
    text = jax.jit(lambda *a, f=f: compat.compute_on(f, "gpu_stream:1")(*a)).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_tuned_tilings_are_taken_per_shape(tmp_path, monkeypatch):
  """gemm_fp8_configs.json (lab/fp8_gemm.py --write_configs) gives a shape its tiling, gate_up's apart; an
  explicit config goes over the default, not over the tuned one; supported() judges with the same tiling."""
  path = tmp_path / "tuned.json"
  path.write_text('{"256x512x1024": {"tile_m": 64, "tile_n": 256, "wg_dimension": "M"}, '
                  '"silu_mul:256x512x1024": {"max_concurrent_steps": 2}}')
  monkeypatch.setattr(gemm_fp8, "CONFIG_FILE", str(path))
  try:
    assert gemm_fp8.config_for(256, 512, 1024)["wg_dimension"] == "M"
    assert gemm_fp8.config_for(256, 512, 1024, silu_mul=True) == {**gemm_fp8.SILU_MUL_DEFAULT, "max_concurrent_steps": 2}
    assert gemm_fp8.config_for(128, 512, 1024) == gemm_fp8.DEFAULT                       # not tuned: the default
    assert gemm_fp8.config_for(256, 512, 1024, config={"tile_k": 64}) == {**gemm_fp8.DEFAULT, "tile_k": 64}
    assert gemm_fp8.supported(256, 512, 1024) and gemm_fp8.config_key(256, 512, 1024, True) == "silu_mul:256x512x1024"
  finally:
    gemm.tuned_configs.cache_clear()
