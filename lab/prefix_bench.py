"""Issue 28's GPU measurements in one process (the model loaded once, engines built on it in turn):

1. the host KV tier's copies, GB/s each way (host_kv.HostKVTier on the engine's own cache);
2. the decode step with those copies in flight against without;
3. TTFT of a prompt after a shared prefix of --prefix_tokens, cached (hit) against not (miss);
4. the multi-round workload (launch/conversations.py) on a KV pool of --num_pages, too small to keep every
   conversation: prefix caching off, on, and on with the host tier.

  PYTHONPATH=. python3 lab/prefix_bench.py --model=llama-3-8b --quantization=fp8 --out=/tmp/prefix.md
"""
from __future__ import annotations

import statistics
import time

if __package__ in (None, ""):
  import _root  # noqa: F401  (the repository root on sys.path: lab/_root.py)

from absl import app, flags

from lab._report import report
from launch import engine_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llama-3-8b", "Named shape (random weights).")
flags.DEFINE_enum("quantization", None, ["fp8"], "Weights and activations (default: the model's dtype).")
flags.DEFINE_string("kv_cache_dtype", "fp8", "KV cache element type.")
flags.DEFINE_integer("dense_batch", 2048, "The engines' dense batch.")
flags.DEFINE_integer("max_num_seqs", 1024, "Sequence slots.")
flags.DEFINE_integer("num_pages", 8192, "KV pages of every engine here (16 tokens each): the multi-round runs "
                     "need more than this, so the GPU's cache evicts.")
flags.DEFINE_integer("max_model_len", 8192, "Longest sequence.")
flags.DEFINE_integer("copy_pages", 512, "Pages per copy when timing the host tier's copies.")
flags.DEFINE_integer("decodes", 64, "Sequences decoding while copies are in flight.")
flags.DEFINE_integer("context", 1024, "Their context.")
flags.DEFINE_integer("pages_per_step", 64, "Pages saved to the host before each step of that measurement.")
flags.DEFINE_integer("prefix_tokens", 4096, "The shared prefix of the TTFT measurement.")
flags.DEFINE_integer("conversations", 300, "Conversations of the multi-round workload.")
flags.DEFINE_float("host_kv_cache_gb", 32.0, "The host tier's size in the third multi-round run.")
flags.DEFINE_enum("host_kv_copy", "thread", list(engine_flags.HOST_KV_COPY_MODES), "The host tier's copy mode (host_kv.COPY_MODES) "
                  "in the copies' GB/s and the multi-round run.")
flags.DEFINE_list("step_copies", list(engine_flags.HOST_KV_COPY_MODES), "Copy modes of the step-with-copies measurement.")
flags.DEFINE_list("parts", ["copies", "step", "ttft", "multiround"], "Which measurements to run.")
HOST_CONFIGS = {f"host-{m}": m for m in engine_flags.HOST_KV_COPY_MODES}
flags.DEFINE_list("configs", ["off", "on", "host"], "The multi-round runs' configurations: prefix caching off, on, "
                  "on with the host tier in --host_kv_copy's mode (host) or in a mode named (host-put, host-thread, "
                  "host-jit); an earlier run's figure for one left out is the same workload.")
flags.register_validator("configs", lambda v: set(v) <= {"off", "on", "host", *HOST_CONFIGS},
                         f"--configs takes off, on, host and {', '.join(HOST_CONFIGS)} (comma-separated)")
flags.DEFINE_string("out", None, "Write the tables (markdown) here, the results beside them (.json).")
flags.DEFINE_string("plot_out", None, "Plot the multi-round runs here (PNG).")
flags.DEFINE_string("from_json", None, "Plot and tabulate an earlier run's results (its .json) instead of running.")


def _fake_keys(n: int, salt: int) -> list[tuple]:
  return [(hash((salt, i)), salt, (i,)) for i in range(n)]


def copy_rates(engine, n: int, repeats: int = 3) -> dict:
  """GB/s of the tier's save (gather on the device, copy to the host, landed) and load (host pages to the
  device, scattered into the cache), each the best of `repeats` after one untimed round (compiles)."""
  import jax
  from nanoflow_jax import host_kv, kv_cache
  ex = engine.executor
  tier = host_kv.HostKVTier(4 * n, FLAGS.host_kv_copy)
  pages = list(range(n))
  page_bytes = kv_cache.page_bytes(engine.model.config, engine.config.page_size, ex.kv_dtype)
  save, load = [], []
  for r in range(repeats + 1):
    keys = _fake_keys(n, r)
    jax.block_until_ready(ex.kv)
    t = time.perf_counter()
    tier.save(ex.kv, pages, keys)
    tier.land()
    save.append(time.perf_counter() - t)
    t = time.perf_counter()
    ex.kv = tier.load(ex.kv, pages, keys)
    jax.block_until_ready(ex.kv)
    load.append(time.perf_counter() - t)
  gb = n * page_bytes / 1e9
  return {"pages": n, "copy": FLAGS.host_kv_copy, "page_bytes": page_bytes, "gb": gb, "save_gb_s": gb / min(save[1:]),
          "load_gb_s": gb / min(load[1:])}


