"""FP8 (W8A8, e4m3) on the CPU: the quantized GEMM against numpy, the model against its unquantized self
(logits, KL, greedy), published FP8 checkpoint formats built in-test with their exact tensor names, dtypes and
quantization_config fields, and the schemes we refuse."""
import glob
import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

import hf_models
import nanoflow_jax
from nanoflow_jax import quantization as Q

F8 = ml_dtypes.float8_e4m3fn


# --- the GEMM and the quantizers against numpy ------------------------------------------------------------
@pytest.mark.parametrize("mode", ["dynamic", "static", "scale_ub"])
def test_fp8_matmul_matches_numpy(mode):
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  a = rng.normal(size=(37, 96)).astype(np.float32) * rng.uniform(0.1, 5, size=(37, 1)).astype(np.float32)
  w = rng.normal(size=(96, 70)).astype(np.float32) * 0.05
  w8, scale = Q.quantize_weight(jnp.asarray(w), 1)
  kw = {"static": dict(input_scale=np.float32(0.02)), "scale_ub": dict(scale_ub=2.0), "dynamic": {}}[mode]
  got = np.asarray(Q.fp8_matmul(jnp.asarray(a), w8, scale.reshape(-1), jnp.float32, **kw))
  want = Q.fp8_matmul_reference(a, np.asarray(w8), np.asarray(scale).reshape(-1), **kw)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if mode == "dynamic":   # near the exact product (e4m3: 3 mantissa bits on both operands; the others clip)
    exact = a @ w
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.06


def test_quantize_weight_per_output_channel():
  """[K, *out] -> e4m3 [*out, K] (K-major, what cuBLASLt's fp8 GEMM takes) and a scale per output channel."""
  import jax.numpy as jnp
  rng = np.random.default_rng(1)
  w = rng.normal(size=(64, 3, 40)).astype(np.float32) * rng.uniform(0.01, 3, size=(1, 3, 40)).astype(np.float32)
  w8, scale = Q.quantize_weight(jnp.asarray(w), 1)
  assert w8.dtype == jnp.float8_e4m3fn and w8.shape == (3, 40, 64) and scale.shape == (3, 40)
  np.testing.assert_allclose(np.asarray(scale), np.abs(w).max(axis=0) / 448, rtol=1e-6)
  back = np.asarray(w8).astype(np.float32) * np.asarray(scale)[..., None]
  wt = w.transpose(1, 2, 0)
  assert np.abs(np.asarray(w8).astype(np.float32)).max(axis=-1).min() == 448   # each channel's max hits the top
  assert np.max(np.abs(back - wt) / np.abs(wt).max(axis=-1, keepdims=True)) <= 2 ** -4 + 1e-6   # half an ulp
  o = rng.normal(size=(4, 8, 16)).astype(np.float32)       # o: two contracted dims [heads, hd, hidden]
  o8, os_ = Q.quantize_weight(jnp.asarray(o), 2)
  assert o8.shape == (16, 32) and os_.shape == (16,)
  np.testing.assert_array_equal(np.asarray(Q.to_fp8_layout(o, 2)), o.reshape(32, 16).T)


def test_quantize_stacked_is_each_layer_quantized():
  """The loaders' stack quantization (layer by layer, compiled once per weight kind) gives each layer's
  quantize_weight exactly, as new `_fp8` / `_fp8_scale` stacks; the bf16 stacks are gone and the rest passes
  through. Device stacks and the converter's host (numpy) stacks alike."""
  import jax.numpy as jnp
  rng = np.random.default_rng()
  layers = {"qkv": rng.normal(size=(3, 32, 2, 3, 8)).astype(np.float32), "o": rng.normal(size=(3, 4, 8, 32)),
            "attn_norm": np.ones((3, 32), np.float32)}
  layers = {k: np.asarray(v, np.float32) for k, v in layers.items()}
  for make in (jnp.asarray, np.asarray):
    out = Q.quantize_stacked({k: make(v) for k, v in layers.items()})
    assert sorted(out) == ["attn_norm", "o_fp8", "o_fp8_scale", "qkv_fp8", "qkv_fp8_scale"]
    for name, nk in (("qkv", 1), ("o", 2)):
      for i in range(3):
        w8, scale = Q.quantize_weight(jnp.asarray(layers[name][i]), nk)
        np.testing.assert_array_equal(np.asarray(out[name + "_fp8"][i]).view(np.uint8), np.asarray(w8).view(np.uint8))
        np.testing.assert_array_equal(np.asarray(out[name + "_fp8_scale"][i]), np.asarray(scale))


