"""The tensor-parallel step's all-reduce, timed alone under NCCL's settings, one process per setting.

Why: at TP 4 the step's 160 all-reduces of a [tokens, hidden] bf16 partial sum take about a fifth of a
LLaMA-2-70B step (perf-notes, session 5's trace), and autosearch's table times one collective per call,
so its figures carry the host's dispatch (~0.2 ms floor). Here each all-reduce is timed inside one
computation: a chain of n all-reduces in a loop, at two chain lengths, the difference over the extra
all-reduces (the launch and the copy-in cancel). NCCL reads its environment once, when it starts, so
each setting runs in a process of its own.

  PYTHONPATH=. python3 lab/collective_bench.py --rows=1024,2048 --out=DIR/collectives.md \
      --variants=default,NCCL_PROTO=Simple,NCCL_ALGO=Tree

A variant is `default` or NAME=VALUE[+NAME=VALUE...]; NCCL_NVLS_ENABLE stays as the machine sets it.
On a CPU (XLA_FLAGS=--xla_force_host_platform_device_count=N) it runs the same code without NCCL.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

if __package__ in (None, ""):
  import _root  # noqa: F401  (the repository root on sys.path: lab/_root.py)

from absl import app, flags

from lab._report import report

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags, defined only when this file runs as a program: the tests import it beside
  other launch modules whose flags share names (--out)."""
  flags.DEFINE_integer("tp", 0, "Devices in the all-reduce; 0: every visible device.")
  flags.DEFINE_integer("hidden", 8192, "Columns of the partial sum (LLaMA-2-70B: 8192).")
  flags.DEFINE_list("rows", ["1024", "2048"], "Rows (the step's tokens) of each all-reduce.")
  flags.DEFINE_list("chain", ["8", "24"], "The two chain lengths; their difference is what is timed.")
  flags.DEFINE_list("variants", ["default"], "NCCL settings, one process each: default or NAME=VALUE[+NAME=VALUE...].")
  flags.DEFINE_string("out", None, "Write the table (markdown) here.")
  flags.DEFINE_bool("child", False, "Internal: time this process's setting and print one JSON line.")


PROTECTED = ("NCCL_NVLS_ENABLE",)   # the machine's own settings: never changed by a variant (device README)
MARK = "COLLECTIVE_BENCH "


def parse_variant(spec: str) -> dict[str, str]:
  """`default` -> {}; `A=1+B=x` -> {"A": "1", "B": "x"}. A protected name or a malformed pair is refused."""
  if spec == "default":
    return {}
  env = {}
  for pair in spec.split("+"):
    name, sep, value = pair.partition("=")
    if not sep or not name or not value:
      raise ValueError(f"variant {spec!r}: each setting is NAME=VALUE, got {pair!r}")
    if name in PROTECTED:
      raise ValueError(f"variant {spec!r}: {name} is the machine's setting and stays as it is")
    env[name] = value
  return env


