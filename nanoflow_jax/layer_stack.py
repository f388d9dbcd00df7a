"""`LayerStack`: the layer weights stacked on a leading axis, filled while a loader produces them.

The runtime runs the layers as one scan over stacked weights. Stacking after loading keeps every
per-layer array alive until the stack exists and then frees them all below it: a hole as large as the
weights, too split up for the KV cache's two big arrays (the 70B at TP 4: 29 GB free below 35 GB of
weights, docs/history/perf-notes.md). Here each leaf's stack is allocated when its first layer arrives, every
layer is written into it in place (a donated update) and dropped, so at most one layer's arrays are
ever loose, and the memory after loading is the stack plus one free block.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

Path = tuple[str, ...]


def layer_index(path: Path) -> int | None:
  """3 for ("layers_3", "qkv"); None for a top-level parameter."""
  head = path[0]
  return int(head[len("layers_"):]) if head.startswith("layers_") else None


def stacked_sharding(sharding):
  """A layer's sharding with an unsplit leading layer axis."""
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, P(None, *sharding.spec))
  return sharding   # one device: the same device


def layer_sharding(stack_sharding):
  """One layer's sharding, from its stack's (the leading layer axis dropped)."""
  if isinstance(stack_sharding, NamedSharding):
    return NamedSharding(stack_sharding.mesh, P(*stack_sharding.spec[1:]))
  return stack_sharding


def unstack(stack: jax.Array) -> list[jax.Array]:
  """The stack [L, ...] as L arrays on the same devices (each layer's part of the sharding kept)."""
  n = stack.shape[0]
  return list(jax.jit(lambda s: [s[i] for i in range(n)], out_shardings=[layer_sharding(stack.sharding)] * n)(stack))


def restack(layers: list[jax.Array]) -> jax.Array:
  return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=stacked_sharding(layers[0].sharding))(*layers)


@functools.lru_cache(maxsize=None)
def _writer(sharding):
  # One compile per leaf shape (the layer index is traced); the stack is donated, so the update is in place.
  return jax.jit(lambda stack, x, i: jax.lax.dynamic_update_index_in_dim(stack, x.astype(stack.dtype), i, 0),
                 donate_argnums=0, out_shardings=sharding)


class LayerStack:
  """put() every parameter (top-level ones pass through); result() gives (top-level tree, stacked layers).
  Device arrays stack on their devices; numpy arrays (the converter) on the host."""

  def __init__(self, num_layers: int):
    self.num_layers = num_layers
    self.top: dict = {}
    self._stacks: dict[Path, jax.Array] = {}
    self._filled: dict[Path, set[int]] = {}

  def put(self, path: Path, value: jax.Array) -> None:
    i = layer_index(path)
    if i is None:
      set_path(self.top, path, value)
      return
    if not 0 <= i < self.num_layers:
      raise ValueError(f"{'/'.join(path)}: layer {i} of a {self.num_layers}-layer model")
    leaf = path[1:]
    if leaf not in self._stacks:
      self._stacks[leaf], self._filled[leaf] = self._new_stack(value), set()
    stack = self._stacks[leaf]
    if stack.shape[1:] != value.shape:
      raise ValueError(f"{'/'.join(path)}: shape {value.shape}, layer 0 had {stack.shape[1:]}")
    if isinstance(stack, np.ndarray):
      stack[i] = value
    else:
      self._stacks[leaf] = _writer(stack.sharding)(stack, value, jnp.int32(i))
    self._filled[leaf].add(i)

  def _new_stack(self, value):
    """An empty stack for `value`'s leaf: on the host for host arrays (the converter), else on the devices
    that hold `value`, with an unsplit layer axis."""
    shape = (self.num_layers, *value.shape)
    if isinstance(value, np.ndarray):
      return np.empty(shape, value.dtype)
    return jax.jit(lambda: jnp.zeros(shape, value.dtype), out_shardings=stacked_sharding(value.sharding))()

  def result(self) -> tuple[dict, dict]:
    for leaf, done in self._filled.items():
      if len(done) != self.num_layers:
        missing = sorted(set(range(self.num_layers)) - done)
        raise ValueError(f"{'/'.join(leaf)}: layers {missing[:8]} were never loaded")
    layers: dict = {}
    for leaf, stack in self._stacks.items():
      set_path(layers, leaf, stack)
    return self.top, layers


def set_path(tree: dict, path: Path, value) -> None:
  """tree[path[0]][path[1]]... = value, making the dicts on the way."""
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value
