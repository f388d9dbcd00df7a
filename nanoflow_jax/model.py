"""`load_model`: a model (config + parameters + tokenizer) from a checkpoint directory or a named shape."""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp

from nanoflow_jax import checkpoint, config as config_lib, layer_stack, quantization, tokenizer as tokenizer_lib
from nanoflow_jax.config import ModelConfig
from nanoflow_jax.models.transformer import Transformer

log = logging.getLogger(__name__)


class Model:
  """Parameters on device plus the Flax module that gives them meaning.

  `forward` is the plain reference pass; the runtime calls the per-layer ops through `bind()`. The
  runtime takes the layer weights stacked on a leading axis (`stacked_params`); from then on the model
  holds only that one copy, and `params` rebuilds per-layer views from it on demand.
  """

  def __init__(self, cfg: ModelConfig, params, dtype, tokenizer: tokenizer_lib.Tokenizer | None = None,
               stacked: tuple[dict, dict] | None = None, sharding_fn: checkpoint.ShardingFn | None = None):
    """`params`: the per-layer tree; or `stacked`: (top-level tree, layers stacked) as the loaders build it."""
    if (params is None) == (stacked is None):
      raise ValueError("Model takes either per-layer params or stacked ones")
    self.config = cfg
    if cfg.quantization is not None:   # weights that arrive in bf16/fp16 get their fp8 form here, once
      if stacked is None:
        raise ValueError("an fp8 model takes its weights stacked")
      top, layers = stacked
      if not quantization.is_quantized(layers):
        stacked = (top, quantization.quantize_stacked(layers, sharding_fn))
    self._params = params
    self._stacked = stacked
    self._per_layer: tuple[dict, list[dict]] | None = None   # the other form the runtime takes (layer_list)
    self.dtype = jnp.dtype(dtype)
    self.tokenizer = tokenizer
    self.module = Transformer(cfg, self.dtype)
    self._forward = jax.jit(lambda p, t, n: self.module.apply({"params": p}, t, n))

  def forward(self, token_ids, lengths=None) -> jax.Array:
    """token_ids int32[B, T] (right-padded when `lengths` [B] is given) -> fp32 logits [B, T, vocab]."""
    token_ids = jnp.asarray(token_ids, jnp.int32)
    if token_ids.ndim != 2:
      raise ValueError(f"token_ids must be [batch, length], got shape {token_ids.shape}")
    if token_ids.size and (int(token_ids.min()) < 0 or int(token_ids.max()) >= self.config.vocab_size):
      raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
    if lengths is None:
      lengths = jnp.full((token_ids.shape[0],), token_ids.shape[1], jnp.int32)
    return self._forward(self.params, token_ids, jnp.asarray(lengths, jnp.int32))

  @property
  def params(self) -> dict:
    """The parameter tree ("layers_<i>" per layer). After stacked_params() the layers are slices of the
    stacked arrays, made on each access (a reference path: tests, the plain forward pass)."""
    if self._per_layer is not None:
      top, layers = self._per_layer
      return {**top, **{f"layers_{i}": p for i, p in enumerate(layers)}}
    if self._stacked is None:
      return self._params
    top, layers = self._stacked
    return {**top, **{f"layers_{i}": jax.tree.map(lambda w, i=i: w[i], layers)
                      for i in range(self.config.num_layers)}}

  def stacked_params(self) -> tuple[dict, dict]:
    """(top-level params, layer params stacked on a leading layer axis), built once. The per-layer arrays
    are dropped afterwards: one copy of the weights on the device, not two (the KV cache, sized after
    this, gets the difference: 16 GB on LLaMA-3-8B)."""
    if self._per_layer is not None:   # back from the per-layer form, one weight kind at a time
      top, layers = self._per_layer
      stacked = {}
      for name in list(layers[0]):
        stacked[name] = jax.tree.map(lambda *xs: layer_stack.restack(list(xs)), *[p.pop(name) for p in layers])
      self._stacked, self._per_layer = (top, stacked), None
    if self._stacked is None:
      params = self._params
      n = self.config.num_layers
      top = {k: v for k, v in params.items() if not k.startswith("layers_")}
      layers = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(n)])
      self._stacked, self._params = (top, layers), None
    return self._stacked

  def layer_list(self) -> tuple[dict, list[dict]]:
    """(top-level params, one dict of arrays per layer): the form of a step whose layers are unrolled. Each
    weight is an array of its own, which XLA's dot reads where it lies; a slice of a stack reaches it as a
    copy (4.3 ms of copies per 8B fp8 step, docs/history/perf-notes.md, session 15). Built from the stack
    one weight kind at a time, which then goes: one copy of the weights on the device."""
    if self._per_layer is None:
      top, stacked = self.stacked_params()
      n = self.config.num_layers
      layers: list[dict] = [{} for _ in range(n)]
      for name in list(stacked):
        parts = jax.tree.map(layer_stack.unstack, stacked.pop(name))
        for i in range(n):
          layers[i][name] = jax.tree.map(lambda ps, i=i: ps[i], parts, is_leaf=lambda x: isinstance(x, list))
        del parts
      self._per_layer, self._stacked = (top, layers), None
    return self._per_layer

  def bind(self, params=None) -> Transformer:
    return self.module.bind({"params": self.params if params is None else params})


