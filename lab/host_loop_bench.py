"""The engine's host loop without a device: tokens per second and the host's parts per step, with the
executor replaced by a stub whose dispatch takes --dispatch_ms with the GIL released (as XLA's kernel launches
do) and returns the sampled tokens at once. What the loop costs in Python, and what a change to it (a dispatch
thread: --overlap_dispatch) gains, measured on the CPU before any device time is spent.

  python lab/host_loop_bench.py --seqs=1,64,1024 --dispatch_ms=0,6,10
  python lab/host_loop_bench.py --seqs=512 --dispatch_ms=20 --server   # through the HTTP server, 512 streams
  python lab/host_loop_bench.py --seqs=300 --dispatch_ms=10 --device_ms=8   # with a simulated device

Every variant runs its sequences to --tokens output tokens each (all admitted, then decoding), one engine per
variant; --server serves the same engine (launch/serve.py's app) and streams the completions from a
subprocess, so the event loop's share of the GIL is in the figure.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import NamedTuple

if __package__ in (None, ""):
  import _root  # noqa: F401  (the repository root on sys.path: lab/_root.py)

from absl import app, flags

from lab._report import report
from launch import decode_sweep

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """(Only when run as a script: the tests import this module beside other lab tools with flags of these names.)"""
  flags.DEFINE_list("seqs", ["1", "64", "1024"], "Sequences decoding at once.")
  flags.DEFINE_list("dispatch_ms", ["0", "10"], "The stub's dispatch time per step (GIL released).")
  flags.DEFINE_list("overlap", ["false", "true"], "EngineConfig.overlap_dispatch values to run.")
  flags.DEFINE_float("device_ms", 0.0, "A simulated device's time per step (from its dispatch's end, one step after "
                     "another): the tokens are readable only then. 0: none (the loop's period is the host's).")
  flags.DEFINE_integer("tokens", 64, "Output tokens per sequence.")
  flags.DEFINE_integer("prompt", 64, "Prompt tokens per sequence.")
  flags.DEFINE_bool("detokenize", True, "Detokenize the outputs (the tiny model's byte-level tokenizer).")
  flags.DEFINE_bool("server", False, "Stream the completions through the HTTP server instead of generating offline.")
  flags.DEFINE_string("out", None, "Write the table (markdown) here.")


class Load(NamedTuple):
  tokens: int = 64        # output tokens per sequence
  prompt: int = 64        # prompt tokens per sequence
  detokenize: bool = True


PARTS = decode_sweep.HOST_PARTS   # EngineStats' <part>_seconds


class _OnDevice:
  """A stub output that a read (np.asarray, as jax.device_get does) returns only once the simulated device has
  finished the step that made it."""

  def __init__(self, value, ready_at: float):
    self.value, self.ready_at = value, ready_at

  def __array__(self, dtype=None, copy=None):
    wait = self.ready_at - time.perf_counter()
    if wait > 0:
      time.sleep(wait)
    return self.value


def stub_executor(engine, dispatch_s: float, device_s: float = 0.0) -> None:
  """engine.executor.run replaced: sleeps dispatch_s (the GIL is free meanwhile), then returns random tokens
  (printable ASCII bytes of the tiny tokenizer: each is a streamed chunk of text). With device_s, a simulated
  device runs the steps one after another, each from when its dispatch ends (or the previous one is done) for
  device_s, and the tokens can be read only then."""
  import numpy as np
  rng = np.random.default_rng(0)
  device_free = [0.0]

  def run(inp, sp, extras=None):
    if dispatch_s:
      time.sleep(dispatch_s)
    s = len(inp.sample_slots)
    outs = (rng.integers(32, 127, s).astype(np.int32), np.zeros(s, np.float32), np.zeros((s, 20), np.float32),
            np.zeros((s, 20), np.int32))
    if not device_s:
      return outs
    device_free[0] = max(device_free[0], time.perf_counter()) + device_s
    return tuple(_OnDevice(o, device_free[0]) for o in outs)
  engine.executor.run = run


def make_engine(seqs: int, overlap: bool, dispatch_s: float, load: Load, device_s: float = 0.0):
  from nanoflow_jax.llm import build_engine
  per_seq = -(-(load.prompt + load.tokens + 1) // 16)
  engine = build_engine("tiny", dense_batch=2048, max_num_seqs=max(seqs, 1), num_pages=seqs * per_seq + 16,
                        max_model_len=load.prompt + load.tokens + 16, overlap_dispatch=overlap,
                        enable_prefix_caching=False)
  stub_executor(engine, dispatch_s, device_s)
  return engine


def run_offline(seqs: int, overlap: bool, dispatch_s: float, load: Load = Load(), device_s: float = 0.0) -> dict:
  import numpy as np
  from nanoflow_jax.sampling_params import SamplingParams
  engine = make_engine(seqs, overlap, dispatch_s, load, device_s)
  rng = np.random.default_rng(1)
  params = SamplingParams(max_tokens=load.tokens, ignore_eos=True, detokenize=load.detokenize)
  for i in range(seqs):
    engine.add_request(f"r{i}", rng.integers(3, 250, load.prompt).tolist(), params, on_delta=lambda d: None)
  # timed from when every sequence decodes: the steady decode loop, not the admission
  while any(not s.output_ids for r in engine.requests.values() for s in r.seqs):
    engine.step()
  before, tokens0 = dataclasses.replace(engine.stats), engine.stats.generated_tokens
  t = time.perf_counter()
  engine.run_until_done()
  wall = time.perf_counter() - t
  st, steps = engine.stats, max(engine.stats.steps - before.steps, 1)
  engine.shutdown()
  return {"tokens": st.generated_tokens - tokens0, "tokens_per_s": (st.generated_tokens - tokens0) / wall,
          "ms_per_step": 1e3 * wall / steps, **decode_sweep.host_ms_per_step(st, before)}


_CLIENT = r"""
import asyncio, sys, time, aiohttp
url, n, tokens, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), [7] * int(sys.argv[4])
async def one(s, counts):
  body = {"model": "tiny", "prompt": prompt, "max_tokens": tokens, "stream": True, "ignore_eos": True}
  async with s.post(url + "/v1/completions", json=body) as r:
    assert r.status == 200, r.status
    async for line in r.content:
      if line.startswith(b"data: {"):
        counts[0] += 1