def step_with_copies(engine, batch: int, pages_per_step: int, copy: str, steps: int = 16) -> dict:
  """ms per decode step of `batch` sequences at --context, alone and with `pages_per_step` pages saved to the
  host tier (copy mode `copy`) before each step (the engine's order: the gather dispatched before the step, the
  blocks put in host memory after the next read, `HostKVTier.settle`); save_host_ms: the host's time in save and
  settle."""
  from launch import decode_sweep
  from nanoflow_jax import host_kv
  ex = engine.executor
  tier = host_kv.HostKVTier(pages_per_step * (steps + 2), copy)
  pages = list(range(pages_per_step))
  # on a small pool (--num_pages 4096: session 17's run held 5 of 64) fewer sequences, all of them decoding
  batch = decode_sweep.fitting_batch(engine, batch, FLAGS.context, 2 * steps + 8)
  with decode_sweep.decoding(engine, batch, FLAGS.context, 2 * steps + 8):
    for _ in range(4):
      engine.step()
    tier.save(ex.kv, pages, _fake_keys(pages_per_step, -1))   # compiles the gather
    t = time.perf_counter()
    for _ in range(steps):
      engine.step()
    alone = (time.perf_counter() - t) / steps
    t, in_save = time.perf_counter(), 0.0
    for i in range(steps):
      t_save = time.perf_counter()
      tier.save(ex.kv, pages, _fake_keys(pages_per_step, i))
      in_save += time.perf_counter() - t_save   # the host's own time in save: blocking copies show here
      engine.step()   # (it reads the previous step's results)
      t_save = time.perf_counter()
      tier.settle()   # as the engine does for its own tier after that read
      in_save += time.perf_counter() - t_save
    tier.land()
    with_copies = (time.perf_counter() - t) / steps
    decode_sweep.check_decoding(engine, batch)
  return {"decodes": batch, "pages_per_step": pages_per_step, "copy": copy, "alone_ms": 1e3 * alone,
          "with_copies_ms": 1e3 * with_copies, "ratio": with_copies / alone, "save_host_ms": 1e3 * in_save / steps}


def prefix_ttft(engine, prefix: int, trials: int = 3, tail: int = 32) -> dict:
  """TTFT (ms) of a request whose `prefix` tokens are not cached (miss), then of one with the same prefix and
  another tail (hit), on an idle engine; medians over `trials` prefixes of their own, after one untimed trial."""
  import numpy as np
  from nanoflow_jax.sampling_params import SamplingParams
  rng = np.random.default_rng(0)
  vocab = min(1000, engine.model.config.vocab_size)
  sp = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0, detokenize=False)
  miss, hit, cached = [], [], []
  for t in range(trials + 1):
    shared = rng.integers(0, vocab, prefix).tolist()
    for kind, out in (("miss", miss), ("hit", hit)):
      rid = f"ttft-{t}-{kind}"
      engine.add_request(rid, shared + rng.integers(0, vocab, tail).tolist(), sp)
      engine.run_until_done()
      o = engine.pop_output(rid)
      if t:
        out.append(1e3 * o.metrics[0].ttft)
        if kind == "hit":
          cached.append(o.num_cached_tokens)
  m, h = statistics.median(miss), statistics.median(hit)
  return {"prefix_tokens": prefix, "miss_ms": m, "hit_ms": h, "hit_over_miss": h / m,
          "cached_tokens": statistics.median(cached)}


