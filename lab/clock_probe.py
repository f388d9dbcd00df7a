"""What the SM clock and the board power do while the step's kernels run alone and side by side.

Why: beside the decode attention, the gate_up GEMM and the attention each run slower than alone on their
SM shares (history/perf-notes.md, sessions 5 and 7: together 1.2-1.45x the longer chain alone), so the nano-batch
pipeline loses on one H200. If the pair drives the board into its power limit, the SM clock drops for
both, and no split of the SMs wins that back. This holds each phase for --seconds while `nvidia-smi`
samples the SM clock, power and clock-event reasons, and prints one row per phase:

  idle | XLA GEMM 8192^3 of ones, then of random data | gate_up by XLA's dot | gate_up on all SMs |
  gate_up on (all - share) | decode attention on all SMs | decode attention on share |
  the two chains together (gate_up on the rest, attention on share)
  [--step] a whole engine step of the decode/prefill mix, sequential and nanoflow (decode-overlap)

Each row also gives the board's power limit over the phase's mean power: if the work's energy does not
depend on how it is scheduled, no schedule of it (no overlap, no SM split) can run faster than that factor.
The step rows bound what the nano-batch pipeline can gain over the sequential step.

  PYTHONPATH=.:.carry python3 lab/clock_probe.py --share=33 --seconds=4 --out=DIR/clock_probe.md
  ... --share=66 --attention_variant=programs_per_sm=1     # one attention CTA per SM of its share
  ... --step --nokernel_phases --seconds=6                 # the whole step's power

Needs a GPU (and nvidia-smi for the clocks; without it the table has the timings only). The sampler and
the per-phase summary are tested on a CPU with a stand-in for nvidia-smi.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time

if __package__ in (None, ""):
  import _root  # noqa: F401  (the repository root on sys.path: lab/_root.py)

from absl import app, flags

from lab._report import report
from launch.power import (FIELDS, REASONS, SKIP_S, Sampler, _smi_query, in_windows, parse_sample, power_limit_w,  # noqa: F401
                          smi_command, speedup_bound, summarize, summarize_readings, windows_power)

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags, defined only when this file runs as a program: the tests import it beside
  other launch modules whose flags share names (--out)."""
  flags.DEFINE_integer("share", 33, "SMs of the decode attention; the gate_up GEMM gets the rest.")
  flags.DEFINE_float("seconds", 4.0, "How long each phase runs.")
  flags.DEFINE_integer("sample_ms", 100, "nvidia-smi's sampling period.")
  flags.DEFINE_integer("gemm_rows", 1536, "Rows of the gate_up GEMM (the step's prefill rows).")
  flags.DEFINE_string("attention_variant", "", "Changes to the decode attention's configuration on its share "
                      "(key=value,...; e.g. programs_per_sm=1: one CTA per SM of the share).")
  flags.DEFINE_bool("kernel_phases", True, "Hold the kernel phases (GEMMs, attention, the pair).")
  flags.DEFINE_bool("step", False, "Also hold whole engine steps of the decode/prefill mix (--decodes, --context, "
                    "--prefill): sequential, and nanoflow's decode-overlap with the attention on --share SMs.")
  flags.DEFINE_integer("decodes", 512, "The step's decoding sequences.")
  flags.DEFINE_integer("context", 1024, "Their context length.")
  flags.DEFINE_integer("prefill", 1536, "The step's prefill tokens.")
  flags.DEFINE_string("kv_cache_dtype", "auto", "The step's KV cache element type (auto, fp8).")
  flags.DEFINE_string("out", None, "Write the table (markdown) here.")

def hold(fn, args: tuple, seconds: float) -> tuple[float, float, float]:
  """Calls fn(*args) back to back for about `seconds` (compiled and warmed first): (start, end, seconds
  per call)."""
  import jax
  from nanoflow_jax.perf import median_seconds
  per_call = median_seconds(fn, *args, iters=3, samples=3)
  calls = max(1, math.ceil(seconds / per_call))
  start = time.perf_counter()
  for _ in range(calls):
    r = fn(*args)
  jax.block_until_ready(r)
  end = time.perf_counter()
  return start, end, (end - start) / calls


