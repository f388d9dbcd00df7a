"""Reads a perfetto trace (jax.profiler, create_perfetto_trace=True) and reports, per GPU stream, the
busy time of its kernels and how long two or more streams ran kernels at the same time.

  python launch/trace_overlap.py TRACE.json.gz
"""
from __future__ import annotations

import collections
import gzip
import json
import sys


def stream_intervals(path: str) -> dict[str, list[tuple[float, float]]]:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names = {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      names[(e["pid"], e["tid"])] = e["args"]["name"]
  out = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      thread = names.get((e["pid"], e["tid"]), "")
      if "Stream" in thread:
        out[thread].append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
  return out


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


def main(path: str) -> None:
  by_stream = stream_intervals(path)
  for name, ivs in sorted(by_stream.items()):
    print(f"{name}: {len(ivs)} kernels, busy {busy(ivs) / 1e3:.2f} ms")
  print(f"two or more streams running kernels at once: {overlap_time(by_stream) / 1e3:.2f} ms")


if __name__ == "__main__":
  main(sys.argv[1])
