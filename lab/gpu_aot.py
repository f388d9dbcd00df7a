"""What a step launches on an H200, counted on a machine without a GPU: XLA's GPU compiler run deviceless.

  python lab/gpu_aot.py --step=engine --quantization=fp8 --batch=1          # in the venv below
  python lab/gpu_aot.py --step=plain --batch=1

A small decode step is launch-bound (issue 27): session 21's trace of a batch-1 fp8 step found 551 kernels
and the GPU idle 3.2 of 5.9 ms. How many kernels a step has, how many of them XLA's command buffers (CUDA
graphs) take, and how many the host launches one by one are compiler decisions, not timings. XLA makes them
the same way for a GPU it only knows by its description: the CUDA plugin's compile-only topology takes
`lab/h200_target_config.txtpb`, and XLA's thunk-sequence dump then lists what the executable runs. So this
tool answers on the CPU what a device call would otherwise spend minutes on.

What differs from the GPU machine:
- the XLA is jaxlib 0.10.2's (the plugin's), the device's 0.11.2: fusion and command-buffer rules may have
  moved between them, so a count here is a prediction checked against one trace, not a measurement;
- nothing is autotuned: XLA takes its default GEMM configurations (cuBLAS against its Triton GEMM may be
  chosen differently), which changes which GEMM runs, rarely how many kernels there are.

Set-up (once, outside the repository; 0.5 GB):
  python -m venv --system-site-packages /tmp/gpuaot
  /tmp/gpuaot/bin/pip install jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2
  /tmp/gpuaot/bin/python lab/gpu_aot.py ...        (jax-triton from .carry/ for the Triton kernels)

The step is the engine's own forward step (Executor._forward_step for the batch's bucket, through
Executor._compiled_for) and its sampler, compiled on abstract weights of the named shape (no weights are
drawn), or launch/plain_decode.py's plain JAX step. The census parser (`census`) is plain text work, tested
on the CPU (tests/test_gpu_aot.py).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import glob
import os
import re
import sys
import tempfile
import time

if __package__ in (None, ""):
  import _root  # noqa: F401  (the repository root on sys.path: lab/_root.py)

TARGET_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "h200_target_config.txtpb")
# A thunk of XLA's dump: "003: kCustomKernel [prev=... | next=...] loop_add_fusion grid: ...", indented under the
# command buffer or loop that holds it.
_THUNK = re.compile(r"^(\s*)(\d+): (k\w+)\s*(?:\[[^\]]*\])?\s*(\S*)")
KERNEL_KINDS = {"kKernel", "kCustomKernel", "kGemm", "kCublasLtMatmul", "kCustomCall", "kCopy", "kMemset32BitValue",
                "kMemzero", "kTriangularSolve", "kCuDnn", "kFft", "kNorm", "kConvolution"}


@dataclasses.dataclass
class Census:
  """What one executable runs, from its thunk sequence: `launches` are what the host starts one by one per
  execution (each loose kernel or copy, each command buffer as one graph launch, each loop as its own);
  `kernels` every kernel-like thunk at any depth (a loop's body counted once); `in_graphs` those inside
  command buffers; `by_kind` thunk kinds, `by_name` kernels by name without XLA's numbering."""
  launches: int = 0
  command_buffers: int = 0
  loops: int = 0
  kernels: int = 0
  in_graphs: int = 0
  by_kind: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  by_name: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  loose: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def add(self, other: "Census") -> "Census":
    out = Census()
    for f in ("launches", "command_buffers", "loops", "kernels", "in_graphs"):
      setattr(out, f, getattr(self, f) + getattr(other, f))
    for f in ("by_kind", "by_name", "loose"):
      setattr(out, f, getattr(self, f) + getattr(other, f))
    return out


def kernel_name(name: str) -> str:
  """XLA's kernel name without its numbering: loop_add_fusion.12 / gemm_fusion_dot_418 -> loop_add_fusion /
  gemm_fusion_dot."""
  return re.sub(r"([._]\d+)+$", "", name) or name


def census(thunk_text: str, loop_trips: int = 1) -> Census:
  """The census of a thunk_sequence dump (XLA's `*.thunk_sequence_after_thunk_passes.txt`). A loop's condition
  and body run `loop_trips` times (the dump does not say how many: the caller knows, e.g. the layer scan's)."""
  c = Census()
  stack: list[tuple[int, str]] = []   # (indent, kind) of the thunks that hold the current line
  for line in thunk_text.splitlines():
    m = _THUNK.match(line)
    if not m:
      continue
    indent, kind, name = len(m.group(1)), m.group(3), m.group(4)
    while stack and stack[-1][0] >= indent:
      stack.pop()
    inside = [k for _, k in stack]
    times = loop_trips ** inside.count("kWhile")
    name = ("copy" if kind == "kCopy" else "dynamic_slice_fusion" if kind == "kDynamicSliceFusion" else
            kernel_name(name) if name and not name.endswith(",") else kind)
    if kind == "kCommandBuffer":
      c.command_buffers += times
    elif kind == "kWhile":
      c.loops += times
    # the host starts each thunk outside a command buffer (a command buffer as one graph launch)
    if "kCommandBuffer" not in inside and kind not in ("kWhile", "kDynamicSliceFusion", "kSequential"):
      c.launches += times
    c.by_kind[kind] += times
    if kind in KERNEL_KINDS:
      c.kernels += times
      c.by_name[name] += times
      if "kCommandBuffer" in inside:
        c.in_graphs += times
      else:
        c.loose[name] += times
    stack.append((indent, kind))
  return c


def table_row(name: str, c: Census, compile_s: float) -> str:
  return (f"| {name} | {c.launches} | {c.command_buffers} | {c.loops} | {c.kernels} | {c.in_graphs} | "
          f"{c.kernels - c.in_graphs} | {compile_s:.0f} |")


TABLE_HEAD = ("| step | host launches | command buffers | loops | kernels | in graphs | launched alone | compile s |\n"
              "|---|---|---|---|---|---|---|---|")


# --- the compile (needs the CUDA plugin; see the module's set-up) ------------------------------------------
def compile_only_device(target_config: str = TARGET_CONFIG):
  """A compile-only H200 device: XLA compiles for it without a GPU present."""
  os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")   # no CUDA libraries to check without a GPU
  from jax.experimental import topologies
  with open(target_config) as f:
    topo = topologies.get_topology_desc(platform="cuda", target_config=f.read(), topology="1x1x1")
  return topo.devices[0]


def on_device(tree, device):
  """Abstract arrays of `tree`'s shapes and dtypes (arrays or ShapeDtypeStructs), placed on `device`."""
  import jax
  import numpy as np
  sharding = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sharding), tree)


