"""Throughput by workload and mode, from several `launch/benchmark.py --json_out` files, in one PNG.

Each benchmark run writes its own plot (one workload, its modes); docs/benchmarks.md wants the whole set
side by side: one group of bars per workload, one bar per mode, each labelled with its percent of optimal.

  python lab/plot_workloads.py --out=docs/img/throughput_by_workload.png run1.json run2.json ...
"""
from __future__ import annotations

import json
import os

if __package__ in (None, ""):
  import _root  # noqa: F401  (the repository root on sys.path: lab/_root.py)

from absl import app, flags

FLAGS = flags.FLAGS
MODE_COLORS = {"nanoflow": "tab:blue", "sequential": "tab:orange"}


def define_flags():
  """Defined only when this file runs as a program (tests import it beside other launch modules)."""
  flags.DEFINE_string("out", None, "The PNG to write.", required=True)
  flags.DEFINE_string("title", None, "The plot's title (default: the model and device of the runs).")


def load_runs(paths: list[str]) -> list[dict]:
  """One row per (file, mode): workload, mode, total tokens/s, percent of optimal, model, device. A file
  that is not a benchmark's offline JSON is refused by name."""
  rows = []
  for path in paths:
    with open(path) as f:
      data = json.load(f)
    results = data.get("results")
    if not isinstance(results, dict) or not results:
      raise ValueError(f"{path}: no 'results' by mode; is it a launch/benchmark.py --json_out file?")
    for mode, r in results.items():
      if "offline" not in r:
        raise ValueError(f"{path}: mode {mode!r} has no offline results (an online sweep is plotted by "
                         "benchmark.py itself)")
      env = r.get("environment", {})
      rows.append(dict(workload=env.get("workload") or os.path.basename(path), mode=mode,
                       tokens_per_s=r["offline"]["total_tokens_per_s"],
                       percent=r["offline"]["percent_of_optimal"], model=env.get("model", "?"),
                       device=env.get("device", "?")))
  return rows


def plot(rows: list[dict], path: str, title: str | None = None) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  workloads = list(dict.fromkeys(r["workload"] for r in rows))
  modes = list(dict.fromkeys(r["mode"] for r in rows))
  width = 0.8 / len(modes)
  fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(workloads), 4.2))
  for j, mode in enumerate(modes):
    for i, w in enumerate(workloads):
      r = next((r for r in rows if r["workload"] == w and r["mode"] == mode), None)
      if r is None:
        continue
      x = i + (j - (len(modes) - 1) / 2) * width
      ax.bar(x, r["tokens_per_s"], width, color=MODE_COLORS.get(mode), label=mode if i == 0 else None)
      ax.text(x, r["tokens_per_s"], f"{r['percent']:.0f}%", ha="center", va="bottom", fontsize=8)
  ax.set_xticks(range(len(workloads)), workloads)
  ax.set_ylabel("total tokens/s (label: % of optimal)")
  models = sorted({f"{r['model']} on {r['device']}" for r in rows})
  ax.set_title(title or ", ".join(models))
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("give one or more benchmark JSON files")
  try:
    rows = load_runs(argv[1:])
  except (OSError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  plot(rows, FLAGS.out, FLAGS.title)
  print(f"wrote {FLAGS.out}: {len(rows)} bars")


if __name__ == "__main__":
  define_flags()
  app.run(main)