def _fmt(v, spec: str) -> str:
  return "-" if v is None else format(v, spec)


def table(rows: list[tuple[str, float | None, dict]], limits: list[str] | None) -> str:
  """Markdown: one row per phase (ms per call, SM clock, power, temperature, reasons)."""
  lines = []
  if limits:
    lines.append(f"Power limit {limits[0]} W (enforced {limits[1]} W), max SM clock {limits[2]} MHz.\n")
  try:
    limit_w = float(limits[1]) if limits else None
  except ValueError:   # [N/A]
    limit_w = None
  lines += ["| phase | ms per call | SM MHz | memory MHz | power W (median / mean / max) | temp C | clock reasons "
            "(share of samples) | speed-up bound (limit / mean) | samples |", "|---|---|---|---|---|---|---|---|---|"]
  for name, per_call, s in rows:
    reasons = ", ".join(f"{k} {v:.0%}" for k, v in s["reasons"].items()) or "-"
    bound = speedup_bound(s["mean_power_w"], limit_w)
    lines.append(f"| {name} | {_fmt(per_call and per_call * 1e3, '.3f')} | {_fmt(s['sm_mhz'], '.0f')} | "
                 f"{_fmt(s['mem_mhz'], '.0f')} | {_fmt(s['power_w'], '.0f')} / {_fmt(s['mean_power_w'], '.0f')} / "
                 f"{_fmt(s['max_power_w'], '.0f')} | {_fmt(s['temp_c'], '.0f')} | {reasons} | "
                 f"{_fmt(bound, '.2f') + ('x' if bound else '')} | {s['samples']} |")
  return "\n".join(lines)


def kernel_phases(share: int, gemm_rows: int, attention_variant: dict) -> list[tuple]:
  """(name, opener) of each kernel phase, as hold_phases takes them: XLA's GEMM peak on ones and on random
  data, gate_up by XLA and ours, the decode attention, and the pair as kernel_bench --beside_gemm times it
  (chains of about equal length on two streams; `attention_variant` changes the attention on its share)."""
  import jax
  import jax.numpy as jnp
  from lab import kernel_bench   # here, not at the top: its flags would collide in a test process
  from nanoflow_jax import perf
  from pallas_kernels import gemm
  from pallas_kernels.paged_attention import configs
  num_sms = jax.devices()[0].core_count
  problem = kernel_bench._attention_problem("decode")
  q, cache = problem[0], problem[1]
  engine_cfg = configs("triton", cache[0].dtype)[0]
  attention = lambda sms, cfg=engine_cfg: kernel_bench.decode_attention_at(problem, cfg, sms)
  on_share = attention(share, {**engine_cfg, **attention_variant})
  gemm_at = lambda sms: (lambda a, b: gemm.gemm(a, b, num_sms=sms))
  a, b = kernel_bench.gate_up_operands("llama-3-8b", gemm_rows)
  big = jnp.ones((8192, 8192), jnp.bfloat16)
  big_random = jax.random.normal(jax.random.PRNGKey(1), (8192, 8192), jnp.bfloat16)
  t_g = perf.median_seconds(jax.jit(gemm_at(num_sms - share)), a, b)
  t_a = perf.median_seconds(jax.jit(on_share), q, *cache)
  reps_g, reps_a = perf.balanced_reps(t_g, t_a)
  pair, in_g, in_a, chain_g, chain_a = perf.concurrent_step(gemm_at(num_sms - share), (a, b), reps_g,
                                                            on_share, (q, *cache), reps_a)
  variant = f" ({','.join(f'{k}={v}' for k, v in attention_variant.items())})" if attention_variant else ""
  return [(name, lambda fn=fn, args=args: contextlib.nullcontext((fn, args))) for name, fn, args in [
      ("XLA GEMM 8192^3 of ones (the runs' GEMM peak)", jax.jit(lambda x: x @ x), (big,)),
      ("XLA GEMM 8192^3 of random data", jax.jit(lambda x: x @ x), (big_random,)),
      (f"gate_up {gemm_rows} rows, XLA's dot", jax.jit(lambda a, b: jnp.dot(a, b)), (a, b)),
      (f"gate_up {gemm_rows} rows on {num_sms} SMs", jax.jit(gemm_at(num_sms)), (a, b)),
      (f"gate_up chain x{reps_g} on {num_sms - share} SMs", chain_g, in_g),
      (f"decode attention on {num_sms} SMs", jax.jit(attention(num_sms)), (q, *cache)),
      (f"decode attention{variant} chain x{reps_a} on {share} SMs", chain_a, in_a),
      (f"both chains together ({num_sms - share} + {share} SMs{variant})", pair, (in_g, in_a)),
  ]]