def load_model(path_or_name: str, dtype="bfloat16", random_weights: bool = False, seed: int = 0,
               sharding_fn: checkpoint.ShardingFn | None = None, progress: bool = False,
               quantization: str | None = None) -> Model:
  """Loads a converted (orbax) checkpoint, a Hugging Face directory, or a named shape.

  Named shapes (`tiny`, `llama-3-8b`, ...) have no weights: they need `random_weights=True`, except
  `tiny`, which is always random (seeded) and carries the built-in tokenizer. `sharding_fn(path, shape)`
  places each parameter (tensor parallelism); the default is the first device.
  """
  dtype = checkpoint.parse_dtype(dtype)
  cfg = resolve_config(path_or_name, quantization)
  # weights that do not come quantized are drawn or loaded in `dtype` and quantized by Model
  plain = cfg if checkpoint.stores_fp8(path_or_name, cfg) else dataclasses.replace(cfg, quantization=None)
  m = _load(path_or_name, cfg, plain, dtype, random_weights, seed, sharding_fn, progress)
  if cfg.quantization is not None:
    log.info("%s: fp8 (e4m3) weights and activations, from %s", cfg.name or path_or_name, cfg.quantization.source)
  return m


def resolve_config(path_or_name: str, quantization_arg: str | None = None):
  """The model's config with the quantization it runs in: the checkpoint's own (its quantization_config),
  or `quantization_arg` ("fp8": quantize bf16/fp16 weights at load)."""
  cfg = checkpoint.resolve_config(path_or_name)
  if quantization_arg not in (None, "none", *quantization.SCHEMES):
    raise ValueError(f"quantization must be one of {('none', *quantization.SCHEMES)}, got {quantization_arg!r}")
  if quantization_arg == "none" and cfg.quantization is not None:
    raise ValueError(f"{path_or_name} is an fp8 checkpoint ({cfg.quantization.source}); it runs as fp8")
  if quantization_arg == "fp8" and cfg.quantization is None:
    cfg = dataclasses.replace(cfg, quantization=config_lib.Quantization())
  return cfg


def _load(path_or_name, cfg, plain, dtype, random_weights, seed, sharding_fn, progress) -> Model:
  if cfg.name == path_or_name and path_or_name in ("tiny", *checkpoint.config_lib.NAMED_SHAPES):
    if path_or_name != "tiny" and not random_weights:
      raise checkpoint.CheckpointError(f"{path_or_name!r} is a named shape without weights: pass "
                                       "random_weights=True (or a checkpoint directory)")
    tok = tokenizer_lib.tiny_tokenizer()
    if path_or_name != "tiny":
      log.info("%s: random weights with the built-in byte-level tokenizer", path_or_name)
    return Model(cfg, None, dtype, tok, stacked=checkpoint.random_params(plain, dtype, seed, sharding_fn, stacked=True),
                 sharding_fn=sharding_fn)
  tok = tokenizer_lib.load_tokenizer(path_or_name)
  # Every loader gives the layer stack the runtime scans over, built without a per-layer copy of the
  # weights beside it (layer_stack.py says why that matters for the KV cache).
  if random_weights:
    return Model(cfg, None, dtype, tok, stacked=checkpoint.random_params(plain, dtype, seed, sharding_fn, stacked=True),
                 sharding_fn=sharding_fn)
  if checkpoint.is_converted(path_or_name):
    return Model(cfg, None, dtype, tok, stacked=checkpoint.load_orbax_params(path_or_name, plain, dtype, sharding_fn),
                 sharding_fn=sharding_fn)
  return Model(cfg, None, dtype, tok, stacked=checkpoint.load_hf_params(path_or_name, plain, dtype, sharding_fn,
                                                                         progress), sharding_fn=sharding_fn)
