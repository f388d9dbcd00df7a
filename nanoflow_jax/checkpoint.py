"""Weights: Hugging Face safetensors -> our parameter tree, orbax checkpoints, and `load_model`.

Layout changes made to Hugging Face weights (torch Linear stores [out, in]; we multiply x @ W[in, out]):
  q/k/v_proj [heads*hd, hidden] -> transposed and grouped per KV head: qkv [hidden, kv, q_per_kv+2, hd]
      (query heads h = kv*q_per_kv + j, the GQA mapping transformers uses; one GEMM for all three)
  q/k/v biases (Qwen2)        -> qkv_bias [kv, q_per_kv+2, hd], the same grouping
  o_proj [hidden, heads*hd]   -> o [heads, hd, hidden]
  gate_proj, up_proj [I, hidden] -> gate_up [hidden, 2, I] (one GEMM; TP shards the last axis)
  down_proj [hidden, I]       -> down [I, hidden]
  Mixtral gate [E, hidden] -> router [hidden, E]; experts.e.w1/w3 -> experts_gate_up [E, hidden, 2, I];
      experts.e.w2 -> experts_down [E, I, hidden]
  lm_head [vocab, hidden]     -> lm_head [hidden, vocab]; absent when tie_word_embeddings
Norm weights and the embedding keep their layout.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from nanoflow_jax import config as config_lib, layer_stack
from nanoflow_jax.config import ModelConfig
from nanoflow_jax.safetensors_reader import SafetensorsError, open_checkpoint_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 2          # 2: layers stored stacked ({'top', 'layers'}); 1: per-layer arrays
READABLE_VERSIONS = (1, 2)
META_FILE = "nanoflow.json"
PARAMS_DIR = "params"
FLOAT_DTYPES = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(jnp.bfloat16)}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "input_scale_ub")   # fbgemm_fp8: the config's activation_scale_ub rules  # buffers some old checkpoints carry; we recompute them

Params = dict[str, Any]
ShardingFn = Callable[[tuple[str, ...], tuple[int, ...]], jax.sharding.Sharding]


class CheckpointError(ValueError):
  """A checkpoint we cannot load; the message names the tensor or file."""


def parse_dtype(dtype) -> jnp.dtype:
  names = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "fp32": jnp.float32,
           "float16": jnp.float16, "fp16": jnp.float16}
  if isinstance(dtype, str):
    if dtype not in names:
      raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return jnp.dtype(names[dtype])
  return jnp.dtype(dtype)


# --- Hugging Face name map ------------------------------------------------------------------------
def _t(x):
  return np.ascontiguousarray(x.T)


def hf_layout(cfg: ModelConfig) -> Iterator[tuple[tuple[str, ...], list[tuple[str, tuple[int, ...]]], Callable]]:
  """For each of our parameters: its path, the HF tensors (name, expected shape) it is built from, and
  the function that builds it from those tensors (numpy in, numpy out)."""
  h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  nq, nkv, g = cfg.num_heads, cfg.num_kv_heads, cfg.q_per_kv

  def qkv(q, k, v):
    return np.concatenate([_t(q).reshape(h, nkv, g, hd), _t(k).reshape(h, nkv, 1, hd),
                           _t(v).reshape(h, nkv, 1, hd)], axis=2)

  def qkv_bias(q, k, v):
    return np.concatenate([q.reshape(nkv, g, hd), k.reshape(nkv, 1, hd), v.reshape(nkv, 1, hd)], axis=1)

  yield ("embedding",), [("model.embed_tokens.weight", (cfg.vocab_size, h))], lambda x: x
  for layer in range(cfg.num_layers):
    p = f"model.layers.{layer}."
    name = f"layers_{layer}"
    yield (name, "input_norm"), [(p + "input_layernorm.weight", (h,))], lambda x: x
    yield (name, "post_attention_norm"), [(p + "post_attention_layernorm.weight", (h,))], lambda x: x
    a = p + "self_attn."
    yield (name, "qkv"), [(a + "q_proj.weight", (nq * hd, h)), (a + "k_proj.weight", (nkv * hd, h)),
                          (a + "v_proj.weight", (nkv * hd, h))], qkv
    if cfg.qkv_bias:
      yield (name, "qkv_bias"), [(a + "q_proj.bias", (nq * hd,)), (a + "k_proj.bias", (nkv * hd,)),
                                 (a + "v_proj.bias", (nkv * hd,))], qkv_bias
    yield (name, "o"), [(a + "o_proj.weight", (h, nq * hd))], lambda x: _t(x).reshape(nq, hd, h)
    if cfg.is_moe:
      m = p + "block_sparse_moe."
      e_range = range(cfg.num_experts)
      yield (name, "router"), [(m + "gate.weight", (cfg.num_experts, h))], _t
      yield (name, "experts_gate_up"), [
          (m + f"experts.{e}.{w}.weight", (i, h)) for e in e_range for w in ("w1", "w3")
      ], lambda *ws: np.stack([np.stack([_t(ws[2 * e]), _t(ws[2 * e + 1])], axis=1) for e in e_range])
      yield (name, "experts_down"), [(m + f"experts.{e}.w2.weight", (h, i)) for e in e_range
                                     ], lambda *ws: np.stack([_t(w) for w in ws])
    else:
      m = p + "mlp."
      yield (name, "gate_up"), [(m + "gate_proj.weight", (i, h)), (m + "up_proj.weight", (i, h))
                                ], lambda gt, up: np.stack([_t(gt), _t(up)], axis=1)
      yield (name, "down"), [(m + "down_proj.weight", (h, i))], _t
  if cfg.quantization is not None and cfg.quantization.source != "dynamic":
    yield from _fp8_scales_layout(cfg)
  yield ("final_norm",), [("model.norm.weight", (h,))], lambda x: x
  if not cfg.tie_word_embeddings:
    yield ("lm_head",), [("lm_head.weight", (cfg.vocab_size, h))], _t


def iter_hf_params(hf_dir: str, cfg: ModelConfig, dtype) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """Yields (path, host array in `dtype`) for every parameter, after checking the whole checkpoint:
  every expected tensor present with its shape and a floating dtype, and no unexpected tensor."""
  try:
    where = open_checkpoint_dir(hf_dir)
  except SafetensorsError as e:
    raise CheckpointError(str(e)) from None
  layout = list(hf_layout(cfg))
  expected = {}
  for _, sources, _ in layout:
    expected.update(sources)
  missing = [n for n in expected if n not in where]
  if missing:
    raise CheckpointError(f"missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                              else ""))
  unexpected = [n for n in where if n not in expected and not n.endswith(IGNORED_SUFFIXES)
                and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
  if unexpected:
    raise CheckpointError(f"unexpected tensor {unexpected[0]!r} in {where[unexpected[0]].path}"
                          + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
  fp8 = cfg.quantization is not None and cfg.quantization.source != "dynamic"
  if fp8 and cfg.is_moe:
    raise CheckpointError("fp8 checkpoints of mixture-of-experts models are not supported: the experts' grouped "
                          "GEMM has no fp8 path (quantization='fp8' on a bf16 checkpoint quantizes attention only)")
  for name, shape in expected.items():
    f = where[name]
    if not _shape_ok(f.shape(name), shape):
      raise CheckpointError(f"tensor {name!r} in {f.path} has shape {f.shape(name)}, expected "
                            f"{'() or (1,)' if shape == SCALAR else shape}")
    want_fp8 = fp8 and _is_fp8_weight(cfg, name)
    if want_fp8 and f.dtype(name) != np.dtype(ml_dtypes.float8_e4m3fn):
      raise CheckpointError(f"tensor {name!r} in {f.path} has dtype {f.dtype(name)}; this fp8 checkpoint "
                            f"({cfg.quantization.source}) must store it as F8_E4M3")
    if not want_fp8 and f.dtype(name) not in FLOAT_DTYPES:
      raise CheckpointError(f"tensor {name!r} in {f.path} has dtype {f.dtype(name)}, expected a float type")
  from nanoflow_jax import quantization
  for path, sources, build in layout:
    arrays = [where[n].get(n) for n, _ in sources]
    out = np.asarray(build(*arrays))
    if fp8 and path[-1] in quantization.QUANTIZED:   # the checkpoint's e4m3 values, as they are, K-major
      name = path[-1]
      yield (*path[:-1], quantization.fp8_name(name)), np.ascontiguousarray(
          quantization.to_fp8_layout(out, quantization.QUANTIZED[name]))
    elif path[-1].endswith("_scale"):
      yield path, out.astype(np.float32)
    else:
      yield path, out.astype(dtype)


def _place(path, arr, sharding_fn: ShardingFn | None):
  if sharding_fn is None:
    return jnp.asarray(arr)
  sharding = sharding_fn(path, arr.shape)
  # Each device receives only its own slice of the host array: nothing is gathered on one device.
  return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def load_hf_params(hf_dir: str, cfg: ModelConfig, dtype, sharding_fn: ShardingFn | None = None,
                   progress: bool = False) -> tuple[Params, Params]:
  """(top-level tree, layers stacked on a leading axis), each layer written into the stack as it loads
  (layer_stack.py says why)."""
  stack = layer_stack.LayerStack(cfg.num_layers)
  items = iter_hf_params(hf_dir, cfg, parse_dtype(dtype))
  if progress:
    from tqdm import tqdm
    items = tqdm(items, total=sum(1 for _ in hf_layout(cfg)), desc="loading", unit="tensor")
  for path, arr in items:
    stack.put(path, _place(path, arr, sharding_fn))
  return stack.result()


SCALAR = "scalar"   # an expected shape: () or (1,), as per-tensor scales are stored either way


def _linears(cfg: ModelConfig, layer: int) -> dict[str, list[tuple[str, int]]]:
  """Our quantized weight -> its Hugging Face linears (module name, output channels), in our order."""
  h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  a, m = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."
  return {"qkv": [(a + "q_proj", cfg.num_heads * hd), (a + "k_proj", cfg.num_kv_heads * hd),
                  (a + "v_proj", cfg.num_kv_heads * hd)],
          "o": [(a + "o_proj", h)],
          "gate_up": [(m + "gate_proj", i), (m + "up_proj", i)],
          "down": [(m + "down_proj", h)]}


def _fp8_scales_layout(cfg: ModelConfig):
  """A published FP8 checkpoint's scales, laid out as ours: each weight's scale per output channel (a
  per-tensor scale repeated over its channels, exact), and the static input scales (one per fused GEMM: the
  largest of its linears', as their shared input is quantized once)."""
  from nanoflow_jax import quantization
  q = cfg.quantization
  nkv, g, hd = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim
  shape = SCALAR if q.weight_strategy == "tensor" else None

  def channels(s, n):
    s = np.asarray(s, np.float32).reshape(-1)
    return np.broadcast_to(s, (n,)) if s.size == 1 else s

  def qkv(qs, ks, vs):
    return np.concatenate([channels(qs, nkv * g * hd).reshape(nkv, g, hd), channels(ks, nkv * hd).reshape(nkv, 1, hd),
                           channels(vs, nkv * hd).reshape(nkv, 1, hd)], axis=1)

  build = {"qkv": qkv,
           "o": lambda s: channels(s, cfg.hidden_size),
           "gate_up": lambda gs, us: np.stack([channels(gs, cfg.intermediate_size),
                                               channels(us, cfg.intermediate_size)]),
           "down": lambda s: channels(s, cfg.hidden_size)}
  for layer in range(cfg.num_layers):
    for name, linears in _linears(cfg, layer).items():
      yield ((f"layers_{layer}", quantization.scale_name(name)),
             [(mod + ".weight_scale", shape or (n, 1)) for mod, n in linears], build[name])
      if q.static_input_scales:
        yield ((f"layers_{layer}", quantization.input_scale_name(name)),
               [(mod + ".input_scale", SCALAR) for mod, _ in linears],
               lambda *ss: np.float32(max(float(np.asarray(x).reshape(-1)[0]) for x in ss)))


def _shape_ok(got: tuple, want) -> bool:
  return got in ((), (1,)) if want == SCALAR else tuple(got) == tuple(want)


def _is_fp8_weight(cfg: ModelConfig, name: str) -> bool:
  """Whether HF tensor `name` is one a published FP8 checkpoint stores in e4m3 (the dense layers' linears)."""
  return name.endswith("_proj.weight") and (".self_attn." in name or ".mlp." in name)


# --- orbax ----------------------------------------------------------------------------------------
def save_params(path: str, params: Params) -> None:
  import orbax.checkpoint as ocp
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(path), params)
  ckptr.wait_until_finished()


