"""Kernel figures on the GPU, each against a ceiling measured in the same run.

  PYTHONPATH=. python3 launch/kernel_bench.py --out_dir=/tmp/kb [--quick]

- GEMM (bf16, fp32 accumulation) for LLaMA-3-8B and LLaMA-2-70B per-TP-shard shapes at each SM share,
  against XLA's GEMM on the same shape (TFLOP/s and the ratio).
- Paged decode attention (LLaMA-3-8B heads, 512 sequences at context 1024) at each SM share, against a
  device-to-device copy (TB/s counting bytes read; the copy counts read + write).
- Prefill attention over a 4096-token prompt, against the XLA GEMM peak (8192^3) of this run.
Writes kernel_bench.json and kernel_bench.md (the table) into --out_dir.
"""
from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", "/tmp/kernel_bench", "Where the JSON and the markdown table go.")
flags.DEFINE_list("shares", ["132", "112", "96", "64", "48", "32"], "SM shares to measure.")
flags.DEFINE_bool("quick", False, "Fewer shapes (a smoke run).")
flags.DEFINE_integer("iters", 20, "Calls per timing sample.")
flags.DEFINE_bool("sweep_attention", False, "Only sweep the attention kernel's tunables (decode and prefill).")

LLAMA3_8B_M2048 = {"qkv": (2048, 6144, 4096), "o": (2048, 4096, 4096), "gate_up": (2048, 28672, 4096),
                   "down": (2048, 4096, 14336)}