# --- the model against its unquantized self ----------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("fp8") / "llama3")
  hf_models.make_hf_model("llama3", d)
  return d


def _logits(model, ids):
  return np.asarray(model.forward(np.asarray(ids)), np.float64)


def _kl(p_logits, q_logits):
  p = np.exp(p_logits - p_logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  lq = q_logits - q_logits.max(-1, keepdims=True)
  lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
  lp = np.log(p)
  return float((p * (lp - lq)).sum(-1).mean())


PROMPTS = [[1, 17, 45, 200, 9, 31, 77, 5, 150, 260, 12, 3], [1, 300, 2, 90, 91, 92, 4, 4, 8, 100, 101, 7]]


def test_fp8_model_logits_kl_and_greedy_against_fp32(hf_llama):
  """Bounds (tiny random-weight model; e4m3 keeps 3 mantissa bits): logits relative error < 0.12, mean KL
  < 0.02 nats, and every greedy token within 0.05 of the fp32 model's best logit (near ties allowed)."""
  ref = nanoflow_jax.load_model(hf_llama, dtype="float32")
  q = nanoflow_jax.load_model(hf_llama, dtype="float32", quantization="fp8")
  assert q.params["layers_0"]["qkv_fp8"].dtype == np.dtype(F8) and "qkv_fp8_scale" in q.params["layers_0"]
  assert "qkv" not in q.params["layers_0"]   # one copy of the weights: the bf16 one is gone
  a, b = _logits(ref, PROMPTS), _logits(q, PROMPTS)
  rel = np.linalg.norm(a - b) / np.linalg.norm(a)
  kl = _kl(a, b)
  assert rel < 0.12, rel
  assert kl < 0.02, kl
  best = a.max(-1)
  picked = np.take_along_axis(a, b.argmax(-1)[..., None], -1)[..., 0]
  assert np.all(best - picked <= 0.05), (best - picked).max()
  assert rel > 1e-4   # (the fp8 path really ran)


def test_engine_runs_fp8_and_greedy_agrees_with_its_forward(hf_llama):
  from nanoflow_jax.llm import LLM
  from nanoflow_jax.sampling_params import SamplingParams
  llm = LLM(hf_llama, dtype="float32", dense_batch=64, num_pages=64, max_num_seqs=4, quantization="fp8")
  outs = llm.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), use_tqdm=False)
  for p, o in zip(PROMPTS, outs):   # the engine's paged, batched fp8 step = the model's plain fp8 forward
    ids = list(p)
    for t in o.outputs[0].token_ids:
      logits = _logits(llm.engine.model, [ids])[0, -1]
      assert logits.max() - logits[t] <= 1e-3
      ids.append(t)