def _abstract_params(cfg: ModelConfig, dtype) -> Params:
  from nanoflow_jax.models.transformer import Transformer
  shapes = jax.eval_shape(lambda: Transformer(cfg, dtype).init(jax.random.PRNGKey(0),
                                                               jnp.zeros((1, 1), jnp.int32))["params"])

  def leaf(path, s):   # fp8 weights and their scales keep their own types (quantization.py)
    name = path[-1].key
    kind = (jnp.float8_e4m3fn if name.endswith("_fp8") else jnp.float32 if "_fp8_" in name else dtype)
    return jax.ShapeDtypeStruct(s.shape, kind)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _with_shardings(abstract: Params, sharding_fn: ShardingFn | None) -> Params:
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def leaf(path, s):
    names = tuple(p.key for p in path)
    sharding = sharding_fn(names, s.shape) if sharding_fn else device
    return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
  return jax.tree_util.tree_map_with_path(leaf, abstract)


def _stacked_target(per_layer: Params, num_layers: int) -> dict:
  """The format-2 tree {"top", "layers"} of abstract arrays from the per-layer one: layer 0's leaves with
  a leading layer axis and layer 0's sharding over the rest."""
  def stacked(s):
    return jax.ShapeDtypeStruct((num_layers, *s.shape), s.dtype, sharding=layer_stack.stacked_sharding(s.sharding))
  return {"top": {k: v for k, v in per_layer.items() if not k.startswith("layers_")},
          "layers": jax.tree.map(stacked, per_layer["layers_0"])}


