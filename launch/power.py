"""The GPUs' power, clocks and clock-event reasons sampled by nvidia-smi while work runs, and the bound a
phase's mean power sets on any schedule of its work (limit / mean: the work's energy does not depend on how
it is scheduled). Shared by benchmark.py (--power_sample_ms) and lab/clock_probe.py; tested on the CPU with a
stand-in for nvidia-smi."""
from __future__ import annotations

import collections
import statistics
import subprocess
import threading
import time

FIELDS = ("clocks.sm", "clocks.mem", "power.draw", "temperature.gpu")
# nvidia-smi's clock-event reason bits (nvmlClocksEventReasons): why the SM clock is below its maximum.
REASONS = {0x1: "idle", 0x2: "app clocks", 0x4: "sw power cap", 0x8: "hw slowdown", 0x10: "sync boost",
           0x20: "sw thermal", 0x40: "hw thermal", 0x80: "hw power brake", 0x100: "display clocks"}
SKIP_S = 0.3   # samples this soon after a phase starts still show the one before


def _smi_query(fields: list[str]) -> list[str] | None:
  """One nvidia-smi reading of `fields`, or None where nvidia-smi is missing or refuses a field."""
  from nanoflow_jax import compat
  return compat.nvidia_smi_query(fields)


def smi_command(period_ms: int, all_gpus: bool = False) -> list[str] | None:
  """The sampling command: FIELDS and the clock-event reasons under their current name (older drivers
  call them throttle reasons); None without nvidia-smi. all_gpus: every GPU's reading, each line led by
  the GPU's index (one line per GPU and period); otherwise GPU 0's alone."""
  for reasons in ("clocks_event_reasons.active", "clocks_throttle_reasons.active"):
    if _smi_query([*FIELDS, reasons]) is not None:
      fields = ("index", *FIELDS, reasons) if all_gpus else (*FIELDS, reasons)
      return ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits",
              *([] if all_gpus else ["-i", "0"]), "-lms", str(period_ms)]
  return None


def parse_sample(line: str) -> dict | None:
  """One CSV line of the sampler: SM and memory clocks (MHz), power (W), temperature (C), the reason bits
  and the GPU (the line's leading index where smi_command(all_gpus=True) asked for one, else 0); None for
  a line that is not a reading (a header, an error); a field nvidia-smi cannot read ([N/A]) is None."""
  parts = [p.strip() for p in line.split(",")]
  gpu = 0
  if len(parts) == len(FIELDS) + 2:   # led by the GPU's index
    try:
      gpu = int(parts[0])
    except ValueError:
      return None
    parts = parts[1:]
  if len(parts) != len(FIELDS) + 1:
    return None

  def num(v):
    try:
      return float(v)
    except ValueError:
      return None
  values = [num(v) for v in parts[:-1]]
  if all(v is None for v in values):
    return None
  try:
    reasons = int(parts[-1], 16)
  except ValueError:
    reasons = None
  return dict(zip(("sm_mhz", "mem_mhz", "power_w", "temp_c"), values), reasons=reasons, gpu=gpu)


class Sampler:
  """Runs `command` (a sampler printing one reading per line) in the background and keeps each parsed
  line with the host's time of its arrival (time.perf_counter, the clock of the engine's step records)."""

  def __init__(self, command: list[str] | None):
    self.command, self.samples, self._proc, self._thread = command, [], None, None

  def __enter__(self):
    if self.command:
      self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
      self._thread = threading.Thread(target=self._read, daemon=True)
      self._thread.start()
    return self

  def _read(self):
    for line in self._proc.stdout:
      s = parse_sample(line)
      if s is not None:
        self.samples.append((time.perf_counter(), s))

  def __exit__(self, *exc):
    if self._proc:
      self._proc.terminate()
      self._proc.wait(timeout=10)
      self._thread.join(timeout=10)


def summarize(samples: list[tuple[float, dict]], start: float, end: float, gpu: int | None = None,
              skip_s: float = SKIP_S) -> dict:
  """Medians of the readings inside [start + skip_s, end] (of GPU `gpu`; None: every GPU's), the highest
  power, and the share of readings in which each clock-event reason was set."""
  return summarize_readings([s for t, s in samples if start + skip_s <= t <= end and gpu in (None, s.get("gpu", 0))])


