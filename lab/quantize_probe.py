"""Where the fp8 load's time goes: quantization.quantize_stacked took 66 s for the 8B stack on an H200 (gate_up
30.8 s: 0.24 GB/s of bf16, session 20's log), against 4.5 s for the whole bf16 load. This times the parts of
quantize_weight on `--layers` layers of one weight kind, each as its own jit on device-resident random bf16:
the channel amax alone, the bf16 transpose alone and followed by a row-wise quantization, amax + divide + cast
(no layout change), the cast alone, the 1-byte transpose alone, the whole quantize_weight layer by layer and under
vmap over the layers as quantize_stacked runs it, and that last on a stack filled layer by layer through
layer_stack.LayerStack, as the loaders build it. One row each: ms and GB/s of bf16 read. The parts that do not add
up to the whole say where the time is.

  PYTHONPATH=.:.carry python3 lab/quantize_probe.py --weight=gate_up --layers=4
"""
from __future__ import annotations

if __package__ in (None, ""):
  import _root  # noqa: F401  (the repository root on sys.path: lab/_root.py)

import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("weight", "gate_up", "Which LLaMA-3-8B weight kind: qkv, o, gate_up or down.")
flags.DEFINE_integer("layers", 4, "Layers stacked (the 8B model has 32).")
flags.DEFINE_float("scale", 1.0, "Shrink every dimension but the layers' by this (CPU checks).")
flags.DEFINE_integer("iters", 3, "Timed runs per variant (after one compile-and-run).")
flags.DEFINE_bool("engine_env", False, "Set the process up as step_bench and the engine do before JAX starts "
                  "(compat.configure_gpu_memory, compat.enable_concurrent_command_buffers): the probe's own "
                  "rows were fast where the engine's load was not, so the process settings are suspects.")
flags.DEFINE_string("model", "llama-3-8b", "The named shape --full_model loads (tiny for CPU checks).")
flags.DEFINE_bool("full_model", False, "Instead of the rows: the loader's own path for a whole named shape, "
                  "checkpoint.random_params (waited for) then quantization.quantize_stacked, each timed.")

SHAPES = {"qkv": (4096, 8, 6, 128), "o": (32, 128, 4096), "gate_up": (4096, 2, 14336), "down": (14336, 4096)}


def variants(nk: int):
  import jax
  import jax.numpy as jnp
  from nanoflow_jax import quantization as Q
  axes = tuple(range(1, nk + 1))   # the contracted dims after the leading layer axis
  def amax(w):
    return jnp.max(jnp.abs(w), axis=axes).astype(jnp.float32)
  def scaled_cast(w):
    s = jnp.maximum(amax(w), Q.MIN_SCALE) / Q.FP8_MAX
    s = s.reshape(s.shape[:1] + (1,) * nk + s.shape[1:])
    return (w.astype(jnp.float32) / s).astype(Q.FP8)
  def k_major(w8):
    nd = w8.ndim
    t = w8.transpose(0, *range(nk + 1, nd), *range(1, nk + 1))
    return t.reshape(*t.shape[:nd - nk], -1)
  def transposed_first(w):   # the bf16 weight moved K-major first (a 2-byte transpose), then a row-wise quantization
    t = k_major(w)
    s = jnp.maximum(jnp.max(jnp.abs(t), axis=-1).astype(jnp.float32), Q.MIN_SCALE) / Q.FP8_MAX
    return (t.astype(jnp.float32) / s[..., None]).astype(Q.FP8), s
  return {
      "channel amax": (amax, False),
      "transpose of the bf16 array alone": (k_major, False),
      "bf16 transposed first, then quantized row-wise": (transposed_first, False),
      "amax + divide + cast (no layout change)": (scaled_cast, False),
      "cast to e4m3 alone": (lambda w: w.astype(Q.FP8), False),
      "transpose of the e4m3 array alone": (k_major, True),
      "quantize_weight under vmap (quantize_stacked's)": (jax.vmap(lambda x: Q.quantize_weight(x, nk)), False),
      "quantize_weight, layer by layer": (lambda w: [Q.quantize_weight(w[i], nk) for i in range(w.shape[0])],
                                          False),
  }


