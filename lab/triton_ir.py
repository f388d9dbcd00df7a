"""Compiles the Triton paged-attention kernel for Hopper (sm_90) on the CPU, down to TTGIR (no GPU, no
ptxas), and counts the operations that say how it will run: tensor-core dots (`warp_group_dot` is Hopper's
wgmma, `tt.dot` left as is becomes the older mma.sync), asynchronous copies and their waits, shared-memory
allocations, and whether the loads are pipelined at all (`copies in flight`). A check before spending GPU
time on a kernel variant:

  python lab/triton_ir.py [--kind=prefill] --variant=swap_ab=1 --variant=prefetch_pages=1 [--dump=DIR]

Pointers are marked 16-byte aligned as jax-triton marks them (otherwise Triton will not vectorize or copy
asynchronously).
"""
from __future__ import annotations

import collections
import os
import re

if __package__ in (None, ""):
  import _root  # noqa: F401  (the repository root on sys.path: lab/_root.py)

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("variant", [], "key=value changes to the decode configuration; one table row each "
                          "(the configuration itself is always the first row).")
flags.DEFINE_enum("kind", "decode", ["decode", "prefill"], "Which of the engine's attention configurations the "
                  "variants change.")
flags.DEFINE_enum("kv_dtype", "bf16", ["bf16", "fp8e4nv"], "The cache's element type.")
flags.DEFINE_string("dump", None, "Also write each variant's TTGIR here.")
flags.DEFINE_bool("ptx", False, "Also compile to PTX (still no GPU) and count the innermost loop's instructions "
                  "per iteration (per thread): what each warp issues per key block.")

# Operation names counted, in the order printed: (label, regex over the TTGIR text).
COUNTED = (("wgmma", r"ttng\.warp_group_dot\b"), ("mma.sync dot", r"\btt\.dot\b"),
           ("async copy", r"ttg\.async_copy_global_to_local\b"), ("TMA copy", r"ttng\.async_tma_copy"),
           ("async wait", r"ttg\.async_wait\b"), ("wgmma wait", r"ttng\.warp_group_dot_wait\b"),
           ("smem alloc", r"ttg\.local_alloc\b"))


def ttgir(kernel, arg_types: dict[str, str], constexprs: dict, *, num_warps: int, num_stages: int,
          stage: str = "ttgir") -> str:
  """TTGIR (or with stage="ptx", PTX) of a @triton.jit kernel for sm_90: arg_types maps its leading
  (pointer or scalar) arguments to Triton type strings ("*bf16", "i32"); constexprs the rest, in the
  kernel's order."""
  from triton.backends.compiler import GPUTarget
  from triton.backends.nvidia.compiler import CUDABackend
  from triton.compiler.compiler import ASTSource
  from triton._C.libtriton import ir
  names = kernel.arg_names   # constexprs by name: the kernel's order decides each one's position
  if set(names) != set(arg_types) | set(constexprs):
    raise ValueError(f"arguments {sorted(set(names) ^ (set(arg_types) | set(constexprs)))} missing or unknown")
  signature = {k: arg_types.get(k, "constexpr") for k in names}
  src = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                  attrs={(names.index(k),): [["tt.divisibility", 16]] for k, t in arg_types.items() if t[0] == "*"})
  target = GPUTarget("cuda", 90, 32)
  backend = CUDABackend(target)
  options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
  context = ir.context()
  ir.load_dialects(context)
  backend.load_dialects(context)
  module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                       context)
  stages = collections.OrderedDict()
  backend.add_stages(stages, options, src.language)
  metadata = {}
  for name in ("ttir", "ttgir", "llir", "ptx")[:4 if stage == "ptx" else 2]:
    module = stages[name](module, metadata)
  return str(module)


def inner_loop(ptx: str) -> dict[str, int]:
  """The innermost loop of a PTX kernel (the shortest span from a label back to a branch to it): its
  instructions per iteration per thread, and of those the tensor-core, async-copy and barrier ones. A static
  count (no latencies): with one CTA of 4 warps per SM, each warp issues these once per key block."""
  lines = ptx.splitlines()
  labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^\s*(\$L__BB\d+_\d+):", line))}
  spans = [(labels[m.group(1)], i) for i, line in enumerate(lines)
           if (m := re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)) and labels.get(m.group(1), i) < i]
  if not spans:
    return {"loop instr": 0, "loop mma": 0, "loop cp.async": 0, "loop bar": 0}
  start, end = min(spans, key=lambda se: se[1] - se[0])
  ops = [re.sub(r"^@!?%\w+\s+", "", line.strip()).split()[0] for line in lines[start:end + 1]
         if re.match(r"^\s+@?!?%?[a-z]", line)]
  return {"loop instr": len(ops), "loop mma": sum(o.startswith(("mma", "wgmma.mma_async")) for o in ops),
          "loop cp.async": sum(o.startswith("cp.async.cg") or o.startswith("cp.async.ca") for o in ops),
          "loop bar": sum(o.startswith("bar") for o in ops)}


