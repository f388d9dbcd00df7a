"""The HTTP server across hosts: two local processes form one job over 4 CPU devices (TP 4); process 0
serves, process 1 runs the same steps (nanoflow_jax/multihost.py). Its answers equal one device's, and
process 1 leaves when process 0 stops."""
import json
import os
import subprocess
import sys
import urllib.request

from nanoflow_jax import multihost
from server_process import ROOT, ServerProcess, free_port

FLAGS = ["--max_num_seqs=8", "--dense_batch=64", "--num_pages=256", "--tp=4"]
ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}


def _complete(url, prompt, **extra):
  """(text, the sampled tokens' logprobs)."""
  body = json.dumps({"prompt": prompt, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True, "logprobs": 0,
                     **extra}).encode()
  req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=120) as r:
    choice = json.loads(r.read())["choices"][0]
  return choice["text"], choice["logprobs"]["token_logprobs"]


def test_two_hosts_serve_what_one_device_serves():
  from nanoflow_jax import LLM, SamplingParams
  addr = f"127.0.0.1:{free_port()}"
  job = [f"--coordinator_address={addr}", "--num_processes=2"]
  log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"follower-{addr.split(':')[1]}.log"), "w+")
  follower = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "serve.py"), *FLAGS, *job,
                               "--process_id=1", f"--port={free_port()}"], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, **ENV})
  try:
    leader = ServerProcess(*FLAGS, *job, "--process_id=0", env=ENV)
    try:
      prompts = ["hello world", "the quick brown fox"]
      texts = [_complete(leader.url, p) for p in prompts]
      seeded = [_complete(leader.url, "a", temperature=1.0, seed=s) for s in (1, 1, 2)]
      # the reset goes to the follower too (its pool must decide as the leader's): the job still answers alike
      req = urllib.request.Request(leader.url + "/reset_prefix_cache", data=b"", method="POST")
      assert urllib.request.urlopen(req, timeout=60).status == 200
      assert _complete(leader.url, prompts[0]) == texts[0]
      assert "process 0 of 2; 4 devices in the job" in leader.output()
    finally:
      assert leader.stop() == 0, leader.output()
    assert follower.wait(timeout=120) == 0   # it left with the leader
  finally:
    if follower.poll() is None:
      follower.kill()
    log.seek(0)
    follower_log = log.read()[-3000:]
  assert "the leader stopped" in follower_log, follower_log
  one = LLM("tiny", dense_batch=64, num_pages=256, max_num_seqs=8)
  ref = one.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0))
  assert [t for t, _ in texts] == [o.outputs[0].text for o in ref]
  for (_, lps), o in zip(texts, ref):
    assert len(lps) == 8 and all(abs(a - b.logprob) < 1e-4 for a, b in zip(lps, o.outputs[0].logprobs))
  assert seeded[0] == seeded[1]   # a seed gives the same text across the job's requests


class _Store:
  """The coordination store's calls, in memory."""
  def __init__(self):
    self.kv = {}

  def key_value_set(self, k, v):
    assert k not in self.kv
    self.kv[k] = v

  def blocking_key_value_get(self, k, timeout_ms):
    if k not in self.kv:
      raise RuntimeError("DEADLINE_EXCEEDED: timed out")
    return self.kv[k]

  def key_value_delete(self, k):
    del self.kv[k]


def test_step_channel_in_order_and_bounded(monkeypatch):
  monkeypatch.setattr(multihost, "HORIZON", 3)
  store = _Store()
  leader, follower = multihost.StepChannel(store), multihost.StepChannel(store)
  assert follower.receive() is None                      # nothing yet: the follower waits again
  leader.publish([("abort", "x")], step=False)
  leader.publish([], step=True)
  assert follower.receive() == {"ops": [["abort", "x"]], "step": False, "stop": False}
  assert follower.receive()["step"] is True and follower.receive() is None
  for _ in range(5):
    leader.publish([], step=True)
  assert len(store.kv) == 3                              # the oldest messages go
  leader.publish([], step=False, stop=True)
  assert store.kv[f"{multihost.PREFIX}7"] == json.dumps({"ops": [], "step": False, "stop": True})
