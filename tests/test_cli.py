"""launch/serve.py as a vLLM user starts it: the model given positionally, --help listing the engine flags, a
busy port refused before anything loads."""
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE = [sys.executable, os.path.join(ROOT, "launch", "serve.py")]


def _run(*args, timeout=120):
  return subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_help_lists_the_engine_flags():
  out = _run("--help").stdout
  for flag in ("--model", "--kv_cache_dtype", "--quantization", "--max_model_len", "--shutdown_timeout"):
    assert flag in out, flag


def test_a_busy_port_fails_before_the_model_loads():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    s.listen()
    t0 = time.monotonic()
    r = _run(f"--port={s.getsockname()[1]}")
  assert r.returncode == 2 and "Address already in use" in r.stderr and "nothing was loaded" in r.stderr
  assert "KV cache" not in r.stderr and time.monotonic() - t0 < 30


def test_the_model_may_be_given_positionally():
  r = _run("/no/such/model", "--port=0")   # before: ignored, and the tiny model was served
  assert r.returncode == 2 and "'/no/such/model' is neither a model directory" in r.stderr
  r = _run("/no/such/model", "--model=tiny", "--port=0")
  assert r.returncode != 0 and "given twice" in r.stderr