def load_orbax_params(ckpt_dir: str, cfg: ModelConfig, dtype, sharding_fn: ShardingFn | None = None):
  """(top-level tree, layers stacked), restored straight into device arrays laid out by `sharding_fn`
  (default: the first device). Format 2 stores the stack; format 1 (per-layer arrays) is restored and
  stacked after, which leaves their room free below the stack (re-convert to avoid it)."""
  import orbax.checkpoint as ocp
  version = read_meta(ckpt_dir)["format_version"]
  per_layer = _with_shardings(_abstract_params(cfg, parse_dtype(dtype)), sharding_fn)
  target = _stacked_target(per_layer, cfg.num_layers) if version >= 2 else per_layer
  ckptr = ocp.StandardCheckpointer()
  try:
    restored = ckptr.restore(os.path.abspath(os.path.join(ckpt_dir, PARAMS_DIR)), target)
  except (ValueError, FileNotFoundError, KeyError) as e:
    raise CheckpointError(f"cannot restore {ckpt_dir}: {e}") from None
  if version >= 2:
    return restored["top"], restored["layers"]
  log.warning("%s: a format-1 checkpoint (per-layer arrays); re-convert it to load the layer stack directly",
              ckpt_dir)
  stack = layer_stack.LayerStack(cfg.num_layers)
  for path, value in jax.tree_util.tree_flatten_with_path(restored)[0]:
    stack.put(tuple(p.key for p in path), value)
  return stack.result()


