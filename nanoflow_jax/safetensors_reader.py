"""Zero-copy reading of `.safetensors` files as numpy memmaps, bf16 included.

The safetensors library's numpy mode refuses bf16 and its flax mode places every tensor on the default
device; we want host memmaps that a loader can slice and place shard by shard (tensor parallelism).
The format is an 8-byte little-endian header length, a JSON header, then the raw little-endian data.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsError(ValueError):
  pass


class SafetensorsFile:
  """The tensors of one file, read lazily: `keys()`, `shape(name)`, `dtype(name)`, `get(name)`."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise SafetensorsError(f"{path}: truncated (no header)")
      (n,) = struct.unpack("<Q", raw)
      if n > size - 8:
        raise SafetensorsError(f"{path}: truncated or corrupt (header of {n} bytes in a {size}-byte file)")
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupt header ({e})") from None
    self._data_start = 8 + n
    header.pop("__metadata__", None)
    self._meta = header
    data_len = size - self._data_start
    for name, m in header.items():
      try:
        begin, end = m["data_offsets"]
        dtype = DTYPES[m["dtype"]]
        shape = tuple(m["shape"])
      except KeyError as e:
        raise SafetensorsError(f"{path}: tensor {name!r} has a bad header entry ({e})") from None
      if end > data_len:
        raise SafetensorsError(f"{path}: truncated: tensor {name!r} ends at byte {end} of {data_len}")
      if end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
        raise SafetensorsError(f"{path}: tensor {name!r} size does not match its shape {shape}")
    self._mmap = np.memmap(path, dtype=np.uint8, mode="r") if size else None

  def keys(self):
    return self._meta.keys()

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._meta[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return np.dtype(DTYPES[self._meta[name]["dtype"]])

  def get(self, name: str) -> np.ndarray:
    m = self._meta[name]
    begin, end = m["data_offsets"]
    buf = self._mmap[self._data_start + begin:self._data_start + end]
    return buf.view(DTYPES[m["dtype"]]).reshape(m["shape"])


def open_checkpoint_dir(path: str) -> dict[str, SafetensorsFile]:
  """Maps every tensor name of an HF model directory to the file holding it.

  Uses `model.safetensors.index.json` when present (and checks each listed file exists and holds the
  tensors the index says); otherwise every `*.safetensors` file in the directory.
  """
  index = os.path.join(path, "model.safetensors.index.json")
  files: dict[str, SafetensorsFile] = {}
  where: dict[str, SafetensorsFile] = {}
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise SafetensorsError(f"{index}: corrupt index ({e})") from None
    for name, fname in weight_map.items():
      fpath = os.path.join(path, fname)
      if fname not in files:
        if not os.path.exists(fpath):
          raise SafetensorsError(f"{fpath}: listed in the index but missing")
        files[fname] = SafetensorsFile(fpath)
      if name not in files[fname].keys():
        raise SafetensorsError(f"{fpath}: the index lists tensor {name!r} here but the file lacks it")
      where[name] = files[fname]
    return where
  names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not names:
    raise SafetensorsError(f"no *.safetensors files in {path}")
  for fname in names:
    sf = SafetensorsFile(os.path.join(path, fname))
    for name in sf.keys():
      if name in where:
        raise SafetensorsError(f"tensor {name!r} is in both {where[name].path} and {sf.path}")
      where[name] = sf
  return where