def attention_ttgir(cfg: dict, kv_dtype: str = "bf16", stage: str = "ttgir") -> str:
  """TTGIR (or PTX) of the paged attention kernel in configuration `cfg` (decode or prefill) for
  LLaMA-3-8B's shape (8 KV heads x 4, head_dim 128, pages of 16)."""
  from pallas_kernels import paged_attention_triton as pat
  cfg = dict(cfg)
  num_warps, num_stages = cfg.pop("num_warps"), cfg["num_stages"]
  _, meta, kernel = pat._constants((512, 32, 128), (1, 8, 32768, 16, 128), (512, 64), num_sms=132,
                                   sliding_window=None, **cfg)
  args = ["layer_ptr", "nblk_ptr", "blk_start_ptr", "blk_len_ptr", "slots_ptr", "pos_ptr", "pt_ptr", "q_ptr",
          "qs_ptr", "k_ptr", "v_ptr", "out_in_ptr", "out_ptr"]
  q_type = "*fp8e4nv" if cfg.get("dot_fp8") else "*bf16"   # dot_fp8: the queries arrive quantized, with scales
  types = ["*i32"] * 7 + [q_type, "*fp32", f"*{kv_dtype}", f"*{kv_dtype}", "*bf16", "*bf16"]
  if kernel is pat._paged_attention_kernel:   # the work counter, key_splits' partial sums and softmax states
    args, types = args + ["work_ptr", "part_ptr", "ml_ptr", "work_out_ptr"], types + ["*i32", "*fp32", "*fp32", "*i32"]
  return ttgir(kernel, dict(zip(args, types)), meta, num_warps=num_warps,
               num_stages=num_stages, stage=stage)


def count_ops(ttgir: str) -> dict[str, int]:
  """COUNTED's counts, and two figures of the load pipeline: `copies in flight` is the most asynchronous
  copy groups any wait leaves outstanding (0: every wait drains them all, so no load overlaps the math),
  `tile buffers` the most buffers of any shared-memory tile ring."""
  out = {label: len(re.findall(pattern, ttgir)) for label, pattern in COUNTED}
  out["copies in flight"] = max(map(int, re.findall(r"async_wait[^{\n]*\{num = (\d+)", ttgir)), default=0)
  out["tile buffers"] = max((int(m) for m in re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)),
                            default=0)
  return out


def main(argv):
  del argv
  os.environ.pop("TRITON_INTERPRET", None)
  from pallas_kernels import paged_attention_triton as pat
  from pallas_kernels.paged_attention import config_changes
  if FLAGS.kind == "prefill":
    base = pat.PREFILL_CONFIG
  else:
    base = pat.DECODE_CONFIG_FP8 if FLAGS.kv_dtype == "fp8e4nv" else pat.DECODE_CONFIG
  rows = []
  for text in [""] + FLAGS.variant:
    cfg = {**base, **config_changes(text)}
    ir_text = attention_ttgir(cfg, FLAGS.kv_dtype)
    if FLAGS.dump:
      os.makedirs(FLAGS.dump, exist_ok=True)
      with open(os.path.join(FLAGS.dump, f"{FLAGS.kind}_{text.replace(',', '_').replace('=', '') or 'config'}.ttgir"),
                "w") as f:
        f.write(ir_text)
    counts = count_ops(ir_text)
    if FLAGS.ptx:
      counts.update(inner_loop(attention_ttgir(cfg, FLAGS.kv_dtype, stage="ptx")))
    rows.append((text or "engine config", counts))
  labels = list(rows[0][1])
  print("| variant | " + " | ".join(labels) + " |")
  print("|---" * (len(labels) + 1) + "|")
  for name, counts in rows:
    print(f"| {name} | " + " | ".join(str(counts[k]) for k in labels) + " |")


if __name__ == "__main__":
  app.run(main)
