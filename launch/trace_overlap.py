"""Reads a perfetto trace (jax.profiler, create_perfetto_trace=True) and reports, per GPU stream, the
busy time of its kernels, how long two or more streams ran kernels at the same time, and the kernel time
by kind (the name up to its first digit or dot: gemm, paged_attention_triton, loop_fusion, ...).

  python launch/trace_overlap.py TRACE.json.gz [STEPS]     # STEPS: divide the totals by the steps traced
"""
from __future__ import annotations

import collections
import gzip
import json
import re
import sys


def _events(path: str):
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names = {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      names[(e["pid"], e["tid"])] = e["args"]["name"]
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      thread = names.get((e["pid"], e["tid"]), "")
      if "Stream" in thread:
        yield thread, e


def stream_intervals(path: str) -> dict[str, list[tuple[float, float]]]:
  out = collections.defaultdict(list)
  for thread, e in _events(path):
    out[thread].append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
  return out


def kernel_kind(name: str) -> str:
  kind = re.split(r"[.\d]", name, maxsplit=1)[0].rstrip("_")
  return kind or name


def time_by_kind(path: str) -> dict[str, tuple[int, float]]:
  """Kind -> (kernels, total microseconds), over every stream."""
  out = collections.defaultdict(lambda: [0, 0.0])
  for _, e in _events(path):
    entry = out[kernel_kind(e.get("name", "?"))]
    entry[0] += 1
    entry[1] += float(e["dur"])
  return {k: (n, t) for k, (n, t) in out.items()}


def busy(intervals):
  total, end = 0.0, -1e30
  for a, b in sorted(intervals):
    if b > end:
      total += b - max(a, end)
      end = b
  return total


def overlap_time(by_stream) -> float:
  """Time during which kernels of at least two streams were running."""
  points = []
  for ivs in by_stream.values():
    merged, end = [], -1e30
    for a, b in sorted(ivs):
      if a > end:
        merged.append([a, b])
      else:
        merged[-1][1] = max(merged[-1][1], b)
      end = max(end, b)
    for a, b in merged:
      points += [(a, 1), (b, -1)]
  points.sort()
  active, last, total = 0, None, 0.0
  for t, d in points:
    if active >= 2 and last is not None:
      total += t - last
    active += d
    last = t
  return total


def main(path: str, steps: int = 1) -> None:
  by_stream = stream_intervals(path)
  for name, ivs in sorted(by_stream.items()):
    print(f"{name}: {len(ivs) / steps:.0f} kernels, busy {busy(ivs) / 1e3 / steps:.2f} ms (per step)")
  print(f"two or more streams running kernels at once: {overlap_time(by_stream) / 1e3 / steps:.2f} ms per step")
  kinds = sorted(time_by_kind(path).items(), key=lambda kv: -kv[1][1])
  print("| kernel kind | kernels per step | ms per step |\n|---|---|---|")
  for kind, (n, t) in kinds[:20]:
    print(f"| {kind} | {n / steps:.0f} | {t / 1e3 / steps:.2f} |")


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