@contextlib.contextmanager
def gpu_target():
  """The engine built and traced as on a GPU: JAX's default backend reads "gpu" (the executor's kernel choices)
  and jax-triton compiles for sm_90 without asking a device."""
  import jax
  real = jax.default_backend
  jax.default_backend = lambda: "gpu"
  try:
    try:
      from jax_triton import triton_lib
      saved = triton_lib.triton_kernel_call_lib.get_compute_capability
      triton_lib.triton_kernel_call_lib.get_compute_capability = lambda *_: 90
    except ImportError:
      triton_lib = None
    yield
  finally:
    jax.default_backend = real
    if triton_lib is not None:
      triton_lib.triton_kernel_call_lib.get_compute_capability = saved


def abstract_model(name: str, quantization: str | None, dtype: str = "bfloat16", unrolled: bool = True):
  """A Model of the named shape whose weights are ShapeDtypeStructs (nothing drawn): per layer for an unrolled
  step, else stacked."""
  import jax
  import jax.numpy as jnp
  from nanoflow_jax import checkpoint, model as model_lib
  cfg = model_lib.resolve_config(name, quantization)
  params = checkpoint._abstract_params(cfg, checkpoint.parse_dtype(dtype))
  top = {k: v for k, v in params.items() if not k.startswith("layers_")}
  layers = [params[f"layers_{i}"] for i in range(cfg.num_layers)]
  stacked = jax.tree.map(lambda *xs: jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype), *layers)
  m = model_lib.Model(cfg, None, jnp.dtype(checkpoint.parse_dtype(dtype)), stacked=(top, stacked))
  if unrolled:
    m._per_layer, m._stacked = (top, layers), None   # the form layer_list() would build from the stack
  return m