def full_model():
  """The engine's fp8 load path on a named shape, the draws waited for before the quantization starts."""
  import jax
  from nanoflow_jax import checkpoint, config as config_lib, quantization as Q
  cfg = config_lib.named_shape(FLAGS.model)
  t = time.perf_counter()
  top, layers = jax.block_until_ready(checkpoint.random_params(cfg, "bfloat16", 0, None, stacked=True))
  print(f"random_params ({FLAGS.model}, bf16, waited for): {time.perf_counter() - t:.1f} s", flush=True)
  t = time.perf_counter()
  jax.block_until_ready(Q.quantize_stacked(layers))
  print(f"quantize_stacked ({FLAGS.model}): {time.perf_counter() - t:.1f} s (its log gives each weight)", flush=True)


def main(argv):
  del argv
  import logging
  logging.basicConfig(level=logging.INFO)
  if FLAGS.engine_env:
    from nanoflow_jax import compat
    compat.configure_gpu_memory()
    compat.enable_concurrent_command_buffers()
  import jax
  if FLAGS.full_model:
    return full_model()
  import jax.numpy as jnp
  from nanoflow_jax import quantization as Q
  nk = Q.QUANTIZED[FLAGS.weight]
  shape = (FLAGS.layers, *[max(1, int(d * FLAGS.scale)) if d > 8 else d for d in SHAPES[FLAGS.weight]])
  draw = jax.jit(lambda k: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(jnp.bfloat16))
  jax.block_until_ready(draw(jax.random.PRNGKey(1)))
  t = time.perf_counter()
  w = jax.block_until_ready(draw(jax.random.PRNGKey(0)))   # as checkpoint.random_params draws (timed: the
  drawn_ms = (time.perf_counter() - t) * 1e3                # loader's draws are asynchronous, so the first
  w8 = jax.block_until_ready(w.astype(Q.FP8))                # quantization waits for them)
  gb = w.size * 2 / 1e9
  print(f"{FLAGS.weight} {shape} bf16 {gb:.2f} GB on {jax.devices()[0].device_kind}; "
        f"the random draw {drawn_ms:.1f} ms ({gb / drawn_ms * 1e3:.1f} GB/s)")
  # the loader's stack: each layer written into a donated stack (layer_stack.py), as quantize_stacked gets it
  from nanoflow_jax import layer_stack
  stack = layer_stack.LayerStack(shape[0])
  for i in range(shape[0]):
    stack.put((f"layers_{i}", FLAGS.weight), w[i])
  stacked = stack.result()[1][FLAGS.weight]
  vs = variants(nk)
  whole = vs["quantize_weight under vmap (quantize_stacked's)"][0]
  rows = [(name, fn, w8 if on_fp8 else w) for name, (fn, on_fp8) in vs.items()]
  rows.append(("quantize_weight under vmap, on a LayerStack-built stack", whole, stacked))
  print("| variant | compile + first run s | ms | GB/s of bf16 |\n|---|---|---|---|")
  for name, fn, x in rows:
    f = jax.jit(fn)
    t = time.perf_counter()
    jax.block_until_ready(f(x))
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(FLAGS.iters):
      jax.block_until_ready(f(x))
    ms = (time.perf_counter() - t) / FLAGS.iters * 1e3
    print(f"| {name} | {first:.2f} | {ms:.2f} | {gb / ms * 1e3:.1f} |", flush=True)
  # the alternative order must give quantize_weight's values exactly (same amax, same division per element)
  ref8, ref_s = jax.jit(whole)(w)
  alt8, alt_s = jax.jit(vs["bf16 transposed first, then quantized row-wise"][0])(w)
  same = bool(jnp.array_equal(ref8.view(jnp.uint8), alt8.view(jnp.uint8)) & jnp.array_equal(ref_s, alt_s))
  print(f"bf16 transposed first gives quantize_weight's bytes and scales exactly: {same}")


if __name__ == "__main__":
  app.run(main)
