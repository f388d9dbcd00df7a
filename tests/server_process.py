"""Starts launch/serve.py as users do (a subprocess on 127.0.0.1) and waits until it answers."""
import os
import signal
import socket
import subprocess
import sys
import time
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