def summarize_readings(inside: list[dict]) -> dict:
  """summarize's figures over the readings given."""
  out = {"samples": len(inside)}
  for key in ("sm_mhz", "mem_mhz", "power_w", "temp_c"):
    vals = [s[key] for s in inside if s[key] is not None]
    out[key] = statistics.median(vals) if vals else None
  powers = [s["power_w"] for s in inside if s["power_w"] is not None]
  out["max_power_w"] = max(powers) if powers else None
  out["mean_power_w"] = statistics.fmean(powers) if powers else None   # the energy, where the median is not
  counts = collections.Counter(name for s in inside if s["reasons"] is not None
                               for bit, name in REASONS.items() if s["reasons"] & bit)
  out["reasons"] = {name: n / len(inside) for name, n in counts.most_common()} if inside else {}
  return out


def in_windows(samples: list[tuple[float, dict]], windows: list[tuple[float, float]], gpu: int) -> list[dict]:
  """GPU `gpu`'s readings taken inside any of `windows` ([start, end) pairs, sorted, not overlapping)."""
  import bisect
  starts = [w[0] for w in windows]
  out = []
  for t, s in samples:
    k = bisect.bisect_right(starts, t) - 1
    if k >= 0 and t < windows[k][1] and s.get("gpu", 0) == gpu:
      out.append(s)
  return out


def power_limit_w() -> float | None:
  """GPU 0's enforced power limit (W), or None without nvidia-smi or where it reads [N/A]."""
  r = _smi_query(["enforced.power.limit"])
  try:
    return float(r[0]) if r else None
  except ValueError:
    return None


def windows_power(samples: list[tuple[float, dict]], windows: list[tuple[float, float]], idle: tuple[float, float],
                  limit_w: float | None) -> dict:
  """Per GPU: the readings inside `windows` summarized (mean power = the energy over the windows' time),
  the idle readings' mean power, and the speed-up bounds: limit / mean (if the work's energy does not depend
  on its schedule), and (limit - idle) / (mean - idle) (if, further, the idle draw is static power that a
  shorter schedule would save; the idle clocks are lower, so the static power at work is underestimated
  and this bound is loose). The step's bound is the smallest over GPUs: every GPU does its share of each step."""
  gpus = sorted({s.get("gpu", 0) for _, s in samples})
  out = {"limit_w": limit_w, "gpus": {}}
  for g in gpus:
    busy = summarize_readings(in_windows(samples, windows, g))
    idle_w = summarize(samples, *idle, gpu=g, skip_s=0.0)["mean_power_w"]
    bound = speedup_bound(busy["mean_power_w"], limit_w)
    static_bound = (speedup_bound(busy["mean_power_w"] - idle_w, limit_w - idle_w)
                    if bound and idle_w is not None and busy["mean_power_w"] > idle_w else None)
    out["gpus"][g] = {**busy, "idle_mean_power_w": idle_w, "bound": bound, "bound_static_idle": static_bound}
  bounds = [v["bound"] for v in out["gpus"].values() if v["bound"]]
  static = [v["bound_static_idle"] for v in out["gpus"].values() if v["bound_static_idle"]]
  out["bound"] = min(bounds) if bounds else None
  out["bound_static_idle"] = min(static) if static else None
  return out


def speedup_bound(mean_w: float | None, limit_w: float | None) -> float | None:
  """The most any schedule of the same work can gain over a phase that drew `mean_w` on average, if the
  work's energy does not depend on the schedule and the board holds its power at `limit_w`: the time
  cannot fall below energy / limit = time x mean_w / limit_w."""
  if not mean_w or not limit_w:
    return None
  return limit_w / mean_w


class Windows:
  """Host-time windows in which each key's work ran (an op, a pair of kernels), read against a Sampler's
  readings afterwards: the median power per key (the auto-search's stage 1)."""

  def __init__(self, sampler: Sampler):
    self.sampler, self.windows = sampler, {}

  def run(self, key, fn):
    """fn()'s result; its window kept under `key` (None: not kept)."""
    start = time.perf_counter()
    out = fn()
    if key is not None:
      self.windows.setdefault(key, []).append((start, time.perf_counter()))
    return out

  def medians(self, gpu: int = 0) -> dict[str, float]:
    """Each key's median power (W) over GPU `gpu`'s readings inside its windows; keys without readings left out."""
    out = {}
    for key, windows in self.windows.items():
      readings = [r["power_w"] for r in in_windows(self.sampler.samples, sorted(windows), gpu)
                  if r.get("power_w") is not None]
      if readings:
        out[key] = statistics.median(readings)
    return out