def random_params(cfg: ModelConfig, dtype, seed: int = 0, sharding_fn: ShardingFn | None = None,
                  stacked: bool = False):
  """Random weights of the model's shape, as transformers initializes them: norms one, biases zero, the
  rest normal(INIT_STD). Drawn leaf by leaf straight from the shapes: running the Flax init instead
  compiles the whole forward pass (about a minute for an 8B model on the GPU). With `stacked`, (top-level
  tree, layers stacked), each layer written into the stack as it is drawn; the same values either way."""
  from nanoflow_jax.models.transformer import INIT_STD
  abstract = _with_shardings(_abstract_params(cfg, parse_dtype(dtype)), sharding_fn)
  paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(abstract)[0])
  treedef = jax.tree.structure(abstract)

  @functools.lru_cache(maxsize=None)  # one compiled draw per leaf kind and shape: the layers share them
  def drawer(kind: str, s: jax.ShapeDtypeStruct):
    def draw(key):
      if kind == "norm":
        return jnp.ones(s.shape, s.dtype)
      if kind == "bias":
        return jnp.zeros(s.shape, s.dtype)
      return (INIT_STD * jax.random.normal(key, s.shape, jnp.float32)).astype(s.dtype)  # as transformers
    return jax.jit(draw, out_shardings=s.sharding)

  root = jax.random.PRNGKey(seed)
  out, stack = [], layer_stack.LayerStack(cfg.num_layers) if stacked else None
  for i, (path, s) in enumerate(zip(paths, leaves)):
    name = path[-1].key
    kind = "norm" if name.endswith("norm") else "bias" if name.endswith("bias") else "normal"
    value = drawer(kind, s)(jax.random.fold_in(root, i))
    if stack is not None:
      stack.put(tuple(p.key for p in path), value)
    else:
      out.append(value)
  return stack.result() if stack is not None else jax.tree.unflatten(treedef, out)


