"""Reads a perfetto trace (jax.profiler, create_perfetto_trace=True) and reports, per GPU stream, the
busy time of its kernels, how long two or more streams ran kernels at the same time, and the kernel time
by kind (the name up to its first digit or dot: gemm, paged_attention_triton, loop_fusion, ...).

  python launch/trace_overlap.py TRACE.json.gz [STEPS]     # STEPS: divide the totals by the steps traced
  python launch/trace_overlap.py TRACE.json.gz 3 --png=timeline.png [--window_ms=6]

--png draws the measured timeline: one row per stream, kernels coloured by kind (GEMM, attention, copy,
other), over a window of --window_ms from the middle of the trace (a few layers of one step).
"""
from __future__ import annotations

import collections
import functools
import gzip
import json
import re
import sys


def latest_trace(trace_dir: str) -> str | None:
  """The newest perfetto trace jax.profiler wrote under trace_dir (it nests them by host and time)."""
  import glob
  import os
  traces = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
  return max(traces, key=os.path.getmtime) if traces else None


@functools.lru_cache(maxsize=4)
def _timed(path: str) -> tuple:
  """(thread name, process name, event) for every event with a duration; each trace is read once."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  threads, procs = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = e["args"]["name"]
  return tuple((threads.get((e["pid"], e["tid"]), ""), procs.get(e["pid"], str(e["pid"])), e)
               for e in events if e.get("ph") == "X" and "dur" in e)


def _events(path: str) -> tuple:
  """(stream thread name, kernel event) for every kernel on a GPU stream."""
  return tuple((thread, e) for thread, _, e in _timed(path) if "Stream" in thread)


def device_idle(path: str) -> dict[str, tuple[float, float]]:
  """Per device (the trace's process): (microseconds with a kernel running, span from first to last)."""
  per = collections.defaultdict(list)
  for thread, proc, e in _timed(path):
    if "Stream" in thread:
      per[proc].append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
  return {p: (busy(ivs), max(b for _, b in ivs) - min(a for a, _ in ivs)) for p, ivs in per.items()}


def host_time_by_name(path: str) -> dict[str, tuple[int, float]]:
  """Host-side events (every thread that is not a GPU stream) by name -> (count, total microseconds): where
  the launching threads spend their time, e.g. waiting on the device."""
  out = collections.defaultdict(lambda: [0, 0.0])
  for thread, _, e in _timed(path):
    if "Stream" not in thread:
      entry = out[e.get("name", "?")]
      entry[0] += 1
      entry[1] += float(e["dur"])
  return {k: (n, t) for k, (n, t) in out.items()}


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


CATEGORIES = (("GEMM", "tab:blue", ("mosaic_gpu", "gemm", "nvjet", "cutlass", "sm90")),
              ("attention", "tab:red", ("attention",)),
              ("copy", "tab:orange", ("memcpy", "copy")),
              ("other", "tab:gray", ()))   # whatever matches none of the above


def category(name: str) -> tuple[str, str]:
  low = name.lower()
  for label, color, keys in CATEGORIES:
    if any(k in low for k in keys):
      return label, color
  return "other", "tab:gray"


def _middle(events) -> float:
  """Where the drawn and listed windows start: halfway between the first and last kernel of `events`
  (_events of a trace; a few layers into the middle step)."""
  return (min(float(e["ts"]) for _, e in events) + max(float(e["ts"]) + float(e["dur"]) for _, e in events)) / 2


def timeline_png(path: str, out_png: str, window_ms: float = 6.0, title: str = "") -> None:
  """Measured timeline: kernels per stream over `window_ms` from the middle of the trace."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  raw = _events(path)
  events = [(thread, float(e["ts"]), float(e["dur"]), e.get("name", "?")) for thread, e in raw]
  if not events:
    raise ValueError(f"no GPU stream kernels in {path}")
  start = _middle(raw)
  end = start + window_ms * 1e3
  shown = [e for e in events if e[1] < end and e[1] + e[2] > start]
  streams = sorted({e[0] for e in shown})
  fig, ax = plt.subplots(figsize=(11, 1.4 + 0.5 * len(streams)))
  for thread, ts, dur, name in shown:
    label, color = category(name)
    y = streams.index(thread)
    ax.broken_barh([((max(ts, start) - start) / 1e3, (min(ts + dur, end) - max(ts, start)) / 1e3)], (y - 0.4, 0.8),
                   color=color, edgecolor="none")
  ax.set_yticks(range(len(streams)), [s.split("(")[0] for s in streams], fontsize=7)
  ax.set_xlabel("ms (measured)")
  ax.legend(handles=[matplotlib.patches.Patch(color=c, label=l) for l, c, _ in CATEGORIES], fontsize=7,
            loc="upper right", ncol=4)
  ax.set_title(title or f"measured timeline, {window_ms:g} ms from the middle of the trace", fontsize=9)
  fig.tight_layout()
  fig.savefig(out_png, dpi=130)
  plt.close(fig)


def nano_op_of(e: dict) -> str:
  """The executor's nano-op a kernel belongs to (its named scope `nano_<op>_<nano-batch>`, which XLA keeps in
  the kernel's op name), or ''."""
  m = re.search(r"nano_([a-z_]+?)_(\d+)(?:/|$)", " ".join(str(v) for v in e.get("args", {}).values()))
  return f"{m.group(1)}@{m.group(2)}" if m else ""


def kernel_sequence(path: str, window_ms: float = 6.0, limit: int = 100, min_us: float = 20) -> list[str]:
  """The kernels of `window_ms` from the middle of the trace in start order (those of at least `min_us`):
  start (ms into the window), duration, stream, nano-op, name and grid; which op ran where, after what."""
  events = sorted(_events(path), key=lambda te: float(te[1]["ts"]))
  if not events:
    return []
  start = _middle(events)
  rows = [f"| start ms | ms | stream | nano-op | kernel | grid |", "|---|---|---|---|---|---|"]
  for thread, e in events:
    ts = float(e["ts"])
    if start <= ts < start + window_ms * 1e3 and float(e["dur"]) >= min_us:
      # The grid tells a GEMM's SM share where the op name is lost (kernels inside a command buffer).
      grid = re.search(r"grid:([\d,]+)", str(e.get("args", {}).get("kernel_details", "")))
      rows.append(f"| {(ts - start) / 1e3:.3f} | {float(e['dur']) / 1e3:.3f} | {thread.split('(')[0]} | "
                  f"{nano_op_of(e)} | {e.get('name', '?')[:40]} | {grid.group(1) if grid else ''} |")
  return rows[:limit + 2]


def main(path: str, steps: int = 1) -> None:
  by_stream = stream_intervals(path)
  for name, ivs in sorted(by_stream.items()):
    print(f"{name}: {len(ivs) / steps:.0f} kernels, busy {busy(ivs) / 1e3 / steps:.2f} ms (per step)")
  print(f"two or more streams running kernels at once: {overlap_time(by_stream) / 1e3 / steps:.2f} ms per step")
  every = [iv for ivs in by_stream.values() for iv in ivs]
  if every:
    span = max(b for _, b in every) - min(a for a, _ in every)
    print(f"device: kernels running {busy(every) / 1e3 / steps:.2f} ms of a {span / 1e3 / steps:.2f} ms span per step "
          f"(idle {(span - busy(every)) / 1e3 / steps:.2f} ms)")
  idle = device_idle(path)
  if len(idle) > 1:   # several GPUs (tensor parallelism): each one's own idle time
    for proc, (b, span) in sorted(idle.items()):
      print(f"  {proc}: kernels {b / 1e3 / steps:.2f} ms of {span / 1e3 / steps:.2f} ms per step "
            f"(idle {(span - b) / 1e3 / steps:.2f} ms)")
  kinds = sorted(time_by_kind(path).items(), key=lambda kv: -kv[1][1])
  print("| kernel kind | kernels per step | ms per step |\n|---|---|---|")
  for kind, (n, t) in kinds[:20]:
    print(f"| {kind} | {n / steps:.0f} | {t / 1e3 / steps:.2f} |")
  print("kernels in start order, from the middle of the trace:")
  print("\n".join(kernel_sequence(path)))
  host = sorted(host_time_by_name(path).items(), key=lambda kv: -kv[1][1])
  print("| host event (all host threads) | count per step | ms per step |\n|---|---|---|")
  for name, (n, t) in host[:15]:
    print(f"| {name[:80]} | {n / steps:.1f} | {t / 1e3 / steps:.2f} |")


if __name__ == "__main__":
  args = [a for a in sys.argv[1:] if not a.startswith("--")]
  opts = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
  main(args[0], int(args[1]) if len(args) > 1 else 1)
  if "png" in opts:
    timeline_png(args[0], opts["png"], float(opts.get("window_ms", 6.0)))
    print("timeline:", opts["png"])
