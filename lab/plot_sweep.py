"""A bar chart of an attention sweep (the markdown tables lab/kernel_bench.py writes): each variant's rate,
best first, against the read-only and copy ceilings measured in the same run.

  python lab/plot_sweep.py --tables=docs/history/runs/2026-12-04-s17-sweep-fp8-3.md --section="context 1024" \\
    --out=docs/img/fp8_decode_sweep_s17.png --title="fp8 decode attention, 512 seqs at context 1024"
"""
from __future__ import annotations

import re

if __package__ in (None, ""):
  import _root  # noqa: F401  (the repository root on sys.path: lab/_root.py)

from absl import app, flags

FLAGS = flags.FLAGS
ROW = re.compile(r"^\| (?P<label>[^|]+?) \| (?P<sms>[^|]+) \| (?P<value>[\d.]+) (?P<unit>TB/s|TFLOP/s) \|")
# the settings that tell variants apart (the rest is the same in every row of a sweep)
SHOWN = ("block_n", "num_warps", "num_stages", "programs_per_sm", "prefetch_pages", "dot_fp8", "swap_ab",
         "key_groups")


def read_table(text: str, section: str | None = None) -> tuple[list[tuple[str, float]], dict[str, float]]:
  """(variants as (label, rate), ceilings by name) from kernel_bench's markdown; `section`: only the lines under
  the "## <section>" heading."""
  if section is not None:
    parts = re.split(r"^## ", text, flags=re.M)
    text = next((p for p in parts if p.startswith(section)), "")
  variants, ceilings = [], {}
  for line in text.splitlines():
    m = ROW.match(line)
    if not m:
      continue
    label, value = m["label"], float(m["value"])
    if label.startswith("copy"):
      ceilings["copy"] = value
    elif label.startswith("read only"):
      ceilings["read only"] = value
    elif m["unit"] == "TB/s":
      settings = dict(re.findall(r"(\w+)=(\w+)", label))
      variants.append((" ".join(f"{k}={settings[k]}" for k in SHOWN if k in settings), value))
  return variants, ceilings


def plot(variants, ceilings, path: str, title: str, marked: dict[str, str] | None = None) -> None:
  """marked: label -> legend text of variants drawn in their own colours (the engine's configurations)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  marked = marked or {}
  variants = sorted(variants, key=lambda v: v[1])
  fig, ax = plt.subplots(figsize=(11, 0.26 * len(variants) + 1.4))
  colors = {label: f"C{k + 3}" for k, label in enumerate(marked)}
  ax.barh(range(len(variants)), [v for _, v in variants], color=[colors.get(label, "C0") for label, _ in variants])
  for label, text in marked.items():
    ax.barh([0], [0], color=colors[label], label=text)   # legend entries only
  ax.set_yticks(range(len(variants)), [label for label, _ in variants], fontsize=7)
  for k, (name, value) in enumerate(sorted(ceilings.items())):
    ax.axvline(value, color=f"C{k + 1}", ls="--", label=f"{name} {value:.2f} TB/s")
  ax.set_xlabel("TB/s of KV bytes read")
  ax.set_title(title, fontsize=9, loc="left")
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def read_tables(specs: list[str]) -> tuple[list[tuple[str, float]], dict[str, float]]:
  """read_table over "path" or "path#section" specs, merged (a variant's first figure, each ceiling's lowest)."""
  variants: dict[str, float] = {}
  ceilings: dict[str, float] = {}
  for spec in specs:
    path, _, section = spec.partition("#")
    with open(path) as f:
      vs, cs = read_table(f.read(), section or None)
    for label, value in vs:
      variants.setdefault(label, value)
    for name, value in cs.items():
      ceilings[name] = min(value, ceilings.get(name, value))
  return list(variants.items()), ceilings


def main(argv):
  del argv
  variants, ceilings = read_tables(FLAGS.tables)
  if not variants:
    raise SystemExit(f"no TB/s rows in {FLAGS.tables}")
  marked = {}   # label -> legend text
  for item in FLAGS.mark:
    text, _, label = item.partition("=")
    marked[label] = text
  plot(variants, ceilings, FLAGS.out, FLAGS.title, marked)
  print(f"{len(variants)} variants -> {FLAGS.out}")


if __name__ == "__main__":
  flags.DEFINE_list("tables", None, "kernel_bench's markdown tables, each 'path' or 'path#section' (only the rows "
                    "under that '## ' heading).", required=True)
  flags.DEFINE_string("out", "/tmp/sweep.png", "The PNG.")
  flags.DEFINE_multi_string("mark", [], "TEXT=LABEL: draw the variant LABEL (as the chart names it) in a colour of its "
                            "own, TEXT in the legend; may be repeated.")
  flags.DEFINE_string("title", "decode attention sweep", "The chart's title.")
  app.run(main)