def time_allreduce(tp: int, hidden: int, rows: list[int], chain: tuple[int, int]) -> dict[int, float]:
  """ms per all-reduce of [rows, hidden] bf16 over `tp` devices, by chain difference."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from nanoflow_jax import parallel
  from nanoflow_jax.perf import median_seconds
  mesh = parallel.make_mesh(tp)

  def chained(n):
    # each device's partial sum, all-reduced n times in a row (ones grow by tp each time: 4^24 fits bf16)
    body = lambda x: jax.lax.fori_loop(0, n, lambda i, y: jax.lax.psum(y, parallel.AXIS), x)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(parallel.AXIS), out_specs=P(parallel.AXIS),
                                 check_vma=False))
  out = {}
  short, long = chain
  f_short, f_long = chained(short), chained(long)
  for m in rows:
    x = jax.device_put(jnp.ones((tp * m, hidden), jnp.bfloat16), NamedSharding(mesh, P(parallel.AXIS)))
    got = jax.device_get(f_short(x))
    if not (got == float(tp) ** short).all():   # the sum is right before it is timed
      raise SystemExit(f"all-reduce of {m} rows gave {got.min()}..{got.max()}, not {tp}^{short}")
    t_short = median_seconds(f_short, x, iters=5, samples=5)
    t_long = median_seconds(f_long, x, iters=5, samples=5)
    out[m] = 1e3 * max(t_long - t_short, 0.0) / (long - short)
  return out


def bandwidths(ms: float, rows: int, hidden: int, tp: int) -> tuple[float, float]:
  """(algorithm, bus) GB/s of an all-reduce of [rows, hidden] bf16 taking `ms`: the bus figure is NCCL's
  (the algorithm's x 2 (tp - 1) / tp, what each link carries in a ring)."""
  if ms <= 0:
    return 0.0, 0.0
  alg = rows * hidden * 2 / (ms * 1e-3) / 1e9
  return alg, alg * 2 * (tp - 1) / tp


def table(results: list[tuple[str, dict | str]], hidden: int, tp: int) -> str:
  """Markdown: ms per all-reduce (bus GB/s) per variant and row count, and each against the first variant."""
  rows = sorted({int(m) for _, r in results if isinstance(r, dict) for m in r})
  base = next((r for _, r in results if isinstance(r, dict)), None)
  lines = [f"All-reduce of [rows, {hidden}] bf16 over {tp} devices: ms per all-reduce (bus GB/s; "
           f"against the first variant that ran)\n",
           "| variant | " + " | ".join(f"{m} rows" for m in rows) + " |", "|---|" + "---|" * len(rows)]
  for name, r in results:
    if not isinstance(r, dict):
      lines.append(f"| {name} | failed: {r} |" + " |" * (len(rows) - 1))
      continue
    cells = []
    for m in rows:
      ms = r.get(str(m), r.get(m))
      if ms is None:
        cells.append("-")
        continue
      b = base.get(str(m), base.get(m))
      vs = f", {b / ms:.2f}x" if b and ms > 0 and r is not base else ""
      cells.append(f"{ms:.3f} ({bandwidths(ms, m, hidden, tp)[1]:.0f}{vs})")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def run_variant(spec: str, argv_flags: list[str]) -> dict | str:
  """One variant in its own process: its timings, or why it failed (the last lines of its output)."""
  env = {**os.environ, **parse_variant(spec)}
  r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *argv_flags], env=env,
                     capture_output=True, text=True, timeout=600)
  for line in r.stdout.splitlines():
    if line.startswith(MARK):
      return json.loads(line[len(MARK):])
  tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
  return f"exit {r.returncode}: " + " / ".join(tail)


def main(argv):
  del argv
  rows = [int(r) for r in FLAGS.rows]
  chain = tuple(int(c) for c in FLAGS.chain)
  if len(chain) != 2 or not 0 < chain[0] < chain[1]:
    raise app.UsageError("--chain takes two lengths, the shorter first")
  if FLAGS.child:
    import jax
    tp = FLAGS.tp or jax.device_count()
    print(MARK + json.dumps({"tp": tp, "ms": time_allreduce(tp, FLAGS.hidden, rows, chain)}), flush=True)
    return
  for spec in FLAGS.variants:
    parse_variant(spec)   # every variant checked before the first runs
  passed = [f"--tp={FLAGS.tp}", f"--hidden={FLAGS.hidden}", f"--rows={','.join(FLAGS.rows)}",
            f"--chain={','.join(FLAGS.chain)}"]
  results = []
  for spec in FLAGS.variants:
    results.append((spec, run_variant(spec, passed)))
    print(spec, results[-1][1], flush=True)
  # the device count from a child: this process never starts a backend (it would hold GPU memory)
  tp = next((r["tp"] for _, r in results if isinstance(r, dict)), FLAGS.tp)
  text = table([(spec, r["ms"] if isinstance(r, dict) else r) for spec, r in results], FLAGS.hidden, tp)
  report(text, FLAGS.out)


if __name__ == "__main__":
  define_flags()
  app.run(main)
