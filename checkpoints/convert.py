"""Hugging Face checkpoint directory -> nanoflow-jax (orbax) checkpoint directory.

  python checkpoints/convert.py --hf_dir=SRC --out_dir=DST [--dtype=bfloat16] [--overwrite]

DST holds `params/` (orbax), the source's config.json, generation_config.json and tokenizer files, and
`nanoflow.json` (format version, dtype). The whole checkpoint is validated before anything is written;
DST is built in a temporary directory beside it and renamed into place only when complete, so a
failure leaves no DST behind, and a killed run's temporary directory is removed by the next run (each holds
its owner's pid). Every weight must be finite: a NaN or Inf is refused with the tensor's name. DST may not
be, or contain, the source (--overwrite would delete it). Outputs get the process's umask. The weight layout
changes are listed in nanoflow_jax/checkpoint.py.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import socket
import sys
import tempfile

import numpy as np

if __package__ in (None, ""):  # run as a script: make the project importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from nanoflow_jax import checkpoint, config as config_lib, layer_stack, tokenizer as tokenizer_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "Hugging Face model directory (config.json, *.safetensors, tokenizer).")
flags.DEFINE_string("out_dir", None, "Destination checkpoint directory.")
flags.DEFINE_string("dtype", "bfloat16", "Parameter dtype stored: bfloat16, float16 or float32.")
flags.DEFINE_bool("overwrite", False, "Replace an existing out_dir.")
flags.DEFINE_enum("quantization", None, ["fp8"], "Store the dense layers' weights in fp8 (e4m3, a scale per output "
                  "channel; activations per token at run time). An FP8 source checkpoint is stored as it is.")


class ConvertError(Exception):
  pass


OWNER_FILE = ".owner"   # in a temporary directory: "host pid" of the run that made it


def _is_within(path: str, root: str) -> bool:
  path, root = os.path.realpath(path), os.path.realpath(root)
  return os.path.commonpath([path, root]) == root


def _owner_alive(tmp: str) -> bool:
  try:
    with open(os.path.join(tmp, OWNER_FILE)) as f:
      host, pid = f.read().split()
  except (OSError, ValueError):
    return False   # no owner written: killed at once, or made by an older version
  if host != socket.gethostname():
    return True    # another machine's run (a shared file system): not ours to judge
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_partials(out_dir: str) -> list[str]:
  """Removes the temporary directories that killed runs for `out_dir` left beside it; returns them."""
  parent, base = os.path.dirname(out_dir), os.path.basename(out_dir)
  stale = [d for pattern in (f".{base}.partial-*", f".{base}.old-*")
           for d in glob.glob(os.path.join(glob.escape(parent), pattern)) if os.path.isdir(d) and not _owner_alive(d)]
  for d in stale:
    shutil.rmtree(d, ignore_errors=True)
  return stale


def _make_temp(out_dir: str, kind: str) -> str:
  d = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.{kind}-", dir=os.path.dirname(out_dir))
  with open(os.path.join(d, OWNER_FILE), "w") as f:
    f.write(f"{socket.gethostname()} {os.getpid()}")
  return d


def _umask_mode() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return 0o777 & ~mask


def _check_finite(path, arr: np.ndarray) -> None:
  if arr.dtype.kind == "f" or arr.dtype.name in ("bfloat16", "float16"):
    finite = np.isfinite(arr.astype(np.float32) if arr.dtype.name == "bfloat16" else arr)
    if not finite.all():
      bad = int(arr.size - finite.sum())
      raise ConvertError(f"tensor {'.'.join(map(str, path))} has {bad} NaN or Inf value(s) of {arr.size}; refusing "
                         "to convert a broken checkpoint")


def convert(hf_dir: str, out_dir: str, dtype: str = "bfloat16", overwrite: bool = False,
            progress: bool = True, quantization: str | None = None) -> None:
  out_dir = os.path.abspath(out_dir)
  if not os.path.isdir(hf_dir):
    raise ConvertError(f"{hf_dir} is not a directory")
  if _is_within(hf_dir, out_dir):
    raise ConvertError(f"out_dir {out_dir} is or contains the source {os.path.abspath(hf_dir)}: choose another "
                       "directory (replacing it would delete the source)")
  if os.path.exists(out_dir) and not overwrite:
    raise ConvertError(f"{out_dir} exists; pass --overwrite to replace it")
  try:
    cfg = config_lib.load_hf_config(hf_dir)
    np_dtype = checkpoint.parse_dtype(dtype)
    tokenizer_lib.load_tokenizer(hf_dir)  # a checkpoint whose tokenizer we cannot read is not servable
  except (config_lib.ConfigError, tokenizer_lib.TokenizerError, ValueError) as e:
    raise ConvertError(str(e)) from None

  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  for d in remove_stale_partials(out_dir):
    print(f"removed {d}, left by a run that did not finish", file=sys.stderr)
  tmp = _make_temp(out_dir, "partial")
  try:
    # Stored with the layers stacked (format 2): the engine restores the stack it runs directly.
    stack = layer_stack.LayerStack(cfg.num_layers)
    items = checkpoint.iter_hf_params(hf_dir, cfg, np_dtype)
    if progress:
      from tqdm import tqdm
      items = tqdm(items, total=sum(1 for _ in checkpoint.hf_layout(cfg)), desc="converting", unit="tensor")
    for path, arr in items:
      _check_finite(path, arr)
      stack.put(path, arr)
    top, layers = stack.result()
    quant = cfg.quantization
    if quantization == "fp8" and quant is None:   # our own: per-channel e4m3 from the bf16/fp16 weights
      from nanoflow_jax import quantization as quant_lib
      layers = quant_lib.quantize_stacked(layers)
      quant = config_lib.Quantization()
    checkpoint.save_params(os.path.join(tmp, checkpoint.PARAMS_DIR), {"top": top, "layers": layers})
    for name in ("config.json", *tokenizer_lib.TOKENIZER_FILES):
      src = os.path.join(hf_dir, name)
      if os.path.exists(src):
        shutil.copy2(src, os.path.join(tmp, name))
    with open(os.path.join(tmp, checkpoint.META_FILE), "w") as f:
      json.dump({"format_version": checkpoint.FORMAT_VERSION, "dtype": np_dtype.name,
                 "model_type": cfg.model_type, "source": os.path.abspath(hf_dir),
                 "quantization": dataclasses.asdict(quant) if quant is not None else None}, f, indent=2)
    os.remove(os.path.join(tmp, OWNER_FILE))
    os.chmod(tmp, _umask_mode())   # mkdtemp makes it 0700
    if os.path.exists(out_dir):  # --overwrite: swap only once the new one is complete
      old = _make_temp(out_dir, "old")
      os.rename(out_dir, os.path.join(old, "x"))
      os.rename(tmp, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out_dir)
  except checkpoint.CheckpointError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise ConvertError(str(e)) from None
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def main(argv):
  del argv
  if not FLAGS.hf_dir or not FLAGS.out_dir:
    print("error: --hf_dir and --out_dir are required", file=sys.stderr)
    return 2
  try:
    convert(FLAGS.hf_dir, FLAGS.out_dir, FLAGS.dtype, FLAGS.overwrite, quantization=FLAGS.quantization)
  except ConvertError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {os.path.abspath(FLAGS.out_dir)}")
  return 0


if __name__ == "__main__":
  app.run(main)
