"""Tensor parallelism: a 1-D device mesh ("tp") and the sharding rules of the model family.

Megatron-style: qkv and gate_up column-parallel, o and down row-parallel, embedding and LM head
vocab-parallel, KV heads split across devices (and so the KV cache). Where a dimension does not divide
by the TP degree (fewer KV heads than devices, an odd vocabulary) that tensor is replicated. XLA's SPMD
partitioner inserts the collectives; the step's arithmetic is the same as on one device.
"""
from __future__ import annotations

import dataclasses
import logging

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nanoflow_jax.config import ModelConfig

log = logging.getLogger(__name__)
AXIS = "tp"


def make_mesh(tp: int, devices=None) -> Mesh:
  devices = list(devices or jax.devices())
  if tp < 1 or tp > len(devices):
    raise ValueError(f"tensor_parallel={tp} needs that many devices; {len(devices)} are visible")
  return Mesh(devices[:tp], (AXIS,))


def param_spec(cfg: ModelConfig, path: tuple[str, ...], shape: tuple[int, ...], tp: int) -> P:
  """The PartitionSpec of one parameter (path as in the parameter tree, e.g. ("layers_3", "qkv"))."""
  name = path[-1]
  heads_split = cfg.num_kv_heads % tp == 0
  div = lambda n: n % tp == 0
  rules = {
      "embedding": P(AXIS, None) if div(cfg.vocab_size) else P(),
      "lm_head": P(None, AXIS) if div(cfg.vocab_size) else P(),
      "qkv": P(None, AXIS, None, None) if heads_split else P(),
      "qkv_bias": P(AXIS, None, None) if heads_split else P(),
      "o": P(AXIS, None, None) if heads_split else P(),   # query heads are grouped by KV head
      "o_col": P(None, None, AXIS) if div(cfg.hidden_size) else P(),   # the all-gather form's o (executor)
      "gate_up": P(None, None, AXIS) if div(cfg.intermediate_size) else P(),
      "down": P(AXIS, None) if div(cfg.intermediate_size) else P(),
      "experts_gate_up": P(None, None, None, AXIS) if div(cfg.intermediate_size) else P(),
      "experts_down": P(None, AXIS, None) if div(cfg.intermediate_size) else P(),
  }
  # fp8 weights [*out, K] (quantization.py) and their scales [*out]: split as the bf16 weight's outputs are,
  # or (row-parallel o and down) along K, whose leading contracted dim the bf16 weight splits
  fp8 = {
      "qkv_fp8": P(AXIS, None, None, None) if heads_split else P(),
      "qkv_fp8_scale": P(AXIS, None, None) if heads_split else P(),
      "o_fp8": P(None, AXIS) if heads_split else P(),
      "gate_up_fp8": P(None, AXIS, None) if div(cfg.intermediate_size) else P(),
      "gate_up_fp8_scale": P(None, AXIS) if div(cfg.intermediate_size) else P(),
      "down_fp8": P(None, AXIS) if div(cfg.intermediate_size) else P(),
  }
  return fp8.get(name) or rules.get(name, P())


def manual_tp_supported(cfg: ModelConfig, tp: int) -> bool:
  """Whether each device can run its share of a layer by itself (the executor's shard_map path): a dense
  model whose query heads, KV heads and MLP width all divide by the TP degree."""
  return (not cfg.is_moe and cfg.num_heads % tp == 0 and cfg.num_kv_heads % tp == 0
          and cfg.intermediate_size % tp == 0)


def local_config(cfg: ModelConfig, tp: int) -> ModelConfig:
  """The layer shapes one device holds under manual TP: its heads and its slice of the MLP."""
  return dataclasses.replace(cfg, num_heads=cfg.num_heads // tp, num_kv_heads=cfg.num_kv_heads // tp,
                             intermediate_size=cfg.intermediate_size // tp)


def sharding_fn(cfg: ModelConfig, mesh: Mesh):
  tp = mesh.shape[AXIS]
  return lambda path, shape: NamedSharding(mesh, param_spec(cfg, tuple(path), tuple(shape), tp))


def kv_shards(cfg: ModelConfig, mesh: Mesh | None) -> int:
  """Over how many devices each KV page is split: the TP degree where the KV heads divide by it, else 1."""
  if mesh is None or cfg.num_kv_heads % mesh.shape[AXIS]:
    return 1
  return mesh.shape[AXIS]


def kv_sharding(cfg: ModelConfig, mesh: Mesh) -> NamedSharding:
  """K/V caches [layers, kv_heads, pages, page_size, head_dim]: split by KV head where they divide."""
  split = cfg.num_kv_heads % mesh.shape[AXIS] == 0
  if not split:
    log.info("%d KV heads over %d devices: the KV cache is replicated", cfg.num_kv_heads, mesh.shape[AXIS])
  return NamedSharding(mesh, P(None, AXIS, None, None, None) if split else P())


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
