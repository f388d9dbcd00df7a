"""Throughput and latency on the paper's workloads.

  # offline: all requests at once; --compare=sequential also runs the sequential baseline in this process
  PYTHONPATH=. python3 launch/benchmark.py --model=llama-3-8b --random_weights --workload=1024-512 \
      --num_requests=1000 --mode=nanoflow --compare=sequential --json_out=/tmp/b.json --plot_out=/tmp/b.png
  # online: Poisson arrivals at each rate (requests/s), through the engine's async API
  PYTHONPATH=. python3 launch/benchmark.py --model=tiny --random_weights --workload=splitwise --rates=2,4,8

percent_of_optimal = total tokens/s / (GEMM peak measured in this run / (2 x parameters)): the paper's
optimum, where every token costs 2 x parameters FLOPs at the GEMM peak.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from launch import engine_flags, http_client, step_records, workloads
from nanoflow_jax import gc_policy
from nanoflow_jax.perf import gemm_peak_tflops

FLAGS = flags.FLAGS
engine_flags.define(max_num_seqs=512)
flags.DEFINE_string("workload", "1024-512", f"One of {workloads.NAMES}.")
flags.DEFINE_string("workload_file", None, "CSV with ContextTokens,GeneratedTokens columns.")
flags.DEFINE_integer("num_requests", 200, "Requests (first rows of a file, unless --sample).")
flags.DEFINE_bool("sample", False, "Seeded random sample of the file's rows.")
flags.DEFINE_integer("seed", 0, "Seed for lengths, prompts and arrivals.")
flags.DEFINE_enum("compare", None, ["sequential", "overlap"], "Also run the same workload (or --decode_sweep) on the "
                  "same loaded model and print the ratio: sequential = that mode; overlap = this mode with "
                  "--overlap_dispatch the other way.")
flags.DEFINE_list("rates", [], "Online mode: request rates (req/s) to sweep; empty: offline mode.")
flags.DEFINE_float("think_time_s", 0.0, "Online multi-round: the user's mean pause (exponential, seconds) between a "
                   "round's answer and the next round; 0: at once. Pauses keep many conversations' histories "
                   "idle at the same time, as chat users do, so the KV pool must hold (or evict) them.")
flags.register_validator("think_time_s", lambda v: v >= 0, "--think_time_s must be >= 0")
flags.DEFINE_string("url", None, "Online mode through HTTP: a running server's base URL (e.g. http://127.0.0.1:8000).")
flags.DEFINE_string("api_key", None, "Bearer key for --url.")
flags.DEFINE_float("slo_ms", 200.0, "Online: p99 normalized latency bound (ms per output token).")
flags.DEFINE_list("decode_sweep", [], "Decode latency sweep (launch/decode_sweep.py) at these batch sizes, e.g. "
                  "1,8,32,128,512: each decode-only step through the engine loop against its bytes floor at the "
                  "copy bandwidth measured in the same run; replaces the workload run.")
flags.DEFINE_integer("decode_context", 1024, "--decode_sweep: the decoding sequences' context.")
flags.DEFINE_list("ttft_prompts", ["128", "1024"], "--decode_sweep: after the batches, the TTFT of one prompt of each "
                  "of these lengths on the idle engine (issue 27: one prefill step plus the host's part).")
flags.DEFINE_multi_string("decode_variants", [], "--decode_sweep: after the flags' engine, engines with these changes "
                          "to its options, each NAME:key=value[,key=value...] (build_engine's arguments, e.g. "
                          "graph:small_step_attention=64,split_decode_keys=true), swept on the same loaded model in "
                          "this process (issue 27's small-step variants at one load each).")
flags.DEFINE_bool("plain_baseline", False, "--decode_sweep: after the engine's sweep, the same batch sizes through "
                  "the plain JAX decode step (launch/plain_decode.py: the model's layers unrolled in one jit, XLA's "
                  "dot and jnp attention over a contiguous bf16 cache), in the same process.")
flags.DEFINE_string("json_out", None, "Write every figure and the environment here.")
flags.DEFINE_string("trace_dir", None, "Offline: write a profiler trace (perfetto) of --trace_steps here and print "
                    "the kernel time by kind and the device's idle time per step.")
flags.DEFINE_string("trace_steps", "400:405", "Offline: the steps [first:last) --trace_dir traces (steady state).")
flags.DEFINE_string("plot_out", None, "Write a PNG of the results here.")
flags.DEFINE_integer("power_sample_ms", 0, "Offline: sample every GPU's power and SM clock (nvidia-smi) at this "
                     "period through the run, and report them over the steady state's full steps with the speed-up "
                     "bound the power limit sets (perf-notes, session 10); 0: off.")


def environment(mode: str, engine_options: dict | None = None) -> dict:
  """The run's device, versions, commit and settings; engine_options: build_engine's arguments as run (default:
  the flags')."""
  import jax
  try:
    r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    commit = r.stdout.strip() if r.returncode == 0 else "unknown (not a git checkout)"
  except OSError:
    commit = "unknown (no git)"
  dev = jax.devices()[0]
  return {"device": dev.device_kind, "num_devices": FLAGS.tp, "jax": jax.__version__,
          "python": platform.python_version(), "model": FLAGS.model, "mode": mode, "git_commit": commit,
          "workload": FLAGS.workload_file or FLAGS.workload, "dense_batch": FLAGS.dense_batch,
          "max_num_seqs": FLAGS.max_num_seqs, "kernels": FLAGS.kernels,
          "engine_options": engine_options if engine_options is not None else engine_flags.engine_kwargs()}


def make_requests(max_model_len: int, vocab: int, seed_offset: int = 0):
  """(prompt ids, output length) per request; for --workload=multiround, the Conversations that make them.
  seed_offset: another draw of the same workload (each online rate gets its own, or the prefix cache would
  serve a later rate the prompts of an earlier one)."""
  import numpy as np
  seed = FLAGS.seed + seed_offset
  if FLAGS.workload == "multiround":
    from launch.conversations import Conversations
    return Conversations(FLAGS.num_requests, seed, vocab, max_model_len, params)
  lens = workloads.lengths(FLAGS.workload, FLAGS.num_requests, seed, FLAGS.workload_file, FLAGS.sample,
                           max_model_len)
  rng = np.random.default_rng(seed)
  return [(rng.integers(0, vocab, size=i).tolist(), o) for i, o in lens]


def params(out_len: int):
  from nanoflow_jax.sampling_params import SamplingParams
  return SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=0.0, detokenize=False)