async def main():
  counts = [0]
  async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                   timeout=aiohttp.ClientTimeout(total=900)) as s:
    t = time.perf_counter()
    await asyncio.gather(*(one(s, counts) for _ in range(n)))
    print(counts[0], time.perf_counter() - t)
asyncio.run(main())
"""


def run_server(seqs: int, overlap: bool, dispatch_s: float, load: Load = Load(), device_s: float = 0.0) -> dict:
  """The engine behind the server's app (create_app) on this process's event loop, `seqs` streams from a client
  subprocess."""
  import asyncio
  from aiohttp import web
  from nanoflow_jax.async_engine import AsyncEngine
  from nanoflow_jax.server.app import create_app
  engine = make_engine(seqs, overlap, dispatch_s, load, device_s)
  ae = AsyncEngine(engine).start()

  async def serving():
    runner = web.AppRunner(create_app(ae, "tiny"))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()   # (a free port, read back below)
    port = runner.addresses[0][1]
    before = dataclasses.replace(engine.stats)
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CLIENT, f"http://127.0.0.1:{port}", str(seqs), str(load.tokens), str(load.prompt),
        stdout=asyncio.subprocess.PIPE)
    out, _ = await client.communicate()
    await runner.cleanup()
    if client.returncode:
      raise RuntimeError(f"the streaming client failed ({client.returncode})")
    return before, out.decode().split()
  before, (chunks, wall) = asyncio.run(serving())
  st, steps = engine.stats, max(engine.stats.steps - before.steps, 1)
  ae.shutdown()
  engine.shutdown()
  return {"tokens": int(chunks), "tokens_per_s": int(chunks) / float(wall), "ms_per_step": 1e3 * float(wall) / steps,
          **decode_sweep.host_ms_per_step(st, before)}


def table(rows: list[dict], load: Load, server: bool, device_ms: float = 0.0) -> str:
  lines = [f"host loop on a stub executor ({'server, streaming' if server else 'offline'}; "
           f"{load.prompt}-token prompts, {load.tokens} tokens each; detokenize {load.detokenize}"
           f"{f'; a simulated device step of {device_ms:g} ms' if device_ms else ''})", "",
           "| sequences | dispatch ms | overlap | tokens/s | ms per step | " + " / ".join(PARTS) + " ms |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['seqs']} | {r['dispatch_ms']:g} | {r['overlap']} | {r['tokens_per_s']:,.0f} | "
                 f"{r['ms_per_step']:.2f} | " + " / ".join(f"{r[p]:.2f}" for p in PARTS) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  rows, load = [], Load(FLAGS.tokens, FLAGS.prompt, FLAGS.detokenize)
  for seqs in map(int, FLAGS.seqs):
    for d in map(float, FLAGS.dispatch_ms):
      for ov in FLAGS.overlap:
        overlap = ov.lower() in ("1", "true", "yes")
        res = (run_server if FLAGS.server else run_offline)(seqs, overlap, d / 1e3, load, FLAGS.device_ms / 1e3)
        rows.append({"seqs": seqs, "dispatch_ms": d, "overlap": overlap, **res})
        print(json.dumps(rows[-1]), flush=True)
  text = table(rows, load, FLAGS.server, FLAGS.device_ms)
  report(text, FLAGS.out)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