def is_converted(path: str) -> bool:
  return os.path.exists(os.path.join(path, META_FILE))


def read_meta(path: str) -> dict[str, Any]:
  with open(os.path.join(path, META_FILE)) as f:
    meta = json.load(f)
  if meta.get("format_version") not in READABLE_VERSIONS:
    raise CheckpointError(f"{path}: checkpoint format {meta.get('format_version')}, this build reads "
                          f"{', '.join(map(str, READABLE_VERSIONS))}")
  return meta


def resolve_config(path_or_name: str) -> ModelConfig:
  cfg = config_lib.named_shape(path_or_name)
  if cfg is not None:
    return cfg
  if os.path.isdir(path_or_name):
    cfg = config_lib.load_hf_config(path_or_name)
    if is_converted(path_or_name) and read_meta(path_or_name).get("quantization"):   # stored in fp8 by convert.py
      cfg = dataclasses.replace(cfg, quantization=config_lib.Quantization(**read_meta(path_or_name)["quantization"]))
    return cfg
  raise CheckpointError(f"{path_or_name!r} is neither a model directory nor a named shape "
                        f"({', '.join(config_lib.known_names())})")


def stores_fp8(path_or_name: str, cfg: ModelConfig) -> bool:
  """Whether the weights at `path_or_name` are already in fp8 (a published FP8 checkpoint, or one convert.py
  quantized): then they load as they are; otherwise fp8 is made from them at load."""
  if cfg.quantization is None:
    return False
  if cfg.quantization.source != "dynamic":
    return True
  return os.path.isdir(path_or_name) and is_converted(path_or_name) and bool(read_meta(path_or_name).get("quantization"))