def multiround(engine, conversations: int) -> dict:
  """The multi-round workload offline: rounds arrive as their predecessors finish."""
  from launch.conversations import Conversations
  from nanoflow_jax.sampling_params import SamplingParams
  pool = engine.pool
  conv = Conversations(conversations, 0, engine.model.config.vocab_size, engine.max_model_len,
                       lambda n: SamplingParams(max_tokens=n, ignore_eos=True, temperature=0, detokenize=False))
  q0, h0, hh0, e0 = pool.queried_tokens, pool.hit_tokens, pool.host_hit_tokens, pool.evictions
  st = engine.stats
  s0 = (st.steps, st.host_seconds, st.wait_seconds, st.schedule_seconds)
  tier = pool.host
  h_0 = (tier.save_seconds, tier.load_seconds, tier.settle_seconds) if tier is not None else (0.0, 0.0, 0.0)
  t = time.perf_counter()
  conv.start(engine)
  engine.run_until_done(progress=lambda: conv.advance(engine))   # rounds added as their predecessors finish
  wall = time.perf_counter() - t
  n_out = sum(len(o.outputs[0].token_ids) for o in conv.outputs)
  hits = pool.hit_tokens - h0
  ttft = sorted(1e3 * m.ttft for o in conv.outputs for m in o.metrics)
  return {"requests": len(conv.outputs), "wall_s": wall, "total_tok_s": (conv.prompt_tokens + n_out) / wall,
          "hit_rate": hits / max(pool.queried_tokens - q0, 1), "host_hit_tokens": pool.host_hit_tokens - hh0,
          "prefill_tokens_computed": conv.prompt_tokens - hits, "evictions": pool.evictions - e0,
          "ttft_p50_ms": ttft[len(ttft) // 2], "ttft_p99_ms": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
          "host_saved": getattr(pool.host, "saved", 0), "host_loaded": getattr(pool.host, "loaded", 0),
          "host_moved_back": getattr(pool.host, "moved_back", 0),
          # where the time went: the engine thread's own time (the tier's calls included) and its waits for the
          # device, and the tier's calls alone
          "steps": st.steps - s0[0], "host_s": st.host_seconds - s0[1], "wait_s": st.wait_seconds - s0[2],
          "schedule_s": st.schedule_seconds - s0[3],
          **({f"tier_{k}_s": getattr(tier, f"{k}_seconds") - v for k, v in zip(("save", "load", "settle"), h_0)}
             if tier is not None else {})}


def tables(res: dict) -> str:
  out = []
  if "copies" in res:
    c = res["copies"]
    out += [f"Host tier copies ({c.get('copy', 'put')}), {c['pages']} pages ({c['gb']:.2f} GB): device -> host "
            f"{c['save_gb_s']:.1f} GB/s, host -> device {c['load_gb_s']:.1f} GB/s", ""]
  steps = res.get("step", [])
  for s in [steps] if isinstance(steps, dict) else steps:   # one dict: a run from before the copy modes
    out += [f"Decode step, {s['decodes']} sequences at context {FLAGS.context}: {s['alone_ms']:.2f} ms alone, "
            f"{s['with_copies_ms']:.2f} ms with {s['pages_per_step']} pages saved before each step, copy "
            f"{s.get('copy', 'put')} ({s['ratio']:.3f}x; the host in save {s.get('save_host_ms', float('nan')):.2f} "
            "ms a step in save and settle)"]
  if steps:
    out.append("")
  if "ttft" in res:
    t = res["ttft"]
    out += [f"TTFT after a {t['prefix_tokens']}-token prefix: miss {t['miss_ms']:.1f} ms, hit {t['hit_ms']:.1f} ms "
            f"({t['hit_over_miss']:.2f}x; {t['cached_tokens']:.0f} tokens cached)", ""]
  if "multiround" in res:
    out += ["| multi-round | requests | total tok/s | vs off | vs on | hit rate | from host | prefill tokens computed | "
            "evictions | TTFT p50 / p99 ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = {b: res["multiround"].get(b, {}).get("total_tok_s") for b in ("off", "on")}
    for name, r in res["multiround"].items():
      vs = " | ".join(f"{r['total_tok_s'] / base[b]:.2f}x" if base[b] else "-" for b in ("off", "on"))
      out.append(f"| {name} | {r['requests']} | {r['total_tok_s']:,.0f} | {vs} | "
                 f"{r['hit_rate']:.1%} | {r['host_hit_tokens']} | {r['prefill_tokens_computed']:,} | "
                 f"{r['evictions']} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} |")
    out += ["", "| multi-round | steps | host s (of which schedule + tier moves) | waiting for the device s | "
            "tier save / load / settle s |", "|---|---|---|---|---|"]
    for name, r in res["multiround"].items():
      if "steps" in r:   # (runs from before these fields)
        tier = " / ".join(f"{r[f'tier_{k}_s']:.2f}" for k in ("save", "load", "settle")) if "tier_save_s" in r else "-"
        out.append(f"| {name} | {r['steps']} | {r['host_s']:.2f} ({r['schedule_s']:.2f}) | {r['wait_s']:.2f} | {tier} |")
  return "\n".join(out)


def plot(res: dict, path: str, extra: dict | None = None) -> None:
  """Multi-round throughput and prefill tokens computed per configuration (`extra`: more runs, name -> the same
  fields, e.g. benchmark.py's full-pool runs)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  runs = {**res.get("multiround", {}), **(extra or {})}
  names = list(runs)
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  for ax, field, label in ((axes[0], "total_tok_s", "total tokens/s"),
                           (axes[1], "prefill_tokens_computed", "prefill tokens computed")):
    vals = [runs[n][field] for n in names]
    ax.barh(names, vals, color=["#999" if "off" in n else "#3a7" for n in names])
    for i, v in enumerate(vals):
      ax.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
    ax.set_xlabel(label)
    ax.invert_yaxis()
  axes[1].set_yticks([])
  fig.suptitle(f"Multi-round conversations, prefix caching off / on ({FLAGS.model}, "
               f"{res.get('device', 'device not recorded')})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  del argv
  import json
  if FLAGS.from_json:
    with open(FLAGS.from_json) as f:
      res = json.load(f)
    print(tables(res))
    if FLAGS.plot_out:
      plot(res, FLAGS.plot_out)
    return
  from nanoflow_jax import compat
  compat.configure_host_memory(FLAGS.host_kv_cache_gb)   # before JAX starts, as serve.py and benchmark.py do
  from nanoflow_jax.llm import build_engine
  kw = dict(random_weights=True, dense_batch=FLAGS.dense_batch, max_num_seqs=FLAGS.max_num_seqs,
            num_pages=FLAGS.num_pages, max_model_len=FLAGS.max_model_len, kv_cache_dtype=FLAGS.kv_cache_dtype,
            quantization=FLAGS.quantization)
  import jax
  res, model, engine_parts_done = {"device": jax.devices()[0].device_kind}, None, False
  configs = [("on", True, 0.0, FLAGS.host_kv_copy)]
  if "multiround" in FLAGS.parts:
    every = {"off": ("off", False, 0.0, FLAGS.host_kv_copy), "on": ("on", True, 0.0, FLAGS.host_kv_copy),
             **{c: (f"on + host tier ({m})", True, FLAGS.host_kv_cache_gb, m)
                for c, m in {"host": FLAGS.host_kv_copy, **HOST_CONFIGS}.items()}}
    configs = list({every[c][0]: every[c] for c in FLAGS.configs}.values())   # (host and host-put may be one)
  for name, caching, host_gb, copy in configs:
    engine = build_engine(FLAGS.model, model_obj=model, enable_prefix_caching=caching, host_kv_cache_gb=host_gb,
                          host_kv_copy=copy, **kw)
    model = engine.model
    engine.warm_up()
    if "multiround" in FLAGS.parts:   # first, on a cache holding only the warm-up's pages
      res.setdefault("multiround", {})[name] = multiround(engine, FLAGS.conversations)
      print(name, json.dumps(res["multiround"][name]), flush=True)
    if caching and not engine_parts_done:   # the engine-level parts, once, on the first engine with caching on
      engine_parts_done = True
      if "copies" in FLAGS.parts:
        res["copies"] = copy_rates(engine, FLAGS.copy_pages)
        print(tables({"copies": res["copies"]}), flush=True)
      if "step" in FLAGS.parts:
        res["step"] = []
        for copy in FLAGS.step_copies:   # one mode's failure keeps the others' figures (session 25: a sweep
          try:                           # preempted after the multi-round run stopped the whole bench)
            res["step"].append(step_with_copies(engine, FLAGS.decodes, FLAGS.pages_per_step, copy))
          except RuntimeError as e:
            print(f"step with copies ({copy}): {e}", flush=True)
        print(tables({"step": res["step"]}), flush=True)
      if "ttft" in FLAGS.parts:
        res["ttft"] = prefix_ttft(engine, FLAGS.prefix_tokens)
        print(tables({"ttft": res["ttft"]}), flush=True)
    engine.shutdown()
    del engine
  text = tables(res)
  report(text, FLAGS.out)
  if FLAGS.out:
    with open(FLAGS.out.rsplit(".", 1)[0] + ".json", "w") as f:
      json.dump(res, f, indent=2)
  if FLAGS.plot_out and "multiround" in res:
    plot(res, FLAGS.plot_out)


if __name__ == "__main__":
  app.run(main)