def run_offline(engine, requests, peak: float, peak_random: float) -> dict:
  import contextlib
  from launch import power
  engine.warm_up()   # before the sampler: compiling is not the run
  gc_policy.freeze_startup_heap()
  with contextlib.ExitStack() as stack:
    sampler = None
    if FLAGS.power_sample_ms:
      sampler = stack.enter_context(power.Sampler(power.smi_command(FLAGS.power_sample_ms, all_gpus=True)))
      idle = (time.perf_counter(), time.perf_counter() + IDLE_S)
      time.sleep(IDLE_S)
    out = _run_offline(engine, requests, peak, peak_random)
  if sampler is not None:
    windows = step_records.full_step_windows(out["step_records"], engine.config.dense_batch)
    out["power"] = power.windows_power(sampler.samples, windows, idle, power.power_limit_w())
    out["power"]["steady_seconds_sampled"] = sum(b - a for a, b in windows)
  return out


IDLE_S = 3.0   # the idle readings taken before a sampled run
PEAK_FP8: list = []   # the fp8 GEMM peak, measured once in main() for --quantization=fp8


def _run_offline(engine, requests, peak: float, peak_random: float) -> dict:
  """The timed run of a warmed-up engine."""
  import jax
  from tqdm import tqdm
  engine.stats.step_records = []
  stats0 = dict(vars(engine.stats))
  pool0 = (engine.pool.queried_tokens, engine.pool.hit_tokens, engine.pool.evictions)
  compiled0 = set(engine.executor.compile_seconds)
  conversations = requests if not isinstance(requests, list) else None
  t0 = time.perf_counter()
  if conversations is not None:   # rounds arrive as their predecessors finish
    conversations.start(engine)
  else:
    for i, (prompt, out_len) in enumerate(requests):
      engine.add_request(f"b{i}", prompt, params(out_len))
  total_out = conversations.total_output if conversations else sum(o for _, o in requests)
  bar = tqdm(total=total_out, desc="output tokens", unit="tok", file=sys.stderr)
  trace = tuple(int(s) for s in FLAGS.trace_steps.split(":")) if FLAGS.trace_dir else None
  done = {"steps": 0, "generated": 0}

  def after_step():   # the traced steps [trace[0], trace[1]): the trace starts when step trace[0] - 1 is done
    if conversations is not None:   # rounds arrive as their predecessors finish
      conversations.advance(engine)
    done["steps"] += 1
    if trace and done["steps"] == trace[1]:
      jax.profiler.stop_trace()
      trace_summary(trace[1] - trace[0])
    if trace and done["steps"] == trace[0]:
      jax.profiler.start_trace(FLAGS.trace_dir, create_perfetto_trace=True)
    gen = engine.stats.generated_tokens - stats0["generated_tokens"]
    bar.update(gen - done["generated"])
    done["generated"] = gen
  if trace and trace[0] == 0:
    jax.profiler.start_trace(FLAGS.trace_dir, create_perfetto_trace=True)
  engine.run_until_done(progress=after_step)   # (full garbage collections held off there: gc_policy.py)
  bar.close()
  wall = time.perf_counter() - t0
  # What compiled inside the timed run (a bucket the warm-up missed): its seconds are in the wall time.
  compiled_in_run = {str(k): engine.executor.compile_seconds[k] for k in engine.executor.compile_seconds
                     if k not in compiled0}
  if compiled_in_run:
    print(f"warning: compiled inside the timed run (seconds): {compiled_in_run}", file=sys.stderr)
  if conversations is not None:
    outs, n_in = conversations.outputs, conversations.prompt_tokens
  else:
    outs = [engine.pop_output(f"b{i}") for i in range(len(requests))]
    n_in = sum(len(p) for p, _ in requests)
  queried, hits = (engine.pool.queried_tokens - pool0[0], engine.pool.hit_tokens - pool0[1])
  n_out = sum(len(o.outputs[0].token_ids) for o in outs)
  cfg = engine.model.config
  optimal = peak * 1e12 / (2 * cfg.num_params())
  steps = engine.stats.steps - stats0["steps"]
  records, engine.stats.step_records = engine.stats.step_records, None
  return {
      "num_requests": len(outs), "total_input_tokens": n_in, "total_output_tokens": n_out,
      # prefix caching: prompt tokens found cached, and the prefill tokens that were computed
      "prefix_cache": {"enabled": engine.pool.caching, "hit_tokens": hits, "queried_tokens": queried,
                       "hit_rate": hits / max(queried, 1), "prefill_tokens_computed": n_in - hits,
                       "evictions": engine.pool.evictions - pool0[2]},
      "ttft_ms": _pcts([1e3 * m.ttft for o in outs for m in o.metrics if m.ttft is not None]),
      "compiled_in_run_seconds": compiled_in_run,
      "wall_seconds": wall, "total_tokens_per_s": (n_in + n_out) / wall,
      "tokens_per_s_per_gpu": (n_in + n_out) / wall / engine.num_devices,
      "output_tokens_per_s": n_out / wall, "requests_per_s": len(outs) / wall,
      "gemm_peak_tflops": peak, "optimal_tokens_per_s": optimal,
      "percent_of_optimal": 100 * (n_in + n_out) / wall / optimal / engine.num_devices,
      # the same against the peak on weight-like data, which the board's power limit holds lower (perf-notes)
      "gemm_peak_random_tflops": peak_random,
      # fp8 weights: the same optimum against the fp8 GEMM's peak (ones) measured in this run
      **({"gemm_peak_fp8_tflops": PEAK_FP8[0], "percent_of_optimal_fp8_peak": 100 * (n_in + n_out) / wall /
          engine.num_devices / (PEAK_FP8[0] * 1e12 / (2 * cfg.num_params()))} if PEAK_FP8 else {}),
      "percent_of_optimal_random_peak": 100 * (n_in + n_out) / wall / engine.num_devices / (
          peak_random * 1e12 / (2 * cfg.num_params())),
      "steps": steps, "mean_step_ms": 1e3 * wall / max(steps, 1),
      "host_ms_per_step": 1e3 * (engine.stats.host_seconds - stats0["host_seconds"]) / max(steps, 1),
      "preemptions": engine.scheduler.num_preemptions, "params": cfg.num_params(),
      "host_breakdown_ms_per_step": {k: 1e3 * (getattr(engine.stats, k) - stats0[k]) / max(steps, 1) for k in (
          "schedule_seconds", "build_seconds", "dispatch_seconds", "process_seconds", "wait_seconds")},
      # optimal is one GPU's: the steady-state share is per GPU, like percent_of_optimal
      "step_summary": step_records.summarize(records, engine.config.dense_batch, optimal * engine.num_devices,
                                             range(trace[0] - 1, trace[1] + 1) if trace else range(0)),
      "step_records": [list(r) for r in records],
  }