# --- published FP8 checkpoints, built in-test --------------------------------------------------------------
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _fp8_checkpoint(src: str, dst: str, fmt: str, strategy: str = "tensor", static: bool = False):
  """`src` (a bf16/f32 HF checkpoint) re-saved as a published FP8 checkpoint: every dense linear's weight in
  F8_E4M3 with `weight_scale` (per tensor: shape []; per channel: [out, 1]), `input_scale` (shape []) where
  static; `input_scale_ub` [1] for fbgemm_fp8; config.json's quantization_config as the formats write it.
  Returns the dequantized weights {name: float32 [out, in]} the fp8 model must hold."""
  from safetensors.numpy import load_file
  shutil.copytree(src, dst)
  deq, where = {}, {}
  for f in glob.glob(os.path.join(dst, "*.safetensors")):
    tensors = {k: (v.astype(np.float32) if v.dtype != np.float32 else v) for k, v in load_file(f).items()}
    out = {}
    for k, v in tensors.items():
      mod = k[:-len(".weight")]
      if k.endswith(".weight") and mod.split(".")[-1] in LINEARS:
        amax = np.abs(v).max() if strategy == "tensor" else np.abs(v).max(axis=1, keepdims=True)
        s = (amax / 448).astype(np.float32)
        w8 = (v / s).astype(F8)
        out[k] = w8
        out[mod + ".weight_scale"] = np.asarray(s, np.float32).reshape(() if strategy == "tensor" else (-1, 1))
        deq[k] = w8.astype(np.float32) * s
        if static:
          out[mod + ".input_scale"] = np.asarray(0.05 + 0.01 * LINEARS.index(mod.split(".")[-1]), np.float32)
        if fmt == "fbgemm_fp8":
          out[mod + ".input_scale_ub"] = np.asarray([1200.0], np.float32)
      else:
        out[k] = v
    _save(out, f)
    where.update({k: os.path.basename(f) for k in out})
  index = os.path.join(dst, "model.safetensors.index.json")
  if os.path.exists(index):   # the index names every tensor, scales included
    with open(index) as fh:
      idx = json.load(fh)
    idx["weight_map"] = where
    with open(index, "w") as fh:
      json.dump(idx, fh)
  with open(os.path.join(dst, "config.json")) as fh:
    cfg = json.load(fh)
  if fmt == "compressed-tensors":
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": 1.5,
        "config_groups": {"group_0": {
            "targets": ["Linear"], "output_activations": None,
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy,
                        "group_size": None, "block_structure": None, "observer": "minmax"},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": not static,
                                  "strategy": "tensor" if static else "token", "observer": None}}}}
  else:
    cfg["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                  "modules_to_not_convert": ["lm_head"]}
  with open(os.path.join(dst, "config.json"), "w") as fh:
    json.dump(cfg, fh)
  return deq


def _save(tensors: dict, path: str) -> None:
  """safetensors as torch writes it (F8_E4M3 included: safetensors' numpy side has no float8)."""
  import torch
  from safetensors.torch import save_file
  conv = {k: (torch.from_numpy(np.ascontiguousarray(v).view(np.uint8)).view(torch.float8_e4m3fn)
              if v.dtype == F8 else torch.from_numpy(np.ascontiguousarray(v))) for k, v in tensors.items()}
  save_file(conv, path, metadata={"format": "pt"})


def _load(path: str) -> dict:
  import torch
  from safetensors.torch import load_file
  return {k: (v.view(torch.uint8).numpy().view(F8) if v.dtype == torch.float8_e4m3fn else v.numpy())
          for k, v in load_file(path).items()}


def _weights_of(model, cfg):
  """Our fp8 model's dequantized q_proj / gate_proj weights of layer 0, in HF's [out, in] layout."""
  p = model.params["layers_0"]
  qkv = np.asarray(p["qkv_fp8"]).astype(np.float32) * np.asarray(p["qkv_fp8_scale"])[..., None]  # [kv, g+2, hd, H]
  g = cfg.q_per_kv
  q = qkv[:, :g].reshape(-1, cfg.hidden_size)
  gu = np.asarray(p["gate_up_fp8"]).astype(np.float32) * np.asarray(p["gate_up_fp8_scale"])[..., None]
  return q, gu[0]


@pytest.mark.parametrize("fmt,strategy,static", [("compressed-tensors", "tensor", True),
                                                 ("compressed-tensors", "channel", False),
                                                 ("compressed-tensors", "tensor", False),
                                                 ("fbgemm_fp8", "channel", False)])
def test_published_fp8_checkpoints_load_exactly(hf_llama, tmp_path, fmt, strategy, static):
  d = str(tmp_path / "fp8")
  deq = _fp8_checkpoint(hf_llama, d, fmt, strategy, static)
  m = nanoflow_jax.load_model(d, dtype="float32")          # picked up from quantization_config
  cfg = m.config
  assert cfg.quantization.source == fmt and cfg.quantization.static_input_scales == static
  q, gate = _weights_of(m, cfg)
  np.testing.assert_array_equal(q, deq["model.layers.0.self_attn.q_proj.weight"])     # the e4m3 values as stored
  np.testing.assert_array_equal(gate, deq["model.layers.0.mlp.gate_proj.weight"])
  if static:   # one input scale per fused GEMM: the largest of its linears'
    assert float(m.params["layers_0"]["qkv_fp8_input_scale"]) == pytest.approx(0.07)   # v_proj's
  # against the dequantized weights in fp32 (no activation quantization): the error fp8 activations add
  ref = nanoflow_jax.load_model(hf_llama, dtype="float32")
  a, b = _logits(ref, PROMPTS), _logits(m, PROMPTS)
  assert np.linalg.norm(a - b) / np.linalg.norm(a) < (0.5 if static else 0.12)


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128}, "'awq' is not supported"),
    ({"quant_method": "gptq", "bits": 4}, "'gptq' is not supported"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}, "block-wise fp8"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}}, "pack-quantized"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"], "config_groups": {
        "g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                                 "group_size": 128, "symmetric": True, "dynamic": False}}}},
     "num_bits=4"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"], "config_groups": {
        "g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "block",
                                                 "symmetric": True, "dynamic": False}}}}, "strategy=block"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized",
      "ignore": ["lm_head", "model.layers.0.mlp.down_proj"], "config_groups": {}}, "unquantized"),
])
def test_schemes_we_cannot_run_exactly_are_refused_by_name(hf_llama, tmp_path, qc, match):
  d = str(tmp_path / "q")
  shutil.copytree(hf_llama, d)
  with open(os.path.join(d, "config.json")) as fh:
    cfg = json.load(fh)
  cfg["quantization_config"] = qc
  with open(os.path.join(d, "config.json"), "w") as fh:
    json.dump(cfg, fh)
  with pytest.raises(ValueError, match=match):
    nanoflow_jax.load_model(d, dtype="float32")