def main(argv):
  del argv
  from nanoflow_jax import compat
  if FLAGS.step:   # the engine's nanoflow flags, set before the backend starts (the kernel phases run under them too)
    compat.enable_concurrent_command_buffers()
  import jax
  from pallas_kernels.paged_attention import config_changes
  if jax.default_backend() != "gpu":
    sys.exit("clock_probe needs a GPU: the phases are GPU kernels at real shapes")
  variant = config_changes(FLAGS.attention_variant)
  phases = kernel_phases(FLAGS.share, FLAGS.gemm_rows, variant) if FLAGS.kernel_phases else []
  if FLAGS.step:
    phases += step_phases(FLAGS.share, FLAGS.decodes, FLAGS.context, FLAGS.prefill, FLAGS.kv_cache_dtype)
  rows = hold_phases(phases, FLAGS.seconds, smi_command(FLAGS.sample_ms))
  text = table(rows, _smi_query(["power.limit", "enforced.power.limit", "clocks.max.sm"]))
  if not any(s["samples"] for _, _, s in rows):
    text += "\n\nnvidia-smi gave no readings: timings only."
  report(text, FLAGS.out)


def step_phases(share: int, decodes: int, context: int, prefill: int, kv_cache_dtype: str,
                model_name: str = "llama-3-8b", kernels: str = "triton") -> list[tuple]:
  """(name, opener) of whole engine steps of the mix (`model_name`'s shape, random weights): sequential, and
  decode-overlap with the attention on `share` SMs. `opener()` is a context manager yielding (fn, args):
  each step's executor (and its KV cache) exists only while its phase runs. The nanoflow step overlaps only
  under the engine's XLA flags (compat), which main sets."""
  import jax
  from launch.mixed_step import MixedStep
  from nanoflow_jax.engine import KV_CACHE_DTYPES
  from nanoflow_jax.model import load_model
  from nanoflow_jax.runtime.plan import BESIDE_ALL, decode_overlap, generic_default, with_beside_share
  model = load_model(model_name, dtype="bfloat16", random_weights=True)
  step = MixedStep(model, decodes, context, prefill)
  num_sms = getattr(jax.devices()[0], "core_count", 132) or 132
  plan = with_beside_share(decode_overlap(step.dense, generic_default(step.dense, num_sms).num_sms, decodes,
                                          beside=BESIDE_ALL), share)
  options = dict(kernels=kernels, kv_dtype=KV_CACHE_DTYPES[kv_cache_dtype])
  return [(f"step, sequential: {step.describe}", lambda: step.prepared(None, **options)),
          (f"step, nanoflow {plan.name}, attention on {share} SMs", lambda: step.prepared(plan, **options))]


def hold_phases(phases: list[tuple], seconds: float, command: list[str] | None) -> list[tuple[str, float | None, dict]]:
  """Holds idle, then each phase, for `seconds` each while `command` (nvidia-smi) samples: (name, seconds
  per call, summary) per phase. A phase is (name, opener): opener() a context manager yielding (fn, args)."""
  rows = []
  with Sampler(command) as sampler:
    time.sleep(seconds)   # idle first: the clocks with nothing running
    t = time.perf_counter()
    rows.append(("idle", None, (t - seconds, t)))
    for name, opener in phases:
      with opener() as (fn, args):
        start, end, per_call = hold(fn, args, seconds)
      rows.append((name, per_call, (start, end)))
      print(name, f"{per_call * 1e3:.3f} ms per call", flush=True)
  return [(name, per_call, summarize(sampler.samples, *window)) for name, per_call, window in rows]


if __name__ == "__main__":
  define_flags()
  app.run(main)
