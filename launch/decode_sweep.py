"""The decode latency sweep (issue 27): for each batch size, the engine's decode-only step against the bytes it
must read, at the copy bandwidth measured in the same run.

A decode step of b sequences at context c reads every weight once (the embedding only at b rows) and each
sequence's K and V: floor = (weight bytes + b * c * KV bytes per token) / bandwidth. The step is timed through
the engine loop as a user meets it (host included: the loop runs one step ahead, so the wall time per step is
the time between tokens), with b requests decoding at `context`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time


def copy_bandwidth(seconds_per_sample: float = 0.2) -> dict:
  """The device's streaming rates, measured now (TB/s): "copy" counts bytes read + written by `x + 1` over
  2 GiB, "read" the bytes a sum reads; "best" is the higher, the floor's bandwidth (a decode step mostly
  reads)."""
  import jax
  import jax.numpy as jnp
  from nanoflow_jax.perf import median_seconds
  n = (1 << 30) if jax.default_backend() == "gpu" else (1 << 22)
  x = jnp.ones((n,), jnp.bfloat16)
  t_copy = median_seconds(jax.jit(lambda x: x + 1), x, iters=10)
  t_read = median_seconds(jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32)), x, iters=10)
  out = {"copy": 2 * x.nbytes / t_copy / 1e12, "read": x.nbytes / t_read / 1e12}
  out["best"] = max(out.values())
  return out


def weight_bytes(engine) -> int:
  """Bytes a decode step reads of the weights: all of them, less the embedding table (b rows of it are read),
  unless the LM head is the embedding."""
  import jax
  params = engine.executor.params
  total = sum(a.nbytes for a in jax.tree.leaves(params))
  if not engine.model.config.tie_word_embeddings:
    total -= sum(a.nbytes for a in jax.tree.leaves(params["top"].get("embedding", {})))
  return total


def kv_bytes_per_token(engine) -> int:
  cfg = engine.model.config
  return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * engine.executor.kv_dtype.itemsize


def _tokens_to_decode(engine, batch: int, context: int, steps: int) -> int:
  """max_tokens of `decoding`'s sequences: `steps` after the prefill phase of `batch` prompts, and a margin."""
  prefill_steps = -(-batch * context // engine.config.dense_batch) + 2
  return steps + prefill_steps + 8


def fitting_batch(engine, batch: int, context: int, steps: int) -> int:
  """The most sequences, up to `batch`, that `decoding(engine, n, context, steps)` can hold at once: sequence
  slots, and KV pages for each one's prompt and max_tokens as admission projects them (the scheduler's own
  projection, which counts a partial page more per sequence). Counting whole pages a sequence instead asked for
  one too many on a pool they filled (session 25: the last one waited for the others to finish, and the sweep
  found 1 sequence decoding of 59)."""
  import numpy as np
  from nanoflow_jax import scheduler
  for n in range(min(batch, engine.config.max_num_seqs), 0, -1):
    prompt = np.full(n, context - 1)
    peak = prompt + _tokens_to_decode(engine, n, context, steps)
    if scheduler._peak_pages(prompt, peak, np.zeros(n, np.int64), engine.config.page_size) <= engine.executor.num_pages:
      return n
  raise ValueError(f"the KV pool ({engine.executor.num_pages} pages) holds no sequence at context {context}")


@contextlib.contextmanager
def decoding(engine, batch: int, context: int, steps: int):
  """`batch` sequences decoding at `context` (prompt context - 1 tokens), all past their prefill, for at least
  `steps` more steps; discarded on exit. The first sequences to finish their prefill decode while the rest
  prefill, so max_tokens leaves room for the whole prefill phase (session 16: a sweep whose early sequences had
  finished timed 128 and 512 sequences as fewer), and no more: admission reserves pages up to max_tokens."""
  import numpy as np
  from nanoflow_jax.sampling_params import SamplingParams
  rng = np.random.default_rng(batch)
  vocab = min(1000, engine.model.config.vocab_size)
  ids = [f"sweep-{batch}-{i}" for i in range(batch)]
  need = _tokens_to_decode(engine, batch, context, steps)
  if engine.max_model_len - context < need:
    raise ValueError(f"max_model_len {engine.max_model_len} leaves no room to decode {need} tokens after a "
                     f"context of {context}")
  sp = SamplingParams(max_tokens=need, ignore_eos=True, temperature=0, detokenize=False)
  for rid in ids:
    engine.add_request(rid, rng.integers(0, vocab, context - 1).tolist(), sp)
  try:
    # until every sequence has its first token: all decode from here on
    while any(s.is_prefilling or not s.output_ids for s in engine.scheduler.running) or engine.scheduler.waiting:
      engine.step()
    yield
  finally:
    for rid in ids:
      engine.discard(rid)
    while engine.has_work():
      engine.step()


def check_decoding(engine, batch: int) -> None:
  decoding_now = [s for s in engine.scheduler.running if not s.finished]
  if len(decoding_now) != batch or engine.scheduler.waiting:
    raise RuntimeError(f"decode sweep: {len(decoding_now)} sequences were decoding at the end, not {batch} "
                       f"(preempted or finished early: give the engine more KV pages or max_model_len)")


HOST_PARTS = ("schedule", "build", "dispatch", "process", "wait")   # EngineStats' <part>_seconds


def host_ms_per_step(stats, before) -> dict:
  """Each of HOST_PARTS in ms per step of the engine's stats since `before` (a copy of them taken earlier)."""
  steps = max(stats.steps - before.steps, 1)
  return {p: 1e3 * (getattr(stats, f"{p}_seconds") - getattr(before, f"{p}_seconds")) / steps for p in HOST_PARTS}


def engine_thread_parts(overlap_dispatch: bool) -> tuple:
  """The HOST_PARTS the engine's own thread spends a step on: all of them, less the dispatch where it runs on a
  thread of its own (EngineConfig.overlap_dispatch; then it overlaps the others)."""
  return tuple(p for p in HOST_PARTS if not (overlap_dispatch and p == "dispatch"))


def time_decode(engine, batch: int, context: int, steps: int = 32, warmup: int = 4, host: dict | None = None) -> float:
  """Seconds per engine step with `batch` sequences decoding at `context`; the timed steps are checked to hold
  exactly `batch` decodes. `host`, where given, gets the engine loop's ms per step in each of HOST_PARTS (is a
  small step's time the device's, or the host's dispatching it?)."""
  with decoding(engine, batch, context, steps + warmup):
    for _ in range(warmup):   # also compiles the bucket, if this batch is the first to use it
      engine.step()
    before = dataclasses.replace(engine.stats)
    t = time.perf_counter()
    for _ in range(steps):
      engine.step()
    seconds = (time.perf_counter() - t) / steps
    if host is not None:
      host.update(host_ms_per_step(engine.stats, before))
    check_decoding(engine, batch)
  return seconds


def time_first_token(engine, prompt_tokens: int, repeats: int = 5) -> dict:
  """Issue 27's TTFT at light load: one prompt of `prompt_tokens` on an idle engine, from add_request to its first
  token's delta (what a streaming client gets). The median of `repeats` (a first run, which may compile, is
  dropped), the engine steps that took, and the host's parts of those steps (their "wait" is the device's)."""
  import numpy as np
  from nanoflow_jax.sampling_params import SamplingParams
  if engine.has_work():
    raise RuntimeError("time_first_token needs an idle engine")
  ids = np.random.default_rng(prompt_tokens).integers(0, min(1000, engine.model.config.vocab_size),
                                                      prompt_tokens).tolist()
  sp = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0, detokenize=False)
  runs = []
  for r in range(repeats + 1):
    rid, first = f"ttft-{prompt_tokens}-{r}", []
    before = dataclasses.replace(engine.stats)
    t = time.perf_counter()
    engine.add_request(rid, ids, sp, on_delta=lambda d: first.append(time.perf_counter()) if d.token_ids else None)
    steps = 0
    while not first:
      engine.step()
      steps += 1
    runs.append((1e3 * (first[0] - t), steps, host_ms_per_step(engine.stats, before)))
    engine.discard(rid)
    while engine.has_work():
      engine.step()
  runs = sorted(runs[1:], key=lambda run: run[0])
  ms, steps, host = runs[len(runs) // 2]
  return {"prompt_tokens": prompt_tokens, "ttft_ms": ms, "steps": steps, "host_ms_per_step": host}


def sweep(engine, batches: list[int], context: int = 1024, steps: int = 32, ttft_prompts: tuple = ()) -> dict:
  """Per batch size: the step time, its bytes floor and the ratio; then the TTFT of one prompt of each of
  `ttft_prompts` tokens on the idle engine (time_first_token). The engine must hold `context` tokens for
  max(batches) sequences."""
  bw = copy_bandwidth()
  wbytes, per_tok = weight_bytes(engine), kv_bytes_per_token(engine)
  rows = []
  for b in batches:
    host: dict = {}
    s = time_decode(engine, b, context, steps, host=host)
    floor = (wbytes + b * context * per_tok) / (bw["best"] * 1e12)
    rows.append({"batch": b, "step_ms": 1e3 * s, "floor_ms": 1e3 * floor, "ratio_to_floor": s / floor,
                 "tokens_per_s": b / s, "host_ms": host})
    print(f"decode batch {b:4d}: {1e3 * s:7.2f} ms per step, floor {1e3 * floor:6.2f} ms, {s / floor:5.2f}x the "
          f"floor; host ms " + ", ".join(f"{p} {v:.2f}" for p, v in host.items()), flush=True)
  ttft = []
  for n in ttft_prompts:
    if n + 2 > engine.max_model_len:
      print(f"TTFT of a {n}-token prompt: skipped (max_model_len {engine.max_model_len})", flush=True)
      continue
    ttft.append(time_first_token(engine, n))
    t = ttft[-1]
    print(f"TTFT, one {n}-token prompt on an idle engine: {t['ttft_ms']:.2f} ms over {t['steps']} steps; host ms "
          f"per step " + ", ".join(f"{p} {v:.2f}" for p, v in t["host_ms_per_step"].items()), flush=True)
  return {"bandwidth_tb_s": bw, "weight_bytes": wbytes, "kv_bytes_per_token": per_tok, "context": context,
          "overlap_dispatch": engine.config.overlap_dispatch, "rows": rows, "ttft": ttft}


def add_plain(result: dict, plain_ms: dict) -> None:
  """Each row of a sweep() result gets the plain JAX step's ms at its batch size (launch/plain_decode.py, same
  run) and the engine's step over it."""
  for r in result["rows"]:
    if r["batch"] in plain_ms:
      r["plain_ms"] = plain_ms[r["batch"]]
      r["ratio_to_plain"] = r["step_ms"] / r["plain_ms"]


def table(result: dict, title: str) -> str:
  bw = result["bandwidth_tb_s"]
  plain = any("plain_ms" in r for r in result["rows"])
  lines = [f"{title}: weights {result['weight_bytes'] / 1e9:.2f} GB, KV {result['kv_bytes_per_token']} B/token at "
           f"context {result['context']}; bandwidth {bw['best']:.2f} TB/s (copy {bw['copy']:.2f}, read "
           f"{bw['read']:.2f})" + ("; dispatch on a thread of its own (beside the other host parts)"
                                   if result.get("overlap_dispatch") else ""), "",
           "| batch | step ms | floor ms | step / floor | " + ("plain JAX ms | step / plain | " if plain else "") +
           "tokens/s | host ms: " + " / ".join(HOST_PARTS) + " |",
           "|---|---|---|---|" + ("---|---|" if plain else "") + "---|---|"]
  nan = float("nan")
  lines += [f"| {r['batch']} | {r['step_ms']:.2f} | {r['floor_ms']:.2f} | {r['ratio_to_floor']:.2f} | " +
            (f"{r.get('plain_ms', nan):.2f} | {r.get('ratio_to_plain', nan):.2f} | " if plain else "") +
            f"{r['tokens_per_s']:.0f} | " + " / ".join(f"{r.get('host_ms', {}).get(p, nan):.2f}"
                                                       for p in HOST_PARTS) + " |" for r in result["rows"]]
  for t in result.get("ttft", []):
    lines.append(f"\nTTFT of one {t['prompt_tokens']}-token prompt on the idle engine: {t['ttft_ms']:.2f} ms "
                 f"({t['steps']} steps; host ms per step: " +
                 " / ".join(f"{t['host_ms_per_step'][p]:.2f}" for p in HOST_PARTS) + ")")
  return "\n".join(lines)


def plot(results: dict, path: str) -> None:
  """results: label -> sweep(); step time and floor against batch size, one line pair per label."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for k, (label, res) in enumerate(results.items()):
    b = [r["batch"] for r in res["rows"]]
    ax.plot(b, [r["step_ms"] for r in res["rows"]], "o-", color=f"C{k}", label=f"{label}: step")
    ax.plot(b, [r["floor_ms"] for r in res["rows"]], "--", color=f"C{k}", label=f"{label}: bytes floor")
    if k == 0 and any("plain_ms" in r for r in res["rows"]):
      rows = [r for r in res["rows"] if "plain_ms" in r]
      ax.plot([r["batch"] for r in rows], [r["plain_ms"] for r in rows], "s:", color="gray",
              label="plain JAX step (same run)")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("sequences decoding")
  ax.set_ylabel("ms per step")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