def decode_inputs(ex, batch: int, context: int):
  """The StepInputs of `batch` sequences decoding at `context` (their values do not matter to the compile), in
  the bucket's decode-only variant where it has one (Executor.decode_only_variant), as the engine builds them."""
  import types
  import numpy as np
  from nanoflow_jax.engine import _attention_blocks
  from nanoflow_jax.runtime.executor import StepInputs
  n = ex.bucket(batch)
  r = ex.max_num_seqs
  s = min(r, n)
  fake = types.SimpleNamespace(chunks=[types.SimpleNamespace(length=1, decode=True)] * batch)
  z = lambda k, dt=np.int32: np.zeros(k, dt)
  return StepInputs(z(n), np.ones(n, np.bool_), np.full(n, context, np.int32), z(n), z(n), z(n), z(n),
                    np.zeros((r, ex.page_table_cols), np.int32), z(s), z(s), np.zeros(r, np.bool_), z(s),
                    _attention_blocks(fake, ex.nano_sizes(n), ex.attention_for(n)[1], ex.decode_only_variant(n)))


def compile_engine_step(model_name: str, quantization: str | None, batch: int, context: int, device,
                        **executor_options) -> list:
  """Compiles the engine's forward step and greedy sampler for `batch` decodes on `device`; returns the
  compiled executables."""
  import jax
  import numpy as np
  from nanoflow_jax import sampler
  from nanoflow_jax.runtime.executor import Executor
  layer_loop = executor_options.pop("layer_loop", "auto")
  # the weights' form the executor takes: per layer where every step unrolls, else the stacks
  unrolled = layer_loop == "unrolled" or (layer_loop == "auto" and quantization and
                                          executor_options.get("fp8_gemm", "xla") != "mosaic")
  model = abstract_model(model_name, quantization, unrolled=bool(unrolled))
  pages_per_seq = -(-(context + 64) // 16)
  with gpu_target():
    ex = Executor(model, batch * pages_per_seq + 8, 16, executor_options.pop("max_num_seqs", max(batch, 8)),
                  context + 64, executor_options.pop("dense_batch", 512), kernels="auto", num_sms=132,
                  layer_loop=layer_loop, **executor_options)
    ex.params, ex.kv = on_device(ex.params, device), on_device(ex.kv, device)
    ex.last_tokens, ex.counts, ex.prompt_mask = on_device((ex.last_tokens, ex.counts, ex.prompt_mask), device)
    inp = on_device(decode_inputs(ex, batch, context), device)
    forward = ex._compiled_for(ex.step_key(inp), inp)
    s = inp.sample_rows.shape[0]
    logits = jax.ShapeDtypeStruct((s, model.config.vocab_size), np.float32, sharding=inp.tokens.sharding)
    sp = on_device(sampler.SamplingArrays.empty(ex.max_num_seqs), device)
    modes = sampler.Modes(penalized=False, all_greedy=True, truncation=False, logprobs=False)
    sample = ex._sampler_for(modes, logits, inp.sample_slots, sp, {})
  return [forward, sample]


def compile_plain_step(model_name: str, quantization: str | None, batch: int, context: int, device) -> list:
  """launch/plain_decode.py's step for `batch` sequences at `context` on `device`."""
  import jax
  import jax.numpy as jnp
  from launch import plain_decode
  model = abstract_model(model_name, quantization)
  top, layers = model.layer_list()
  cfg = model.config
  cache = jax.ShapeDtypeStruct((batch, context + 64, cfg.num_kv_heads, cfg.head_dim), model.dtype)
  ks = [cache] * cfg.num_layers
  args = on_device((top, layers, ks, ks, jax.ShapeDtypeStruct((batch,), jnp.int32),
                    jax.ShapeDtypeStruct((), jnp.int32)), device)
  return [plain_decode.make_step(model).lower(*args).compile()]


def thunk_dumps(dump_dir: str) -> list[str]:
  """Each executable's thunk sequence: after XLA's thunk passes (command buffers formed) where it wrote that
  file; it writes none when the passes changed nothing (no run of kernels long enough for a command buffer),
  and the sequence before them is then what runs."""
  out = []
  for before in sorted(glob.glob(os.path.join(dump_dir, "*.thunk_sequence.txt"))):
    after = before.replace(".thunk_sequence.txt", ".thunk_sequence_after_thunk_passes.txt")
    out.append(after if os.path.exists(after) else before)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--step", choices=("engine", "plain"), default="engine")
  p.add_argument("--model", default="llama-3-8b")
  p.add_argument("--quantization", default=None, help="fp8: fp8 weights and activations")
  p.add_argument("--batch", type=int, default=1, help="decoding sequences")
  p.add_argument("--context", type=int, default=1024)
  p.add_argument("--name", default="", help="the table row's name")
  p.add_argument("--executor", action="append", default=[],
                 help="an Executor option as key=value (layer_loop=scan, small_step_attention=64, kv_dtype=fp8, "
                      "small_fp8_gemm=1, split_decode_keys=1, fp8_gemm=xla_fused, ...); repeatable")
  p.add_argument("--kernels_out", default="", help="also write the kernels by name, most first, to this file")
  p.add_argument("--out", default="", help="append the table row to this markdown file")
  a = p.parse_args(argv)
  dump = tempfile.mkdtemp(prefix="gpu_aot_")
  # XLA reads its flags once, at start: the dump goes where this process's compiles write it.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}").strip()
  device = compile_only_device()
  options = {}
  for kv in a.executor:
    key, _, value = kv.partition("=")
    options[key] = (int(value) if value.lstrip("-").isdigit() else
                    {"true": True, "false": False}.get(value.lower(), value))
  if a.step == "engine" and "kv_dtype" in options and options["kv_dtype"] == "fp8":
    options["kv_dtype"] = "float8_e4m3fn"
  t = time.perf_counter()
  if a.step == "engine":
    compile_engine_step(a.model, a.quantization, a.batch, a.context, device, **options)
  else:
    compile_plain_step(a.model, a.quantization, a.batch, a.context, device)
  seconds = time.perf_counter() - t
  total = Census()
  # the engine's scanned layers are the forward step's one loop: its body runs once a layer
  trips = 1
  if a.step == "engine" and options.get("layer_loop") == "scan":
    from nanoflow_jax import config as config_lib
    trips = config_lib.named_shape(a.model).num_layers // options.get("layer_unroll", 1)
  for path in thunk_dumps(dump):
    with open(path) as f:
      total = total.add(census(f.read(), trips if "_forward_step" in path else 1))
  name = a.name or f"{a.step} {a.quantization or 'bf16'} batch {a.batch} {' '.join(a.executor)}".strip()
  row = table_row(name, total, seconds)
  print(TABLE_HEAD)
  print(row)
  print("launched alone, by name:", ", ".join(f"{k} {v}" for k, v in total.loose.most_common(12)) or "none")
  print("kernels by name:", ", ".join(f"{k} {v}" for k, v in total.by_name.most_common(20)))
  if a.kernels_out:
    with open(a.kernels_out, "w") as f:
      f.writelines(f"{v}\t{k}\n" for k, v in total.by_name.most_common())
  if a.out:
    new = not os.path.exists(a.out)
    with open(a.out, "a") as f:
      f.write((TABLE_HEAD + "\n" if new else "") + row + "\n")
  print("dump:", dump, file=sys.stderr)


if __name__ == "__main__":
  main()
