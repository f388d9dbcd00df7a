"""What each of the sampler's costly parts adds to a step, by rows sampled (nanoflow_jax/sampler.py).

  python lab/sampler_bench.py --rows=1,64,512,1024 --vocab=128256 [--out=FILE.md]

The engine compiles the sampler per sampler.Modes, so a batch pays only for what its rows ask: greedy rows an
argmax, sampling rows a draw, top_k / top_p / min_p a search for each row's cut-off (32 / SEARCH_BITS passes
over the vocabulary; top_p or top_k rows alone run half of it; "top_p sort" is the one-sort reference it
replaced, sampler.truncate), logprobs a top-K (16 wide, or 20 where a row asks more), penalties two passes over
[rows, vocab]. Each mode is timed alone, on logits like a model's (fp32, normal), and printed against the greedy
sampler of the same rows and against the floor of reading the logits once at the copy bandwidth measured in the
same run.
"""
from __future__ import annotations

if __package__ in (None, ""):
  import _root  # noqa: F401  (the repository root on sys.path: lab/_root.py)

from absl import app, flags

from lab._report import report

FLAGS = flags.FLAGS
flags.DEFINE_list("rows", ["1", "64", "512", "1024"], "Rows sampled in one step.")
flags.DEFINE_integer("vocab", 128256, "Vocabulary size (LLaMA-3: 128256).")
flags.DEFINE_string("out", "", "Also write the table to this markdown file.")
flags.DEFINE_list("search_bits", [], "Also time top_p with the cut-off search at these bits a pass (sampler.SEARCH_BITS: "
                  "1, 2, 4 or 8; fewer bits: less work a pass, more passes).")

# (name, the Modes it compiles, the parameters every row gets)
MODES = [
    ("greedy", dict(all_greedy=True), dict(temperature=0.0)),
    ("sample", dict(all_greedy=False), dict(temperature=0.8)),
    # (the Modes sampler.modes_for gives such rows: top_p alone needs the masses only, top_k the counts)
    ("top_p", dict(all_greedy=False, truncation=True, by_rank=False, by_mass=True), dict(temperature=0.8, top_p=0.9)),
    ("top_k", dict(all_greedy=False, truncation=True, by_rank=True, by_mass=False), dict(temperature=0.8, top_k=50)),
    ("top_p sort", dict(all_greedy=False, truncation=True), dict(temperature=0.8, top_p=0.9)),
    ("logprobs", dict(all_greedy=True, logprobs=True, many_logprobs=True), dict(temperature=0.0, num_logprobs=20)),
    ("logprobs 16", dict(all_greedy=True, logprobs=True, many_logprobs=False), dict(temperature=0.0, num_logprobs=16)),
    ("penalties", dict(all_greedy=True, penalized=True), dict(temperature=0.0, repetition_penalty=1.1)),
]


def modes(search_bits=()) -> list:
  """MODES, and top_p again at each of `search_bits` ("top_p 2b": the search at 2 bits a pass)."""
  top_p = next(m for m in MODES if m[0] == "top_p")
  return MODES + [(f"top_p {b}b", top_p[1], top_p[2]) for b in search_bits]


def time_modes(rows: int, vocab: int, iters: int = 20, search_bits=()) -> dict[str, float]:
  """ms per call of sampler.sample for each of modes(search_bits), `rows` rows of fp32 logits over `vocab`."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from nanoflow_jax import sampler
  from nanoflow_jax.perf import median_seconds
  logits = jax.random.normal(jax.random.PRNGKey(rows), (rows, vocab), jnp.float32) * 3
  counts = jnp.zeros((rows, vocab), jnp.int32)
  prompt_mask = jnp.zeros((rows, vocab), jnp.bool_)
  out = {}
  for name, m_fields, params in modes(search_bits):
    p = sampler.SamplingArrays.empty(rows)
    for key, value in params.items():
      getattr(p, key)[:] = value
    m = sampler.Modes(**{"penalized": False, "all_greedy": False, "truncation": False, "logprobs": False, **m_fields})
    f = jax.jit(lambda logits, counts, mask, p, m=m: sampler.sample(logits, counts, mask, p, m))
    p = jax.tree.map(jnp.asarray, p)
    threshold, bits = sampler.truncate_by_threshold, sampler.SEARCH_BITS
    if name.endswith(" sort"):   # traced with the sort in the search's place
      sampler.truncate_by_threshold = lambda scaled, p, by_rank=True, by_mass=True: sampler.truncate(scaled, p)
    elif name.endswith("b"):     # "top_p 2b": the search at that many bits a pass
      sampler.SEARCH_BITS = int(name.split()[-1][:-1])
    try:
      out[name] = 1e3 * median_seconds(f, logits, counts, prompt_mask, p, iters=iters, samples=3)
    finally:
      sampler.truncate_by_threshold, sampler.SEARCH_BITS = threshold, bits
  return out


def main(argv):
  del argv
  import jax
  from launch.decode_sweep import copy_bandwidth
  bits = [int(b) for b in FLAGS.search_bits]
  if any(32 % b for b in bits):
    raise app.UsageError(f"--search_bits must divide 32 (1, 2, 4, 8, ...), got {FLAGS.search_bits}")
  bw = copy_bandwidth()["best"]   # TB/s, measured now
  lines = [f"sampler by mode on {jax.devices()[0].device_kind}, vocab {FLAGS.vocab}; copy bandwidth {bw:.2f} TB/s",
           "", "| rows | " + " | ".join(f"{name} ms" for name, _, _ in modes(bits)) +
           " | read floor ms | top_p / greedy | sort / search |", "|---|" + "---|" * (len(modes(bits)) + 3)]
  for rows in map(int, FLAGS.rows):
    t = time_modes(rows, FLAGS.vocab, search_bits=bits)
    floor = rows * FLAGS.vocab * 4 / (bw * 1e12) * 1e3   # the logits read once
    lines.append(f"| {rows} | " + " | ".join(f"{t[name]:.3f}" for name, _, _ in modes(bits)) +
                 f" | {floor:.3f} | {t['top_p'] / t['greedy']:.1f}x | {t['top_p sort'] / t['top_p']:.1f}x |")
    print(lines[-1], flush=True)
  text = "\n".join(lines)
  report(text, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
