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


VLLM_ARGV = r"""
import json, sys
sys.argv = ["serve"]
from launch import serve  # noqa: F401  (defines the server's flags: in a process of its own)
from launch.engine_flags import vllm_argv
print(json.dumps(vllm_argv(json.loads(sys.stdin.read()))))
"""


def test_vllm_flag_spellings_map_to_ours():
  import json

  def vllm_argv(argv):
    r = subprocess.run([sys.executable, "-c", VLLM_ARGV], input=json.dumps(argv), capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
  got = vllm_argv(["serve", "/m", "--tensor-parallel-size", "2", "--max-model-len=4096", "--gpu-memory-utilization",
                   "0.8", "--kv-cache-dtype", "fp8_e4m3", "--served-model-name", "a", "b", "--no-enable-prefix-caching",
                   "--max-num-seqs", "32", "--max-num-batched-tokens", "4096", "--quantization", "fp8", "--port",
                   "8001", "--max_model_len=5", "--async-scheduling", "--no-such-flag", "3"])
  assert got == ["serve", "/m", "--tp=2", "--max_model_len=4096", "--kv_memory_fraction=0.8", "--kv_cache_dtype=fp8",
                 "--served_model_name=a,b", "--noenable_prefix_caching", "--max_num_seqs=32", "--dense_batch=4096",
                 "--quantization=fp8", "--port=8001", "--max_model_len=5", "--overlap_dispatch", "--no-such-flag", "3"]


def test_the_console_script_and_a_vllm_style_server(tmp_path):
  """`nanoflow-jax serve` with vLLM's flags: several served names, the model path answering too, /version,
  /ping and /v1/models/{id}, --chat-template, a quiet start-up and one access line per request."""
  import json
  import urllib.error
  import urllib.request
  cli = [sys.executable, "-m", "launch.cli"]
  r = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 2 and "nanoflow-jax serve MODEL" in r.stderr
  r = subprocess.run([*cli, "serve", "--help"], capture_output=True, text=True, cwd=ROOT)
  assert "--max_model_len" in r.stdout and "--enable_prefix_caching" in r.stdout
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  template = tmp_path / "chat.jinja"
  template.write_text("{% if tools %}T{{ tools|length }}{% endif %}{% for m in messages %}[[{{ m['content'] }}]]"
                      "{% endfor %}")
  log = open(tmp_path / "serve.log", "w+")
  proc = subprocess.Popen([*cli, "serve", "tiny", "--port", str(port), "--served-model-name", "alpha", "beta",
                           "--max-model-len", "512", "--max-num-seqs", "4", "--no-enable-prefix-caching",
                           "--chat-template", str(template), "--seed", "3", "--tool-call-parser", "hermes",
                           "--enable-auto-tool-choice"],
                          cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"

  def get(path):
    try:
      with urllib.request.urlopen(url + path, timeout=5) as resp:
        return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
      return e.code, json.loads(e.read())
  try:
    deadline = time.time() + 120
    while time.time() < deadline:
      try:
        if get("/ping")[0] == 200:
          break
      except OSError:
        time.sleep(0.2)
    assert get("/version")[1]["version"] == "0.1.0"
    models = get("/v1/models")[1]["data"]
    assert [m["id"] for m in models] == ["alpha", "beta"] and models[0]["max_model_len"] == 512
    assert get("/v1/models/beta")[0] == 200 and get("/v1/models/tiny")[0] == 200   # the path given answers too
    assert get("/v1/models/gamma")[0] == 404
    req = urllib.request.Request(url + "/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
      assert json.loads(resp.read())["model"] == "alpha"
    req = urllib.request.Request(url + "/tokenize", json.dumps({"messages": [{"role": "user", "content": "hey"}]}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
      assert json.loads(resp.read())["count"] == len("[[hey]]")   # the byte tokenizer: the template's text
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps({
        "messages": [{"role": "user", "content": "hey"}], "tools": [tool], "max_tokens": 2}).encode(),
        {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:   # auto: the tools reach the template; no call parsed
      r = json.loads(resp.read())
    assert r["usage"]["prompt_tokens"] == len("T1[[hey]]") and "tool_calls" not in r["choices"][0]["message"]
  finally:
    proc.terminate()
    proc.wait(timeout=60)
  log.seek(0)
  out = log.read()
  assert "backend 'tpu'" not in out and "orbax" not in out.lower()
  lines = [line for line in out.splitlines() if " total_ms=" in line]   # the access lines
  assert any("POST /v1/completions 200 id=cmpl-" in line and "prompt_tokens=3 output_tokens=2 ttft_ms=" in line
             for line in lines), lines
  assert any("POST /tokenize 200" in line for line in lines) and not any("/ping" in line for line in lines)


def test_the_host_tier_copy_flag_offers_the_tiers_copy_modes():
  """engine_flags spells host_kv.COPY_MODES itself (it is imported before JAX may start): the two must agree."""
  from launch import engine_flags
  from nanoflow_jax import host_kv
  assert engine_flags.HOST_KV_COPY_MODES == host_kv.COPY_MODES