def test_missing_or_mismatched_scales_are_refused(hf_llama, tmp_path):
  from nanoflow_jax.checkpoint import CheckpointError
  for damage, match in (("drop", "k_proj.weight_scale' here but the file lacks it"),
                        ("shape", "k_proj.weight_scale.*shape"), ("bf16", "must store it as F8_E4M3")):
    d = str(tmp_path / damage)
    _fp8_checkpoint(hf_llama, d, "compressed-tensors", "channel")
    name = "model.layers.1.self_attn.k_proj.weight"
    for f in glob.glob(os.path.join(d, "*.safetensors")):
      t = _load(f)
      if name in t:
        if damage == "drop":
          del t[name + "_scale"]
        elif damage == "shape":
          t[name + "_scale"] = np.ones((3, 1), np.float32)
        else:
          t[name] = t[name].astype(np.float32)
        _save(t, f)
    with pytest.raises(CheckpointError, match=match):
      nanoflow_jax.load_model(d, dtype="float32")


def test_quantization_none_on_an_fp8_checkpoint_is_refused(hf_llama, tmp_path):
  d = str(tmp_path / "fp8")
  _fp8_checkpoint(hf_llama, d, "fbgemm_fp8", "channel")
  with pytest.raises(ValueError, match="runs as fp8"):
    nanoflow_jax.load_model(d, dtype="float32", quantization="none")


