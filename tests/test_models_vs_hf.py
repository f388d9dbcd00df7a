"""Our Flax models, loaded from a converted checkpoint, against transformers on the same weights."""
import json
import os

import numpy as np
import pytest
import torch

import hf_models
import nanoflow_jax
from checkpoints.convert import convert
from nanoflow_jax import config as config_lib

ARCHS = list(hf_models.ARCHS)
# fp32 on both sides; differences are summation order only.
ATOL = 2e-4


@pytest.fixture(scope="module", params=ARCHS)
def converted(request, tmp_path_factory):
  arch = request.param
  root = tmp_path_factory.mktemp(arch)
  hf = hf_models.make_hf_model(arch, str(root / "hf"))
  convert(str(root / "hf"), str(root / "ckpt"), dtype="float32", progress=False)
  return arch, hf, str(root / "hf"), str(root / "ckpt")


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def test_logits_match_transformers(converted):
  arch, hf, _, ckpt = converted
  model = nanoflow_jax.load_model(ckpt, dtype="float32")
  rng = np.random.default_rng(1)
  ids = rng.integers(0, hf_models.VOCAB, size=(3, 40))  # 40 > mistral's sliding window of 12
  ours = np.asarray(model.forward(ids))
  ref = _hf_logits(hf, ids)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_padded_batch_matches_unpadded(converted):
  _, hf, _, ckpt = converted
  model = nanoflow_jax.load_model(ckpt, dtype="float32")
  ids = np.random.default_rng(2).integers(0, hf_models.VOCAB, size=(2, 16))
  lengths = np.array([16, 9])
  ours = np.asarray(model.forward(ids, lengths))
  np.testing.assert_allclose(ours[1, :9], _hf_logits(hf, ids[1:, :9])[0], atol=ATOL, rtol=0)


def test_greedy_continuation_matches_transformers(converted):
  _, hf, _, ckpt = converted
  model = nanoflow_jax.load_model(ckpt, dtype="float32")
  prompt = np.random.default_rng(3).integers(0, hf_models.VOCAB, size=(1, 7))
  with torch.no_grad():
    ref = hf.generate(torch.tensor(prompt), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                      pad_token_id=0)[0, 7:].tolist()
  seq = prompt[0].tolist()
  for _ in range(12):
    seq.append(int(np.argmax(np.asarray(model.forward(np.array([seq])))[0, -1])))
  assert seq[7:] == ref


def test_hf_directory_loads_directly_and_bf16_is_close(converted):
  _, hf, hf_dir, ckpt = converted
  ids = np.random.default_rng(4).integers(0, hf_models.VOCAB, size=(1, 20))
  direct = np.asarray(nanoflow_jax.load_model(hf_dir, dtype="float32").forward(ids))
  np.testing.assert_allclose(direct, _hf_logits(hf, ids), atol=ATOL, rtol=0)
  bf16 = np.asarray(nanoflow_jax.load_model(ckpt, dtype="bfloat16").forward(ids))
  # bf16 activations: a loose bound, but far below the logits' spread.
  assert np.max(np.abs(bf16 - direct)) < 0.05 * np.max(np.abs(direct)) + 0.05


def test_transformers4_style_config_reads_the_same(converted):
  _, _, hf_dir, _ = converted
  with open(os.path.join(hf_dir, "config.json")) as f:
    d = json.load(f)
  v5 = config_lib.from_hf_dict(d)
  rope = d.pop("rope_parameters")
  d["rope_theta"] = rope.pop("rope_theta")
  if rope.get("rope_type", "default") != "default":
    d["rope_scaling"] = {"type" if "factor" in rope and rope["rope_type"] == "linear" else "rope_type":
                         rope["rope_type"], **{k: v for k, v in rope.items() if k != "rope_type"}}
  assert config_lib.from_hf_dict(d) == v5