def trace_summary(steps: int) -> None:
  from launch import trace_overlap
  latest = trace_overlap.latest_trace(FLAGS.trace_dir)
  if latest:
    print(f"--- trace of {steps} steps", file=sys.stderr)
    trace_overlap.main(latest, steps)


def power_line(p: dict) -> str:
  """One line: each GPU's mean power and median SM clock over the full steps, and the speed-up bounds."""
  if not p["gpus"]:
    return "power: nvidia-smi gave no readings"
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  gpus = "; ".join(f"GPU {g}: {fmt(v['mean_power_w'], '.0f')} W, {fmt(v['sm_mhz'], '.0f')} MHz, power-capped "
                   f"{v['reasons'].get('sw power cap', 0):.0%} (idle {fmt(v['idle_mean_power_w'], '.0f')} W)"
                   for g, v in p["gpus"].items())
  return (f"power over the full steps ({p['steady_seconds_sampled']:.0f} s sampled, limit {fmt(p['limit_w'], '.0f')} W): "
          f"{gpus}; speed-up bound limit/mean {fmt(p['bound'], '.3f')}x, with the idle draw static "
          f"{fmt(p['bound_static_idle'], '.3f')}x")


def _pcts(xs):
  if not xs:
    return {}
  xs = sorted(xs)
  q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]
  return {"mean": statistics.fmean(xs), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


class _Latencies:
  """An online run's per-request latencies: TTFT, TPOT, end-to-end per output token, and (with_itl) the gaps
  between streamed tokens."""

  def __init__(self, with_itl: bool):
    self.ttft, self.tpot, self.norm = [], [], []
    self.itl = [] if with_itl else None

  def request(self, t0: float, first: float, end: float, n: int) -> None:
    """One request sent at t0, its first token at `first`, its last at `end`, n tokens in all."""
    self.ttft.append(first - t0)
    if n > 1:
      self.tpot.append((end - first) / (n - 1))
    self.norm.append((end - t0) / max(n, 1))

  def summary(self) -> dict:
    ms = lambda xs: {k: 1e3 * v for k, v in _pcts(xs).items()}
    out = {"ttft_ms": ms(self.ttft), "tpot_ms": ms(self.tpot)}
    if self.itl is not None:
      out["itl_ms"] = ms(self.itl)
    return {**out, "normalized_latency_ms": ms(self.norm)}


async def _online(async_engine, requests, rate: float, seed: int, url: str | None = None) -> dict:
  import numpy as np
  rng = np.random.default_rng(seed)
  gaps = rng.exponential(1.0 / rate, size=len(requests))
  lat = _Latencies(with_itl=True)

  session = None
  if url:
    session = http_client.new_session()

  async def counts(i, prompt, out_len):
    if session is not None:
      async for k in http_client.stream_completion(session, url, prompt, out_len, FLAGS.api_key):
        yield k
    else:
      async for d in async_engine.generate(f"o{seed}-{i}", prompt, params(out_len)):
        if d.token_ids:
          yield len(d.token_ids)

  async def one(i, prompt, out_len, delay):
    await asyncio.sleep(delay)
    t0 = time.perf_counter()
    last, first, n = None, None, 0
    async for k in counts(i, prompt, out_len):
      now = time.perf_counter()
      if first is None:
        first = now
      elif last is not None:
        lat.itl.append((now - last) / k)
      last = now
      n += k
    lat.request(t0, first, time.perf_counter(), n)
  t0 = time.perf_counter()
  try:
    await asyncio.gather(*[one(i, p, o, float(np.sum(gaps[:i + 1]))) for i, (p, o) in enumerate(requests)])
  finally:
    if session is not None:
      await session.close()
  wall = time.perf_counter() - t0
  return {"rate": rate, "wall_seconds": wall, **lat.summary(),
          "output_tokens_per_s": sum(o for _, o in requests) / wall}


async def _online_conversations(async_engine, conv, rate: float, seed: int, url: str | None = None) -> dict:
  """Multi-round conversations online: conversations start at `rate` per second (Poisson), each round is sent
  when its predecessor has finished and the user has thought (--think_time_s, exponential), its prompt the
  history as generated (return_token_ids over HTTP) plus a new user turn. Cached prompt tokens come from the
  responses' usage (HTTP) or the engine's counters."""
  import numpy as np
  rng = np.random.default_rng(seed)
  starts = np.cumsum(rng.exponential(1.0 / rate, size=len(conv.rounds)))
  # drawn up front, per conversation and round, so that a run's pauses do not depend on completion order
  thinks = [rng.exponential(FLAGS.think_time_s, size=len(r)) if FLAGS.think_time_s > 0 else np.zeros(len(r))
            for r in conv.rounds]
  lat = _Latencies(with_itl=False)
  totals = {"prompt": 0, "output": 0, "cached": 0}
  session = None
  if url:
    session = http_client.new_session()

  async def one_round(rid: str, prompt: list[int], out_len: int) -> list[int]:
    t0, first, toks, usage = time.perf_counter(), None, [], {}
    if session is not None:
      async for _ in http_client.stream_completion(session, url, prompt, out_len, FLAGS.api_key, toks, usage):
        first = first or time.perf_counter()
      totals["cached"] += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    else:
      async for d in async_engine.generate(rid, prompt, params(out_len)):
        if d.token_ids:
          first = first or time.perf_counter()
          toks.extend(d.token_ids)
    lat.request(t0, first, time.perf_counter(), len(toks))
    totals["prompt"] += len(prompt)
    totals["output"] += len(toks)
    return toks

  async def conversation(c: int, delay: float) -> None:
    await asyncio.sleep(delay)
    history = list(conv.system)
    for k, (_, out_len) in enumerate(conv.rounds[c]):
      if k:
        await asyncio.sleep(float(thinks[c][k]))
      prompt = history + conv.users[c][k]
      history = prompt + await one_round(f"m{seed}-{c}-{k}", prompt, out_len)

  pool = async_engine.engine.pool if async_engine is not None else None
  hits0 = pool.hit_tokens if pool is not None else 0
  t0 = time.perf_counter()
  try:
    await asyncio.gather(*[conversation(c, float(starts[c])) for c in range(len(conv.rounds))])
  finally:
    if session is not None:
      await session.close()
  wall = time.perf_counter() - t0
  if pool is not None:
    totals["cached"] = pool.hit_tokens - hits0
  return {"rate": rate, "think_time_s": FLAGS.think_time_s,
          "longest_thinking_s": max((float(np.sum(t[1:])) for t in thinks), default=0.0),   # one conversation's
          "wall_seconds": wall, **lat.summary(),
          "requests": len(lat.ttft), "prompt_tokens": totals["prompt"],
          "cached_prompt_tokens": totals["cached"], "hit_rate": totals["cached"] / max(totals["prompt"], 1),
          "output_tokens_per_s": totals["output"] / wall,
          "total_tokens_per_s": (totals["prompt"] + totals["output"]) / wall}


def _online_any(async_engine, requests, rate: float, seed: int, url: str | None = None) -> dict:
  if isinstance(requests, list):
    return asyncio.run(_online(async_engine, requests, rate, seed, url))
  return asyncio.run(_online_conversations(async_engine, requests, rate, seed, url))


def conversations_line(s: dict) -> str:
  """The multi-round figures of an online sweep point."""
  return (f"{'':>10}  (conversations per s) {s['requests']} rounds, {s['total_tokens_per_s']:.1f} total tok/s, "
          f"{s['hit_rate']:.1%} of {s['prompt_tokens']} prompt tokens cached")


def served_max_model_len(url: str) -> int | None:
  """The server's own max_model_len (/v1/models, as vLLM reports it): a server may hold less than the model's
  positions (a KV pool too small lowers it), and a workload sized past it would be refused."""
  import urllib.request
  headers = {"Authorization": f"Bearer {FLAGS.api_key}"} if FLAGS.api_key else {}
  with urllib.request.urlopen(urllib.request.Request(url + "/v1/models", headers=headers), timeout=30) as r:
    cards = json.load(r).get("data") or []
  return min((c["max_model_len"] for c in cards if c.get("max_model_len")), default=None)


def run_online_http(make) -> dict:
  """make(k): the requests of the k-th rate."""
  sweep = [_online_any(None, make(k), float(r), FLAGS.seed + k, FLAGS.url) for k, r in enumerate(FLAGS.rates)]
  ok = [s["rate"] for s in sweep if s["normalized_latency_ms"].get("p99", 1e9) <= FLAGS.slo_ms]
  return {"sweep": sweep, "slo_ms": FLAGS.slo_ms, "max_rate_within_slo": max(ok) if ok else None,
          "url": FLAGS.url}


def run_online(engine, make) -> dict:
  """make(k): the requests of the k-th rate."""
  from nanoflow_jax.async_engine import AsyncEngine
  engine.warm_up()
  gc_policy.freeze_startup_heap()
  first = make(0)
  n = len(first) if isinstance(first, list) else first.num_requests
  ae = AsyncEngine(engine, max_waiting=n + 1).start()
  try:
    sweep = [_online_any(ae, first if k == 0 else make(k), float(r), FLAGS.seed + k)
             for k, r in enumerate(FLAGS.rates)]
  finally:
    ae.shutdown()
  ok = [s["rate"] for s in sweep if s["normalized_latency_ms"].get("p99", 1e9) <= FLAGS.slo_ms]
  return {"sweep": sweep, "slo_ms": FLAGS.slo_ms, "max_rate_within_slo": max(ok) if ok else None}


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  if "online" in next(iter(results.values())):
    for mode, r in results.items():
      sw = r["online"]["sweep"]
      ax.plot([s["rate"] for s in sw], [s["normalized_latency_ms"]["p99"] for s in sw], "o-", label=mode)
    ax.axhline(FLAGS.slo_ms, color="gray", ls="--", label="SLO")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("p99 normalized latency (ms/token)")
  else:
    modes = list(results)
    vals = [results[m]["offline"]["total_tokens_per_s"] for m in modes]
    ax.bar(modes, vals, color=["tab:blue", "tab:orange"][:len(modes)])
    for i, m in enumerate(modes):
      ax.text(i, vals[i], f"{results[m]['offline']['percent_of_optimal']:.1f}% of optimal", ha="center",
              va="bottom")
    ax.set_ylabel("total tokens/s")
  ax.set_title(f"{FLAGS.model}, {FLAGS.workload_file or FLAGS.workload}")
  ax.legend() if ax.get_legend_handles_labels()[0] else None
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def parse_variant(spec: str, options: dict) -> tuple[str, dict]:
  """--decode_variants' NAME:key=value[,key=value...] -> (NAME, the changes), each key one of `options` (build_engine's
  arguments), each value parsed as the option's type (bool: true/false)."""
  name, sep, body = spec.partition(":")
  if not sep or not name or not body:
    raise app.UsageError(f"--decode_variants takes NAME:key=value[,key=value...], got {spec!r}")
  changes = {}
  for item in body.split(","):
    key, eq, value = item.partition("=")
    if not eq or key not in options:
      raise app.UsageError(f"--decode_variants {name!r}: {item!r} is not key=value with an engine option as key "
                           f"({', '.join(sorted(options))})")
    kind = type(options[key])
    if options[key] is None:   # an option off by default (num_pages, quantization): an integer, or a word
      changes[key] = int(value) if value.lstrip("-").isdigit() else None if value.lower() == "none" else value
    elif kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise app.UsageError(f"--decode_variants {name!r}: {key} takes true or false, got {value!r}")
      changes[key] = value.lower() in ("true", "1")
    elif kind is int:
      try:
        changes[key] = int(value)
      except ValueError:
        raise app.UsageError(f"--decode_variants {name!r}: {key} takes an integer, got {value!r}") from None
    else:
      changes[key] = value
  return name, changes


def run_decode_sweep(batches: list[int]) -> None:
  """The decode sweep; with --compare=overlap also with --overlap_dispatch the other way, and each
  --decode_variants engine, on the same model."""
  from launch import decode_sweep
  from nanoflow_jax.llm import build_engine
  base = engine_flags.engine_kwargs()
  runs = [("", {"overlap_dispatch": FLAGS.overlap_dispatch})]
  if FLAGS.compare == "overlap":
    runs.append(("", {"overlap_dispatch": not FLAGS.overlap_dispatch}))
  runs += [parse_variant(v, base) for v in FLAGS.decode_variants]   # (all parsed before the model loads)
  results, model = {}, None
  for variant, changes in runs:
    options = {**base, **changes}
    engine = build_engine(FLAGS.model, mode=FLAGS.mode, model_obj=model, **options)
    model = engine.model
    res = decode_sweep.sweep(engine, batches, FLAGS.decode_context,
                             ttft_prompts=tuple(int(n) for n in FLAGS.ttft_prompts))
    res["environment"] = environment(FLAGS.mode, options)
    engine.shutdown()
    del engine
    overlap = options["overlap_dispatch"]
    title = (f"{FLAGS.model}, {FLAGS.quantization or 'bf16'} weights, KV {FLAGS.kv_cache_dtype}, layer_unroll "
             f"{FLAGS.layer_unroll}, {'dispatch thread' if overlap else 'inline dispatch'}, on "
             f"{res['environment']['device']}")
    if variant:
      title = f"{variant} ({', '.join(f'{k}={v}' for k, v in changes.items())}): {title}"
    print(decode_sweep.table(res, title))
    results[title] = res
  if FLAGS.plain_baseline:   # the engines are gone (their KV caches with them): the same model, plain
    from launch import plain_decode
    plain = plain_decode.sweep(model, batches, FLAGS.decode_context)
    for title, res in results.items():
      decode_sweep.add_plain(res, plain)
      print(decode_sweep.table(res, title))
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      first = next(iter(results.values()))
      json.dump({"decode_sweep": first, **({"decode_sweeps": results} if len(results) > 1 else {})}, f, indent=2)
  if FLAGS.plot_out:
    decode_sweep.plot(results, FLAGS.plot_out)


def main(argv):
  del argv
  import logging
  logging.basicConfig(level=logging.WARNING)
  if FLAGS.think_time_s > 0 and not (FLAGS.rates and FLAGS.workload == "multiround"):
    raise app.UsageError("--think_time_s is the pause between rounds of online multi-round conversations: give "
                         "--workload=multiround and --rates")
  # Multi-host: every process runs the same workload (same seed) on its share of the mesh. Both modes run
  # under the same XLA flags when nanoflow is one of them.
  engine_flags.prepare_process("nanoflow" in (FLAGS.mode, FLAGS.compare))
  from nanoflow_jax.llm import build_engine
  if FLAGS.url:
    if not FLAGS.rates:
      raise app.UsageError("--url measures online latency: give --rates")
    from nanoflow_jax import checkpoint
    cfg = checkpoint.resolve_config(FLAGS.model)
    max_len = FLAGS.max_model_len or served_max_model_len(FLAGS.url) or cfg.max_position_embeddings
    make = lambda k: make_requests(max_len, cfg.vocab_size, k)
    res = {"http": {"environment": {"url": FLAGS.url, "model": FLAGS.model}, "online": run_online_http(make)}}
    for s in res["http"]["online"]["sweep"]:
      print(f"http @ {s['rate']:g} req/s: TTFT p50 {s['ttft_ms'].get('p50', 0):.0f} ms | TPOT p50 "
            f"{s['tpot_ms'].get('p50', 0):.1f} ms | normalized p99 {s['normalized_latency_ms'].get('p99', 0):.1f} ms/token")
      if "hit_rate" in s:
        print(conversations_line(s))
    print(f"highest rate within the {FLAGS.slo_ms:g} ms/token SLO: {res['http']['online']['max_rate_within_slo']}")
    if FLAGS.json_out:
      with open(FLAGS.json_out, "w") as f:
        json.dump({"results": res}, f, indent=2)
    return
  if FLAGS.decode_sweep:
    return run_decode_sweep([int(b) for b in FLAGS.decode_sweep])
  # (label, mode, overlap_dispatch) of each run; one model load serves them all
  runs = [(FLAGS.mode, FLAGS.mode, FLAGS.overlap_dispatch)]
  if FLAGS.compare == "overlap":
    runs.append((f"{FLAGS.mode}+{'inline' if FLAGS.overlap_dispatch else 'overlap'}", FLAGS.mode,
                 not FLAGS.overlap_dispatch))
  elif FLAGS.compare and FLAGS.compare != FLAGS.mode:
    runs.append((FLAGS.compare, FLAGS.compare, FLAGS.overlap_dispatch))
  modes = [label for label, _, _ in runs]
  peak = gemm_peak_tflops()
  peak_random = gemm_peak_tflops(data="random")   # the same GEMM on weight-like data: below, by the power limit
  if FLAGS.quantization == "fp8":
    PEAK_FP8.append(gemm_peak_tflops(dtype="fp8"))
    print(f"fp8 GEMM peak in this run: {PEAK_FP8[0]:.0f} TFLOP/s (bf16: {peak:.0f})")
  results, model = {}, None
  for label, mode, overlap in runs:
    options = {**engine_flags.engine_kwargs(), "overlap_dispatch": overlap}
    engine = build_engine(FLAGS.model, mode=mode, model_obj=model, **options)
    model = engine.model
    engine.num_devices = FLAGS.tp
    make = lambda k: make_requests(engine.max_model_len, engine.model.config.vocab_size, k)
    r = {"environment": environment(mode, options)}
    r["online" if FLAGS.rates else "offline"] = run_online(engine, make) if FLAGS.rates else \
        run_offline(engine, make(0), peak, peak_random)
    results[label] = r
    engine.shutdown()
    del engine
  print(f"\n{FLAGS.model} on {results[modes[0]]['environment']['device']}, workload "
        f"{FLAGS.workload_file or FLAGS.workload}, {FLAGS.num_requests} requests, GEMM peak {peak:.0f} TFLOP/s "
        f"({peak_random:.0f} on random data)")
  for mode, r in results.items():
    if "offline" in r:
      o = r["offline"]
      print(f"{mode:>10}: total {o['total_tokens_per_s']:10.1f} tok/s | output {o['output_tokens_per_s']:9.1f} "
            f"tok/s | {o['requests_per_s']:7.2f} req/s | {o['percent_of_optimal']:5.1f}% of optimal "
            f"({o['percent_of_optimal_random_peak']:.1f}% against the random-data peak) | "
            f"step {o['mean_step_ms']:.1f} ms (host {o['host_ms_per_step']:.1f} ms) | preemptions {o['preemptions']}")
      pc = o["prefix_cache"]
      print(f"{'':>10}  prefix cache {'on' if pc['enabled'] else 'off'}: {pc['hit_rate']:.1%} of prompt tokens hit, "
            f"{pc['prefill_tokens_computed']} prefill tokens computed, {pc['evictions']} evictions; TTFT p50 "
            f"{o['ttft_ms'].get('p50', 0):.0f} ms p99 {o['ttft_ms'].get('p99', 0):.0f} ms")
      print(f"{'':>10}  host per step (ms): " + ", ".join(f"{k.split('_')[0]} {v:.1f}" for k, v in
                                                       o["host_breakdown_ms_per_step"].items())
            + (" (dispatch on a thread of its own, beside the rest)"
               if r["environment"]["engine_options"]["overlap_dispatch"] else ""))
      s = o["step_summary"]
      if "steady_tokens_per_s" in s:
        print(f"{'':>10}  steady state ({s['full_steps']} of {s['steps_timed']} steps full): "
              f"{s['steady_tokens_per_s']:.1f} tok/s = {s['steady_percent_of_optimal']:.1f}% of optimal, "
              f"step {s['steady_step_ms']:.1f} ms; mean {s['mean_tokens_per_step']:.0f} tokens per step")
      if s.get("stalls", {}).get("count"):
        st = s["stalls"]
        print(f"{'':>10}  stalls: {st['count']} steps over {step_records.STALL_FACTOR:g}x the median, "
              f"{st['seconds']:.2f} s of the run, longest {st['longest_ms']:.0f} ms")
      if o.get("power"):
        print(f"{'':>10}  {power_line(o['power'])}")
      if "fit" in s:
        f = s["fit"]
        print(f"{'':>10}  step ms ~ {f['fixed_ms']:.1f} + {f['ms_per_1k_tokens']:.2f} per 1k tokens + "
              f"{f['ms_per_1m_context']:.2f} per 1M decode-context tokens (r2 {f['r2']:.2f})")
    else:
      for s in r["online"]["sweep"]:
        print(f"{mode:>10} @ {s['rate']:g} req/s: TTFT p50 {s['ttft_ms'].get('p50', 0):.0f} ms p99 "
              f"{s['ttft_ms'].get('p99', 0):.0f} | TPOT p50 {s['tpot_ms'].get('p50', 0):.1f} ms | normalized p99 "
              f"{s['normalized_latency_ms'].get('p99', 0):.1f} ms/token")
        if "hit_rate" in s:
          print(conversations_line(s))
      print(f"{mode:>10}: highest rate within the {FLAGS.slo_ms:g} ms/token SLO: {r['online']['max_rate_within_slo']}")
  if len(results) == 2 and all("offline" in r for r in results.values()):
    a, b = (results[m]["offline"]["total_tokens_per_s"] for m in modes)
    print(f"{modes[0]} / {modes[1]} throughput: {a / b:.3f}x")
  flat = {k: v for k, v in results[modes[0]].get("offline", {}).items() if k != "step_records"}
  out = {**flat, "results": results}
  if FLAGS.json_out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json_out)), exist_ok=True)
    with open(FLAGS.json_out, "w") as f:
      json.dump(out, f, indent=2)
  if FLAGS.plot_out:
    plot(results, FLAGS.plot_out)
    for mode, r in results.items():
      if r.get("offline", {}).get("step_records"):
        step_records.plot(r["offline"]["step_records"], os.path.splitext(FLAGS.plot_out)[0] + f"_steps_{mode}.png",
                          f"{FLAGS.model}, {FLAGS.workload_file or FLAGS.workload}, {mode}")


def run() -> None:
  app.run(main, argv=engine_flags.vllm_argv(sys.argv))


if __name__ == "__main__":
  run()
