"""checkpoints/convert.py: the round trip, and every bad-checkpoint case fails cleanly, leaving nothing."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import hf_models
import nanoflow_jax
from checkpoints.convert import ConvertError, convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("src") / "hf"
  hf_models.make_hf_model("llama3", str(d))
  return str(d)


@pytest.fixture
def broken(hf_dir, tmp_path):
  """A fresh copy of the good checkpoint to damage."""
  d = tmp_path / "broken"
  shutil.copytree(hf_dir, d)
  return str(d)


def _index(d):
  with open(os.path.join(d, "model.safetensors.index.json")) as f:
    return json.load(f)


def _file_of(d, tensor):
  return os.path.join(d, _index(d)["weight_map"][tensor])


def _rewrite(d, tensor, fn):
  """Rewrites the shard holding `tensor` with fn(dict of tensors) applied."""
  from safetensors.torch import load_file, save_file
  path = _file_of(d, tensor)
  tensors = load_file(path)
  fn(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def _assert_fails(src, out, match):
  with pytest.raises(ConvertError, match=match):
    convert(src, out, progress=False)
  assert not os.path.exists(out)
  assert not [f for f in os.listdir(os.path.dirname(out)) if ".partial-" in f]


def test_cli_converts_and_refuses_to_overwrite(hf_dir, tmp_path):
  out = tmp_path / "ckpt"
  cmd = [sys.executable, os.path.join(ROOT, "checkpoints", "convert.py"), f"--hf_dir={hf_dir}", f"--out_dir={out}"]
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  assert {"config.json", "nanoflow.json", "params", "tokenizer.json", "generation_config.json"} <= set(os.listdir(out))
  with open(out / "nanoflow.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"
  before = os.path.getmtime(out / "nanoflow.json")
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
  assert r.returncode != 0 and "--overwrite" in r.stderr
  assert os.path.getmtime(out / "nanoflow.json") == before
  r = subprocess.run(cmd + ["--overwrite", "--dtype=float32"], capture_output=True, text=True, cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  model = nanoflow_jax.load_model(str(out), dtype="float32")
  assert model.forward(np.array([[1, 2, 3]])).shape == (1, 3, hf_models.VOCAB)


def test_unsharded_checkpoint_without_index(tmp_path):
  d = tmp_path / "single"
  hf_models.make_hf_model("qwen2", str(d), shard_size="100MB")
  assert not os.path.exists(d / "model.safetensors.index.json")
  convert(str(d), str(tmp_path / "out"), progress=False)
  assert os.path.exists(tmp_path / "out" / "params")


def test_unknown_architecture(broken, tmp_path):
  with open(os.path.join(broken, "config.json")) as f:
    cfg = json.load(f)
  cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
  with open(os.path.join(broken, "config.json"), "w") as f:
    json.dump(cfg, f)
  _assert_fails(broken, str(tmp_path / "out"), "unknown architecture 'GPT2LMHeadModel'")


def test_missing_tensor(broken, tmp_path):
  name = "model.layers.1.mlp.up_proj.weight"
  _rewrite(broken, name, lambda t: t.pop(name))
  _assert_fails(broken, str(tmp_path / "out"), f"lacks it|missing tensor '{name}'")


def test_unexpected_tensor(broken, tmp_path):
  import torch
  name = "model.norm.weight"
  _rewrite(broken, name, lambda t: t.__setitem__("model.extra.weight", torch.zeros(3)))
  os.remove(os.path.join(broken, "model.safetensors.index.json"))  # so the file's own keys are read
  _assert_fails(broken, str(tmp_path / "out"), "unexpected tensor 'model.extra.weight'")


def test_wrong_shape(broken, tmp_path):
  import torch
  name = "model.layers.0.self_attn.k_proj.weight"
  _rewrite(broken, name, lambda t: t.__setitem__(name, torch.zeros(5, 64)))
  _assert_fails(broken, str(tmp_path / "out"), f"'{name}'.*shape \\(5, 64\\)")


def test_wrong_dtype(broken, tmp_path):
  import torch
  name = "model.norm.weight"
  _rewrite(broken, name, lambda t: t.__setitem__(name, torch.zeros(64, dtype=torch.int32)))
  _assert_fails(broken, str(tmp_path / "out"), f"'{name}'.*dtype int32")


def test_truncated_file(broken, tmp_path):
  path = _file_of(broken, "model.embed_tokens.weight")
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 100)
  _assert_fails(broken, str(tmp_path / "out"), f"{os.path.basename(path)}.*truncated")


def test_corrupt_header(broken, tmp_path):
  path = _file_of(broken, "model.norm.weight")
  with open(path, "r+b") as f:
    f.seek(8)
    f.write(b"\x00garbage")
  _assert_fails(broken, str(tmp_path / "out"), f"{os.path.basename(path)}.*corrupt")


def test_missing_shard_file(broken, tmp_path):
  path = _file_of(broken, "model.norm.weight")
  os.remove(path)
  _assert_fails(broken, str(tmp_path / "out"), f"{os.path.basename(path)}.*missing")


def test_failure_does_not_touch_existing_output(broken, tmp_path):
  out = tmp_path / "out"
  convert(broken, str(out), progress=False)
  os.remove(_file_of(broken, "model.norm.weight"))
  with pytest.raises(ConvertError):
    convert(broken, str(out), overwrite=True, progress=False)
  model = nanoflow_jax.load_model(str(out), dtype="float32")  # the old one is intact
  assert model.forward(np.array([[4, 5]])).shape == (1, 2, hf_models.VOCAB)


def test_named_shapes_need_random_weights():
  with pytest.raises(ValueError, match="random_weights"):
    nanoflow_jax.load_model("llama-3-8b")
  with pytest.raises(ValueError, match="neither a model directory nor a named shape"):
    nanoflow_jax.load_model("no-such-model")


def test_format_2_stores_the_layer_stack_and_format_1_still_loads(hf_dir, tmp_path):
  """Converted checkpoints hold the layers stacked (what the engine runs, restored without a per-layer
  copy); a format-1 checkpoint (per-layer arrays, earlier builds) loads to the same model; others are
  refused."""
  import jax
  from nanoflow_jax import checkpoint
  out = tmp_path / "v2"
  convert(hf_dir, str(out), dtype="float32", progress=False)
  with open(out / "nanoflow.json") as f:
    assert json.load(f)["format_version"] == 2
  ids = np.array([[1, 2, 3, 9]])
  want = np.asarray(nanoflow_jax.load_model(hf_dir, dtype="float32").forward(ids))
  model = nanoflow_jax.load_model(str(out), dtype="float32")
  top, layers = model.stacked_params()
  cfg = model.config
  assert all(w.shape[0] == cfg.num_layers for w in jax.tree.leaves(layers)) and "embed" in str(list(top))
  np.testing.assert_allclose(np.asarray(model.forward(ids)), want, rtol=1e-5, atol=1e-5)

  old = tmp_path / "v1"                       # what format 1 wrote: the per-layer tree
  shutil.copytree(out, old, ignore=shutil.ignore_patterns("params"))
  checkpoint.save_params(str(old / "params"), {k: v for k, v in model.params.items()})
  with open(old / "nanoflow.json") as f:
    meta = json.load(f)
  with open(old / "nanoflow.json", "w") as f:
    json.dump({**meta, "format_version": 1}, f)
  np.testing.assert_allclose(np.asarray(nanoflow_jax.load_model(str(old), dtype="float32").forward(ids)), want,
                             rtol=1e-5, atol=1e-5)
  with open(old / "nanoflow.json", "w") as f:
    json.dump({**meta, "format_version": 99}, f)
  with pytest.raises(checkpoint.CheckpointError, match="format 99"):
    nanoflow_jax.load_model(str(old), dtype="float32")



@pytest.mark.parametrize("where", ["same", "parent"])
def test_overwrite_never_deletes_the_source(broken, where):
  """out_dir = the source, or a directory holding it: refused before anything is touched (with --overwrite
  the old code renamed the source away and deleted it)."""
  out = broken if where == "same" else os.path.dirname(broken)
  before = sorted(os.listdir(broken))
  with pytest.raises(ConvertError, match="is or contains the source"):
    convert(broken, out, overwrite=True, progress=False)
  assert sorted(os.listdir(broken)) == before
  assert not [f for f in os.listdir(os.path.dirname(out)) if ".partial-" in f or ".old-" in f]


def test_nan_or_inf_weights_are_refused_by_name(broken, tmp_path):
  import torch
  name = "model.layers.1.self_attn.o_proj.weight"

  def poison(t):
    w = t[name].clone()
    w[3, 5] = float("nan")
    w[0, 0] = float("inf")
    t[name] = w
  _rewrite(broken, name, poison)
  _assert_fails(broken, str(tmp_path / "out"), "o.*2 NaN or Inf")


def test_a_killed_run_leaves_nothing_for_long(hf_dir, tmp_path):
  """A converter killed mid-run (SIGKILL: no clean-up) leaves its hidden partial directory; the next run for
  the same out_dir removes it, but not one whose owner is still running."""
  import signal
  import time
  out = tmp_path / "out"
  cmd = [sys.executable, os.path.join(ROOT, "checkpoints", "convert.py"), f"--hf_dir={hf_dir}", f"--out_dir={out}"]
  proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  partials = lambda: [f for f in os.listdir(tmp_path) if ".partial-" in f]
  deadline = time.time() + 120
  while not partials() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  if not partials():   # it finished (or never started) before the kill: make a dead run's directory by hand
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.makedirs(tmp_path / ".out.partial-dead")
    with open(tmp_path / ".out.partial-dead" / ".owner", "w") as f:
      f.write(f"{__import__('socket').gethostname()} {dead.pid}")
  live = tmp_path / ".out.partial-live"     # a run still going (this process): kept
  os.makedirs(live)
  with open(live / ".owner", "w") as f:
    f.write(f"{__import__('socket').gethostname()} {os.getpid()}")
  assert len(partials()) >= 2
  convert(hf_dir, str(out), overwrite=True, progress=False)
  assert partials() == [live.name]
  assert os.path.exists(out / "params")


def test_outputs_follow_the_umask(hf_dir, tmp_path):
  old = os.umask(0o022)
  try:
    convert(hf_dir, str(tmp_path / "out"), progress=False)
  finally:
    os.umask(old)
  assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o755
  assert os.stat(tmp_path / "out" / "config.json").st_mode & 0o077 != 0
