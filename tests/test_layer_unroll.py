"""layer_unroll: several decoder layers per iteration of the step's layer scan (so a layer's tail and the
next layer's head share one computation) gives the same tokens, in both modes, including an unroll that
does not divide the layer count; bad values are refused before anything loads."""
import numpy as np
import pytest

from nanoflow_jax.engine import Engine, EngineConfig
from nanoflow_jax.model import load_model
from nanoflow_jax.runtime import plan as plan_lib
from nanoflow_jax.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model():
  return load_model("tiny", dtype="float32", random_weights=True)   # 4 layers


def _tokens(model, tmp_path, mode, unroll, layer_loop="scan", dense_batch=32, engine_out=None):
  path = tmp_path / "plan.json"
  path.write_text(plan_lib.decode_overlap(32, 132, decode_rows=4).to_json())
  eng = Engine(model, EngineConfig(dense_batch=dense_batch, num_pages=64, max_num_seqs=4, mode=mode, layer_unroll=unroll,
                                   layer_loop=layer_loop,
                                   compilation_cache_dir=None,
                                   pipeline_config=str(path) if mode == "nanoflow" else None))
  prompts = [list(np.random.default_rng(5).integers(1, 250, n)) for n in (7, 19, 3, 12)]
  for i, p in enumerate(prompts):
    eng.add_request(f"r{i}", [int(t) for t in p], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
  eng.run_until_done()
  if engine_out is not None:
    engine_out.append(eng)
  text = next(iter(eng.executor._compiled.values())).as_text()
  # the layer scan's loop: a while at the top of the step (the reference attention has loops of its own)
  layer_loop = 'op_name="jit(_forward_step)/while"' in text
  return [eng.pop_output(f"r{i}").outputs[0].token_ids for i in range(len(prompts))], layer_loop


@pytest.mark.parametrize("mode", ["sequential", "nanoflow"])
def test_unrolled_layer_scan_gives_the_same_tokens(model, tmp_path, mode):
  ref, loop = _tokens(model, tmp_path, mode, 1)
  assert loop
  for unroll in (2, 3):
    got, _ = _tokens(model, tmp_path, mode, unroll)
    assert got == ref, unroll
  got, loop = _tokens(model, tmp_path, mode, 4)   # fully unrolled (4 layers): no layer loop left
  assert got == ref and not loop


@pytest.mark.parametrize("mode", ["sequential", "nanoflow"])
def test_unrolled_layers_with_weights_of_their_own_give_the_same_tokens(model, tmp_path, mode):
  """layer_loop="unrolled": every layer in the step, each with weight arrays of its own (no stack to slice);
  the model holds one form of its weights at a time and goes back to the stack for a scanning engine."""
  ref, _ = _tokens(model, tmp_path, mode, 1)
  got, loop = _tokens(model, tmp_path, mode, 1, layer_loop="unrolled")
  assert got == ref and not loop
  assert model._stacked is None and len(model._per_layer[1]) == model.config.num_layers
  assert all(not isinstance(v, dict) and v.ndim >= 1 for p in model._per_layer[1] for v in p.values())
  again, loop = _tokens(model, tmp_path, mode, 1)
  assert again == ref and loop and model._per_layer is None


def test_unrolled_fp8_layers_give_the_same_tokens(tmp_path):
  fp8 = load_model("tiny", dtype="float32", random_weights=True, quantization="fp8")
  ref, _ = _tokens(fp8, tmp_path, "sequential", 1)
  got, loop = _tokens(fp8, tmp_path, "sequential", 1, layer_loop="unrolled")
  assert got == ref and not loop


@pytest.mark.parametrize("mode", ["sequential", "nanoflow"])
def test_hybrid_layer_loop_unrolls_the_small_steps_only(model, tmp_path, mode, monkeypatch):
  """layer_loop="hybrid": steps below UNROLL_BELOW tokens unroll their layers over static slices of the stacks
  (the model keeps its stacks), larger ones scan; the same tokens as scanning every step."""
  from nanoflow_jax.runtime import executor
  monkeypatch.setattr(executor, "UNROLL_BELOW", 32)   # the 41-token first step scans, the decodes unroll
  ref, _ = _tokens(model, tmp_path, mode, 1, dense_batch=64)
  engines = []
  got, _ = _tokens(model, tmp_path, mode, 1, layer_loop="hybrid", dense_batch=64, engine_out=engines)
  assert got == ref and model._per_layer is None
  ex = engines[0].executor
  looped = {}
  for key, compiled in ex._compiled.items():
    bucket = key if isinstance(key, int) else key[0]
    looped[bucket] = 'op_name="jit(_forward_step)/while"' in compiled.as_text()
  assert looped == {b: b >= 32 for b in looped} and set(looped) >= {16, 64}, looped


def test_auto_layer_loop_on_a_gpu():
  """auto on a GPU's kernel path: fp8 weights unrolled where XLA's fp8 dot reads them (in a scan they would be
  copied), hybrid with our fp8 GEMM; bf16 scans (until the hybrid is measured); scan elsewhere. (Executors built
  as on a GPU, lab/gpu_aot's target; nothing compiled.)"""
  from lab import gpu_aot
  from nanoflow_jax.runtime.executor import Executor
  bf16 = load_model("tiny", dtype="bfloat16", random_weights=True)
  fp8 = load_model("tiny", dtype="bfloat16", random_weights=True, quantization="fp8")
  def loop(m, **kw):
    with gpu_aot.gpu_target():
      return Executor(m, 64, 16, 4, 256, 128, kernels="auto", num_sms=132, **kw).layer_loop
  assert loop(bf16) == "scan" and loop(fp8) == "unrolled" and loop(fp8, fp8_gemm="mosaic") == "hybrid"
  assert Executor(bf16, 64, 16, 4, 256, 128, kernels="reference").layer_loop == "scan"


def test_layer_loop_is_checked():
  with pytest.raises(ValueError, match="layer_loop"):
    EngineConfig(layer_loop="loop").validate()


def test_layer_unroll_must_be_positive():
  with pytest.raises(ValueError, match="layer_unroll"):
    EngineConfig(layer_unroll=0).validate()
