"""Starts launch/serve.py as users do (a subprocess on 127.0.0.1) and waits until it answers."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class ServerProcess:
  def __init__(self, *flags, env=None, start_timeout=120):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    if not any("warm_up" in f for f in flags):   # (the warm-up's compiles: seconds on CPU; one test keeps it)
      flags = ("--nowarm_up", *flags)
    cmd = [sys.executable, os.path.join(ROOT, "launch", "serve.py"), f"--port={self.port}", *flags]
    self.log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"serve-{self.port}.log"), "w+")
    self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    deadline = time.time() + start_timeout
    while time.time() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f"server exited: {self.output()}")
      try:
        with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
          if r.status == 200:
            return
      except OSError:
        time.sleep(0.2)
    raise RuntimeError(f"server did not start: {self.output()}")

  @staticmethod
  def run_to_exit(*flags, timeout=120) -> subprocess.CompletedProcess:
    """launch/serve.py with `flags` where it is expected to exit by itself (a refused configuration)."""
    cmd = [sys.executable, os.path.join(ROOT, "launch", "serve.py"), f"--port={free_port()}", *flags]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)

  def output(self) -> str:
    self.log.flush()
    self.log.seek(0)
    return self.log.read()[-5000:]

  def stop(self, timeout=60) -> int:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(timeout)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    return self.proc.returncode


KEY = "test-key"
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


def _reply(r) -> dict:
  """A response's JSON body, or for a stream (server-sent events) {"stream": [each event's JSON]}."""
  body = r.read()
  if (r.headers.get("Content-Type") or "").startswith("text/event-stream"):
    lines = [ln[6:] for ln in body.decode().splitlines() if ln.startswith("data: ")]
    return {"stream": [json.loads(ln) for ln in lines if ln != "[DONE]"]}
  return json.loads(body)


def post(server, path, data: bytes, key=KEY, headers=None, timeout=60):
  """(status, JSON body, headers) of a POST; a stream's body as {"stream": [events]}."""
  req = urllib.request.Request(server.url + path, data=data, method="POST",
                               headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"}
                                                                              if key else {}), **(headers or {})})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      return r.status, _reply(r), dict(r.headers)
  except urllib.error.HTTPError as e:
    return e.code, _reply(e), dict(e.headers)


def get(server, path, timeout=30):
  with urllib.request.urlopen(server.url + path, timeout=timeout) as r:
    return r.status, r.read().decode()


def metric(server, name) -> float:
  _, text = get(server, "/metrics")
  m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
  return float(m.group(1))


def wait_idle(server, timeout=30) -> None:
  """Until no sequence runs or waits and no KV page is in use (or the timeout)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if (metric(server, "nanoflow_kv_pages_used") == 0 and metric(server, "nanoflow_requests_running") == 0
        and metric(server, "nanoflow_requests_waiting") == 0):
      return
    time.sleep(0.1)
