"""Soak: minutes of mixed, hostile traffic against a live server, then SIGTERM; prints what survived.

  python lab/soak.py --minutes=10                 # starts launch/serve.py on the tiny model (CPU if no GPU)
  python lab/soak.py --minutes=2 --concurrency=64 --json_out=/tmp/soak.json

Traffic: completions and chat, streaming or not, n 1-3, random prompt and output lengths; a share of clients
leave at a random moment (before the engine takes the request, while it waits, mid-stream); a share of
requests are malformed or out of range (must get a 4xx). A health probe runs throughout. At the end: the
server must be idle with no KV page in use, its memory must not have grown (RSS after warm-up against the
end), and SIGTERM with requests in flight must drain them and exit 0.
Exit status 0 when every check holds.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

if __package__ in (None, ""):
  import _root  # noqa: F401  (the repository root on sys.path: lab/_root.py)

import aiohttp
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_float("minutes", 10.0, "How long the traffic runs.")
flags.DEFINE_integer("concurrency", 48, "Clients at once.")
flags.DEFINE_float("leave_share", 0.25, "Share of requests whose client leaves at a random moment.")
flags.DEFINE_float("bad_share", 0.15, "Share of malformed or out-of-range requests.")
flags.DEFINE_float("warmup_minutes", 1.0, "RSS is measured from the end of this warm-up (compilation, caches).")
flags.DEFINE_integer("seed", 0, "Traffic seed.")
flags.DEFINE_string("server_flags", "--max_num_seqs=32 --dense_batch=256 --num_pages=4096",
                    "Flags for launch/serve.py.")
flags.DEFINE_string("json_out", None, "Also write the results here.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the a of engine token page cache light model step batch serve river stone ünïcödé 字 🙂".split()

BAD_BODIES = [
    b"{not json", b"[1, 2]", b'{"prompt": "x", "max_tokens": 10000000000000}', b'{"prompt": "x", "top_k": 2147483648}',
    b'{"prompt": "x", "stop_token_ids": [1099511627776], "min_tokens": 2}', b'{"prompt": "x", "temperature": NaN}',
    b'{"prompt": "a\\ud800"}', b'{"prompt": "x", "n": "two"}', b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"prompt": "x", "max_tokens": ' + b"9" * 5001 + b"}", b'{"prompt": [1, 2, 99999999]}',
    b'{"messages": [{"role": "user", "content": 5}]}', b'{"prompt": "x", "seed": 36893488147419103232}',
]


def rss_kb(pid: int) -> int:
  with open(f"/proc/{pid}/status") as f:
    return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


class Counts(dict):
  def add(self, key, n=1):
    self[key] = self.get(key, 0) + n


async def metric(session, url, name) -> float:
  async with session.get(url + "/metrics") as r:
    m = re.search(rf"^{name} ([0-9.e+-]+)$", await r.text(), re.M)
    return float(m.group(1))


async def one_request(session, url, rng: random.Random, counts: Counts) -> None:
  if rng.random() < FLAGS.bad_share:
    path = rng.choice(["/v1/completions", "/v1/chat/completions"])
    async with session.post(url + path, data=rng.choice(BAD_BODIES),
                            headers={"Content-Type": "application/json"}) as r:
      await r.read()
      counts.add("sent")
      counts.add("refused" if 400 <= r.status < 500 else "failed" if r.status >= 500 else "bad_accepted")
      return
  chat = rng.random() < 0.4
  text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 120)))
  body = {"max_tokens": rng.randint(1, 160), "ignore_eos": rng.random() < 0.7, "n": rng.choice([1, 1, 1, 2, 3]),
          "temperature": rng.choice([0, 0.7, 1.0]), "stream": rng.random() < 0.5, "seed": rng.randint(0, 2**32)}
  if chat:
    body["messages"] = [{"role": "user", "content": text}]
  else:
    body["prompt"] = text
  path = "/v1/chat/completions" if chat else "/v1/completions"
  leave_after = rng.uniform(0, 0.5) if rng.random() < FLAGS.leave_share else None
  counts.add("sent")

  async def run():
    async with session.post(url + path, json=body, timeout=aiohttp.ClientTimeout(total=300)) as r:
      if r.status != 200:
        await r.read()
        counts.add("refused" if 400 <= r.status < 500 and r.status != 408 else "failed")
        return
      if body["stream"]:
        async for _ in r.content:
          pass
      else:
        await r.json()
      counts.add("completed")
  if leave_after is None:
    try:
      await run()
    except asyncio.TimeoutError:
      counts.add("stuck")
    except aiohttp.ClientError:
      counts.add("failed")
    return
  task = asyncio.ensure_future(run())
  done, _ = await asyncio.wait([task], timeout=leave_after)
  if not done:
    task.cancel()   # the client goes away: the connection is closed mid-request
    try:
      await task
    except (asyncio.CancelledError, aiohttp.ClientError):
      pass
    counts.add("left")
  elif task.exception() is not None:
    counts.add("failed")


async def traffic(url: str, pid: int | None) -> dict:
  rng = random.Random(FLAGS.seed)
  counts = Counts()
  deadline = time.monotonic() + FLAGS.minutes * 60
  warm_until = time.monotonic() + min(FLAGS.warmup_minutes * 60, FLAGS.minutes * 30)
  rss = {"after_warmup": None, "peak": 0}
  health = Counts()
  conn = aiohttp.TCPConnector(limit=0)
  async with aiohttp.ClientSession(connector=conn) as session:
    async def client(i):
      crng = random.Random(rng.random())
      while time.monotonic() < deadline:
        try:
          await one_request(session, url, crng, counts)
        except Exception as e:  # noqa: BLE001 (a soak counts every failure instead of stopping)
          counts.add("failed")
          counts.add(f"client error {type(e).__name__}")

    async def probe():
      last_print = 0.0
      while time.monotonic() < deadline:
        try:
          async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=10)) as r:
            health.add("ok" if r.status == 200 else "unhealthy")
        except (aiohttp.ClientError, asyncio.TimeoutError):
          health.add("unreachable")
        if pid is not None:
          kb = rss_kb(pid)
          rss["peak"] = max(rss["peak"], kb)
          if rss["after_warmup"] is None and time.monotonic() > warm_until:
            rss["after_warmup"] = kb
        now = time.monotonic()
        if now - last_print > 30:
          last_print = now
          left = max(0.0, deadline - now)
          print(f"[soak] {left / 60:4.1f} min left: {dict(counts)} health {dict(health)}", flush=True)
        await asyncio.sleep(1.0)
    await asyncio.gather(probe(), *[client(i) for i in range(FLAGS.concurrency)])
    # idle: nothing running, nothing waiting, no page held
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
      used = await metric(session, url, "nanoflow_kv_pages_used")
      running = await metric(session, url, "nanoflow_requests_running")
      waiting = await metric(session, url, "nanoflow_requests_waiting")
      if used == running == waiting == 0:
        break
      await asyncio.sleep(0.5)
    rss_end = rss_kb(pid) if pid is not None else None
  return {"counts": dict(counts), "health": dict(health), "pages_used_at_idle": used, "running_at_idle": running,
          "waiting_at_idle": waiting, "rss_after_warmup_kb": rss["after_warmup"], "rss_end_kb": rss_end,
          "rss_peak_kb": rss["peak"]}


async def drain_check(url: str, proc: subprocess.Popen) -> dict:
  """SIGTERM with requests in flight: they finish, the process exits 0."""
  async with aiohttp.ClientSession() as session:
    body = {"prompt": "drain", "max_tokens": 64, "ignore_eos": True}

    async def req():
      async with session.post(url + "/v1/completions", json=body) as r:
        return r.status, (await r.json())["usage"]["completion_tokens"] if r.status == 200 else None
    tasks = [asyncio.ensure_future(req()) for _ in range(8)]
    await asyncio.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    results = await asyncio.gather(*tasks, return_exceptions=True)
  code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 120)
  return {"in_flight": len(tasks), "completed": sum(1 for r in results if r == (200, 64)),
          "exit_code": code, "seconds": round(time.monotonic() - t0, 2)}


def start_server() -> tuple[subprocess.Popen, str]:
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"soak-serve-{port}.log"), "w")
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "serve.py"), f"--port={port}",
                           *FLAGS.server_flags.split()], stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  import urllib.request
  for _ in range(600):
    if proc.poll() is not None:
      raise SystemExit(f"the server exited at start-up (log: {log.name})")
    try:
      with urllib.request.urlopen(url + "/health", timeout=1):
        return proc, url
    except OSError:
      time.sleep(0.2)
  raise SystemExit("the server did not start")


def main(argv):
  del argv
  proc, url = start_server()
  print(f"[soak] server pid {proc.pid} at {url}; {FLAGS.minutes} min, {FLAGS.concurrency} clients", flush=True)
  try:
    res = asyncio.run(traffic(url, proc.pid))
    res["drain"] = asyncio.run(drain_check(url, proc))
  finally:
    if proc.poll() is None:
      proc.kill()
  c, h = res["counts"], res["health"]
  growth = (res["rss_end_kb"] / res["rss_after_warmup_kb"] - 1) if res["rss_after_warmup_kb"] else float("nan")
  res["rss_growth"] = growth
  checks = {
      "engine deaths (health not ok)": h.get("unhealthy", 0) + h.get("unreachable", 0) == 0,
      "stuck requests": c.get("stuck", 0) == 0,
      "failed requests (5xx, resets)": c.get("failed", 0) == 0,
      "bad requests accepted": c.get("bad_accepted", 0) == 0,
      "pages in use at idle": res["pages_used_at_idle"] == 0 and res["running_at_idle"] == 0,
      "RSS growth < 5%": growth < 0.05,
      "drain: all in flight completed, exit 0": res["drain"]["exit_code"] == 0
                                                 and res["drain"]["completed"] == res["drain"]["in_flight"],
  }
  res["checks"] = checks
  rows = [("requests sent", c.get("sent", 0)), ("completed", c.get("completed", 0)),
          ("client left mid-request", c.get("left", 0)), ("refused (4xx)", c.get("refused", 0)),
          ("failed (5xx or reset)", c.get("failed", 0)), ("stuck (no answer in 300 s)", c.get("stuck", 0)),
          ("health probes ok / not ok", f"{h.get('ok', 0)} / {h.get('unhealthy', 0) + h.get('unreachable', 0)}"),
          ("KV pages in use at idle", int(res["pages_used_at_idle"])),
          ("RSS after warm-up -> end (MiB)", f"{res['rss_after_warmup_kb'] / 1024:.0f} -> "
                                            f"{res['rss_end_kb'] / 1024:.0f} ({growth * 100:+.1f}%)"),
          ("drain", f"{res['drain']['completed']}/{res['drain']['in_flight']} in flight completed, exit "
                    f"{res['drain']['exit_code']} after {res['drain']['seconds']} s")]
  print("\n| soak | |\n|---|---|")
  for k, v in rows:
    print(f"| {k} | {v} |")
  print("\n" + "\n".join(f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in checks.items()))
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(res, f, indent=2)
  return 0 if all(checks.values()) else 1


if __name__ == "__main__":
  app.run(main)