def llama2_70b_shard(tp: int) -> dict[str, tuple[int, int, int]]:
  m = 2048
  return {f"70b-tp{tp}-qkv": (m, 10240 // tp, 8192), f"70b-tp{tp}-o": (m, 8192, 8192 // tp),
          f"70b-tp{tp}-gate_up": (m, 57344 // tp, 8192), f"70b-tp{tp}-down": (m, 8192, 28672 // tp)}


def timeit(fn, *args, iters: int) -> float:
  from nanoflow_jax.perf import median_seconds
  return median_seconds(fn, *args, iters=iters)


def sweep_attention(copy_tbs: float, peak: float, iters: int) -> list[tuple]:
  """Times the attention kernel's variants on the decode and prefill shapes of the table; best first."""
  import itertools
  import jax
  import jax.numpy as jnp
  import numpy as np
  from pallas_kernels.paged_attention import paged_attention, query_blocks
  out = []
  hkv, g, d, ps = 8, 4, 128, 16
  for kind, b_, ctx in (("decode", 512, 1024), ("prefill", 1, 4096)):
    pages = b_ * ctx // ps
    cache = (jax.random.normal(jax.random.PRNGKey(3), (1, hkv, pages, ps, d), jnp.bfloat16),
             jax.random.normal(jax.random.PRNGKey(8), (1, hkv, pages, ps, d), jnp.bfloat16))
    n = b_ if kind == "decode" else ctx
    q = jax.random.normal(jax.random.PRNGKey(4), (n, hkv * g, d), jnp.bfloat16)
    if kind == "decode":
      table = np.random.default_rng(0).permutation(pages).reshape(b_, ctx // ps).astype(np.int32)
      slots, positions, chunks = np.arange(b_, dtype=np.int32), np.full(b_, ctx - 1, np.int32), [1] * b_
      grid = itertools.product([1, 4], [4, 8, 16], [4, 8], [2, 3], [1, 2])
      work = 2 * b_ * ctx * hkv * d * 2 / 1e12
    else:
      table = np.arange(pages, dtype=np.int32)[None]
      slots, positions, chunks = np.zeros(ctx, np.int32), np.arange(ctx, dtype=np.int32), [ctx]
      grid = itertools.product([16, 32, 64], [2, 4, 8], [4, 8], [2, 3], [1])
      work = 2 * ctx * ctx * hkv * g * d / 1e12
    for bq, ppb, warps, stages, ppsm in grid:
      start, length, nb = query_blocks(chunks, n, bq)
      f = jax.jit(lambda q, c, bq=bq, ppb=ppb, w=warps, st=stages, pp=ppsm: paged_attention(
          q, c[0], c[1], 0, table, slots, positions, start, length, jnp.int32(nb), num_sms=132, block_q=bq,
          pages_per_block=ppb, num_warps=w, num_stages=st, programs_per_sm=pp))
      cfg = f"block_q={bq} pages_per_block={ppb} warps={warps} stages={stages} programs_per_sm={ppsm}"
      try:
        t = timeit(f, q, cache, iters=iters)
        fig = work / t
        ratio = fig / (copy_tbs if kind == "decode" else peak)
        out.append((kind, cfg, f"{fig:.2f} {'TB/s' if kind == 'decode' else 'TFLOP/s'}", f"{ratio:.2f}"))
      except Exception as e:
        out.append((kind, cfg, f"FAILED {type(e).__name__}", "-"))
      print(out[-1], flush=True)
    del cache
  return sorted(out, key=lambda r: (r[0], -float(r[3]) if r[3] != "-" else 0))


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from pallas_kernels import gemm
  from pallas_kernels.paged_attention import DECODE_CONFIG, PREFILL_CONFIG, paged_attention, query_blocks
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  shares = [int(s) for s in FLAGS.shares]
  dev = jax.devices()[0]
  rows, res = [], {"device": dev.device_kind, "jax": jax.__version__, "sms": dev.core_count}

  # Ceilings of this run.
  x = jnp.ones((1 << 30,), jnp.bfloat16)
  t = timeit(jax.jit(lambda x: x + 1), x, iters=FLAGS.iters)
  copy_tbs = 2 * x.nbytes / t / 1e12
  a = jnp.ones((8192, 8192), jnp.bfloat16)
  t = timeit(jax.jit(lambda a, b: a @ b), a, a, iters=FLAGS.iters)
  peak = 2 * 8192 ** 3 / t / 1e12
  res.update(copy_tb_s=copy_tbs, gemm_peak_tflops=peak)
  rows.append(("copy (read+write)", "-", f"{copy_tbs:.2f} TB/s", "1.00"))
  rows.append(("XLA GEMM 8192^3", "-", f"{peak:.0f} TFLOP/s", "1.00"))
  del x, a
  if FLAGS.sweep_attention:
    rows += sweep_attention(copy_tbs, peak, FLAGS.iters)
    shares = []

  # GEMM
  shapes = dict(LLAMA3_8B_M2048) if shares else {}
  if not FLAGS.quick and shares:
    for tp in (1, 2, 4, 8):
      shapes.update(llama2_70b_shard(tp))
  res["gemm"] = {}
  for name, (m, n, k) in shapes.items():
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (m, k), jnp.bfloat16)
    b = jax.random.normal(kb, (k, n), jnp.bfloat16) * 0.02
    flops = 2 * m * n * k
    t_xla = timeit(jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)),
                   a, b, iters=FLAGS.iters)
    xla = flops / t_xla / 1e12
    entry = {"xla_tflops": xla}
    rows.append((f"gemm {name} {m}x{n}x{k}", "XLA", f"{xla:.0f} TFLOP/s", "1.00"))
    for s in shares:
      try:
        t_ours = timeit(jax.jit(lambda a, b, s=s: gemm.gemm(a, b, num_sms=s)), a, b, iters=FLAGS.iters)
        ours = flops / t_ours / 1e12
        entry[str(s)] = ours
        rows.append((f"gemm {name}", str(s), f"{ours:.0f} TFLOP/s", f"{ours / xla:.2f}"))
      except Exception as e:  # keep measuring the rest; the table says what failed
        rows.append((f"gemm {name}", str(s), f"FAILED: {type(e).__name__}", "-"))
    res["gemm"][name] = entry
    print(rows[-1], flush=True)

  # Attention in the configurations the engine runs (DECODE_CONFIG, PREFILL_CONFIG).
  hkv, g, d, ps = 8, 4, 128, 16

  def attention_rows(label, unit, work, ceiling, n, chunks, positions, table, cfg, shares_, iters):
    if not shares_:
      return {}
    pages = table.size
    cache = (jax.random.normal(jax.random.PRNGKey(3), (1, hkv, pages, ps, d), jnp.bfloat16),
             jax.random.normal(jax.random.PRNGKey(9), (1, hkv, pages, ps, d), jnp.bfloat16))
    q = jax.random.normal(jax.random.PRNGKey(4), (n, hkv * g, d), jnp.bfloat16)
    slots = np.repeat(np.arange(len(chunks), dtype=np.int32), chunks)
    start, length, nb = query_blocks(chunks, n, cfg["block_q"])
    out = {}
    for s in shares_:
      f = jax.jit(lambda q, c, s=s: paged_attention(q, c[0], c[1], 0, table, slots, positions, start, length,
                                                    jnp.int32(nb), num_sms=s, **cfg))
      try:
        fig = work / timeit(f, q, cache, iters=iters) / 1e12
        out[str(s)] = fig
        rows.append((label, str(s), f"{fig:.2f} {unit}", f"{fig / ceiling:.2f}"))
      except Exception as e:
        rows.append((label, str(s), f"FAILED: {type(e).__name__}: {str(e)[:80]}", "-"))
      print(rows[-1], flush=True)
    return out

  # Decode: 512 sequences at context 1024 (bytes of K and V read).
  b_, ctx = 512, 1024
  table = np.random.default_rng(0).permutation(b_ * ctx // ps).reshape(b_, ctx // ps).astype(np.int32)
  res["decode_attention"] = attention_rows(
      "decode attention B=512 ctx=1024", "TB/s", 2 * b_ * ctx * hkv * d * 2, copy_tbs, b_, [1] * b_,
      np.full(b_, ctx - 1, np.int32), table, DECODE_CONFIG, shares, FLAGS.iters)
  # Prefill: one 4096-token prompt, causal (half of 4 * T^2 * Hq * D FLOPs).
  t_len = 4096
  res["prefill_attention"] = attention_rows(
      "prefill attention T=4096", "TFLOP/s", 2 * t_len * t_len * hkv * g * d, peak, t_len, [t_len],
      np.arange(t_len, dtype=np.int32), np.arange(t_len // ps, dtype=np.int32)[None], PREFILL_CONFIG,
      shares[:1] + shares[3:4], max(FLAGS.iters // 4, 2))

  table_md = ["| kernel | SMs | achieved | ratio to ceiling |", "|---|---|---|---|"]
  table_md += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
  text = "\n".join(table_md)
  with open(os.path.join(FLAGS.out_dir, "kernel_bench.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(FLAGS.out_dir, "kernel_bench.json"), "w") as f:
    json.dump(res, f, indent=2)
  print(text)


if __name__ == "__main__":
  app.run(main)
