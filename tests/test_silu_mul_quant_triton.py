"""The fp8 MLP-middle Triton kernel (scales, SiLU-and-multiply, per-token e4m3 quantization; Triton's
interpreter on the CPU, float32: ROUND=0) against its reference: a width that is no power of two, more rows
than programs and fewer, an all-zero row."""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ops_reference
from pallas_kernels import silu_mul_quant_triton as smq

pytest.importorskip("triton")


@pytest.mark.parametrize("num_sms,chunk", [(1, 2048), (4, 16), (32, 16), (4, 64)])
def test_silu_mul_quant_matches_reference(num_sms, chunk):
  """One chunk for the row, or several with the last one partial (40 = 16 + 16 + 8)."""
  rng = np.random.default_rng()
  m, i = 13, 40
  acc = rng.normal(size=(m, 2 * i)).astype(np.float32) * 30
  acc[5] = 0.0
  a_scale = rng.uniform(0.01, 0.1, size=(m, 1)).astype(np.float32)
  w_scale = rng.uniform(0.001, 0.01, size=(2 * i,)).astype(np.float32)
  q, s = smq.interpret_call(acc, a_scale, w_scale, num_sms=num_sms, chunk=chunk)
  # the reference in float32 throughout (the interpreter's path: no bf16 or e4m3 rounding), then its e4m3
  # values and scales as the model computes them
  y = acc * a_scale * w_scale[None, :]
  h = np.asarray(ops_reference.silu_and_mul(jnp.asarray(y).reshape(m, 2, i)))
  amax = np.abs(h).max(axis=-1, keepdims=True)
  ref_s = np.maximum(amax, ops_reference.MIN_SCALE) / ops_reference.E4M3_MAX
  np.testing.assert_allclose(s, ref_s, rtol=1e-6)
  np.testing.assert_allclose(q, h / ref_s, rtol=1e-5, atol=1e-4)
  assert np.abs(q).max() == pytest.approx(ops_reference.E4M3_MAX, rel=1e-6)   # each row's amax maps to the top
  assert np.all(q[5] == 0)
  ref8, ref_s8 = smq.silu_mul_quant_reference(jnp.asarray(acc), jnp.asarray(a_scale), jnp.asarray(w_scale),
                                              jnp.float32)
  np.testing.assert_allclose(np.asarray(ref_s8), ref_s, rtol=1e-6)   # the model's path: the same scales
  np.testing.assert_allclose(np.asarray(ref8.astype(jnp.float32)), np.clip(q, -448, 448), rtol=0.07, atol=1e-3)


@pytest.mark.parametrize("mode", ["sequential", "nanoflow"])
def test_engine_fuses_the_activation_quantizations(monkeypatch, mode):
  """fp8_gemm="xla_fused": every layer's two RMSNorms and gate_up's unscaled fp8 product go to the fused
  kernels (their references on the interpret path), and qkv, gate_up and down take the e4m3 rows they return
  (layers.Fp8Rows) without quantizing again; o still quantizes its own input. The outputs are those of
  fp8_gemm="xla" (the same math, unfused), also in nanoflow mode with two nano-batches. A choice outside the
  list is refused."""
  from nanoflow_jax.engine import Engine, EngineConfig
  from nanoflow_jax.model import load_model
  from nanoflow_jax.models import layers
  from nanoflow_jax.sampling_params import SamplingParams
  from pallas_kernels import rms_norm_quant_triton as rnq
  with pytest.raises(ValueError, match="fp8_gemm"):
    EngineConfig(fp8_gemm="xla_fusion").validate()
  model = load_model("tiny", dtype="bfloat16", random_weights=True, quantization="fp8")
  calls, gemm_inputs = [], []

  def recording(name, reference):
    def fn(*args):
      calls.append((name, args[0].shape))
      return reference(*args)
    return fn
  monkeypatch.setattr(smq, "silu_mul_quant_reference", recording("silu_mul", smq.silu_mul_quant_reference))
  monkeypatch.setattr(rnq, "rms_norm_quant_reference", recording("rms_norm", rnq.rms_norm_quant_reference))
  fp8_linear = layers._fp8_linear

  def watching(x, w8, spec, *a, **k):
    gemm_inputs.append((spec, type(x).__name__))
    return fp8_linear(x, w8, spec, *a, **k)
  monkeypatch.setattr(layers, "_fp8_linear", watching)
  outs = {}
  for choice in ("xla", "xla_fused"):
    calls.clear()
    gemm_inputs.clear()
    engine = Engine(model, EngineConfig(dense_batch=128, page_size=16, num_pages=64, max_num_seqs=2, mode=mode,
                                        kernels="interpret", fp8_gemm=choice, compilation_cache_dir=None))
    for r in ("a", "b"):
      engine.add_request(r, list(range(40 + len(r), 100)), SamplingParams(max_tokens=3, temperature=0, logprobs=1))
    engine.run_until_done()
    outs[choice] = [engine.pop_output(r).outputs[0] for r in ("a", "b")]
    quantized = {spec for spec, kind in gemm_inputs if kind == "Fp8Rows"}
    if choice == "xla":
      assert not calls and not quantized
      continue
    # (one call per traced layer body and nano-batch: the layers are scanned, once per compiled step size)
    silu = [shape for name, shape in calls if name == "silu_mul"]
    assert silu and all(shape[1] == 2 * model.config.intermediate_size for shape in silu)
    assert sum(name == "rms_norm" for name, _ in calls) == 2 * len(silu)   # before qkv and before gate_up
    assert len(quantized) == 3 and not any(spec.startswith("...nd") for spec in quantized)   # o: its own
    assert sum(kind == "Fp8Rows" for _, kind in gemm_inputs) == len(calls)
  for a, b in zip(outs["xla"], outs["xla_fused"]):
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose([lp.logprob for lp in a.logprobs], [lp.logprob for lp in b.logprobs], atol=1e-6)


def test_row_kernels_take_a_program_per_row_up_to_a_bound():
  """Both row kernels (this and rms_norm_quant) launch one program per row up to PROGRAMS_PER_SM per SM: rows in
  flight at once hide the memory latency (one program per SM walked ~16 rows in turn)."""
  from pallas_kernels import triton_shared as smq
  assert smq.row_programs(16, 132) == 16 and smq.row_programs(1, 132) == 1
  assert smq.row_programs(2048, 132) == 132 * smq.PROGRAMS_PER_SM < 2048