def test_fp8_memory_is_half_the_bf16_weights():
  bf16 = nanoflow_jax.load_model("tiny", dtype="bfloat16")
  fp8 = nanoflow_jax.load_model("tiny", dtype="bfloat16", quantization="fp8")
  size = lambda m: sum(x.nbytes for x in __import__("jax").tree.leaves(m.stacked_params()[1]))
  dense = sum(x.nbytes for k, x in bf16.stacked_params()[1].items() if k in Q.QUANTIZED)
  assert size(bf16) - size(fp8) >= 0.45 * dense


def test_converter_stores_fp8_and_the_engine_loads_it(hf_llama, tmp_path):
  """convert.py --quantization=fp8 stores the e4m3 weights and scales (orbax) with the scheme in nanoflow.json;
  loading them gives the same logits as quantizing at load. A published FP8 checkpoint converts as it is."""
  from checkpoints.convert import convert
  out = str(tmp_path / "ours")
  convert(hf_llama, out, dtype="float32", progress=False, quantization="fp8")
  with open(os.path.join(out, "nanoflow.json")) as fh:
    assert json.load(fh)["quantization"]["source"] == "dynamic"
  stored = nanoflow_jax.load_model(out, dtype="float32")
  assert stored.config.quantization is not None and "qkv_fp8" in stored.params["layers_0"]
  at_load = nanoflow_jax.load_model(hf_llama, dtype="float32", quantization="fp8")
  np.testing.assert_array_equal(_logits(stored, PROMPTS), _logits(at_load, PROMPTS))
  src = str(tmp_path / "published")
  _fp8_checkpoint(hf_llama, src, "compressed-tensors", "tensor", static=True)
  conv = str(tmp_path / "published-converted")
  convert(src, conv, dtype="float32", progress=False)
  np.testing.assert_array_equal(_logits(nanoflow_jax.load_model(conv, dtype="float32"), PROMPTS),
                                _logits(nanoflow_jax.load_model(src, dtype="float32"), PROMPTS))


def test_fp8_with_nanoflow_mode_and_an_fp8_kv_cache(hf_llama):
  """fp8 weights through the nano-batch split (the generic two-nano-batch plan) give the sequential step's
  tokens; with an fp8 KV cache too."""
  from nanoflow_jax.llm import LLM
  from nanoflow_jax.sampling_params import SamplingParams
  sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
  kw = dict(dtype="float32", dense_batch=64, num_pages=64, max_num_seqs=4, quantization="fp8")
  seq = [o.outputs[0].token_ids for o in LLM(hf_llama, **kw).generate(PROMPTS, sp, use_tqdm=False)]
  nf = [o.outputs[0].token_ids for o in LLM(hf_llama, mode="nanoflow", pipeline_config="generic", **kw).generate(
      PROMPTS, sp, use_tqdm=False)]
  assert nf == seq
  kv8 = LLM(hf_llama, kv_cache_dtype="fp8", **kw)
  assert str(kv8.engine.executor.kv[0].dtype) == "float8_e4m3fn"
  assert all(len(o.outputs[0].token_ids) == 6 for o in kv8.generate(PROMPTS, sp, use_tqdm=False))


def test_mixtral_fp8_quantizes_attention_and_keeps_the_experts(tmp_path):
  """The stated fallback for mixture-of-experts: qkv and o in fp8, the router and experts in the model's dtype
  (the grouped GEMM has no fp8 path); logits stay near the unquantized model's."""
  d = str(tmp_path / "mixtral")
  hf_models.make_hf_model("mixtral", d)
  q = nanoflow_jax.load_model(d, dtype="float32", quantization="fp8")
  layer = q.params["layers_0"]
  assert "qkv_fp8" in layer and "o_fp8" in layer and layer["experts_gate_up"].dtype == np.float32
  a, b = _logits(nanoflow_jax.load_model(d, dtype="float32"), PROMPTS), _logits(q, PROMPTS)
  assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.12
