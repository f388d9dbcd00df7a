"""The HTTP server across hosts: two local processes form one job over 4 CPU devices (TP 4); process 0
serves, process 1 runs the same steps (nanoflow_jax/multihost.py). Its answers equal one device's, and
process 1 leaves when process 0 stops."""
import json
import os
import subprocess
import sys
import threading
import urllib.request

import pytest

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


class _BlockingStore(_Store):
  """The store's blocking get as the coordination service has it: waits for the key or the timeout."""
  def __init__(self):
    super().__init__()
    self.cond = threading.Condition()

  def key_value_set(self, k, v):
    with self.cond:
      super().key_value_set(k, v)
      self.cond.notify_all()

  def blocking_key_value_get(self, k, timeout_ms):
    with self.cond:
      if not self.cond.wait_for(lambda: k in self.kv, timeout_ms / 1000):
        raise RuntimeError("DEADLINE_EXCEEDED: timed out")
      return self.kv[k]


def _agree_all(store, signatures, timeout_s=5.0):
  """Each process's agree() on a thread of its own; the error each raised (None where it passed)."""
  errors = [None] * len(signatures)

  def one(pid):
    try:
      multihost.agree(store, signatures[pid], pid, len(signatures), timeout_s=timeout_s, name="t")
    except multihost.JobMismatch as e:
      errors[pid] = str(e)
  threads = [threading.Thread(target=one, args=(pid,)) for pid in range(len(signatures))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return errors


def _signature(**engine):
  return {"ops": list(multihost.KNOWN_OPS), "version": "0.1.0", "model": {"name": "tiny", "num_layers": 2},
          "engine": {"dense_batch": 64, "max_num_seqs": 8, **engine}, "num_pages": 256, "max_model_len": 512}


def test_processes_that_run_the_same_thing_agree():
  store = _BlockingStore()
  assert _agree_all(store, [_signature(), _signature(), _signature()]) == [None, None, None]
  assert store.kv["nanoflow/agree/t/verdict"] == "ok"


def test_a_process_with_other_settings_stops_the_whole_job_with_an_error_naming_them():
  store = _BlockingStore()
  errors = _agree_all(store, [_signature(), _signature(), _signature(dense_batch=128)])
  assert "engine.dense_batch: 64 != 128" in errors[2] and "does not run what process 0 runs" in errors[2]
  assert "process 2 differs" in errors[0] and "engine.dense_batch: 64 != 128" in errors[0]
  assert "process 1" not in errors[0]
  # the process that agreed stops too, with process 0's reason: no process is left waiting on the others
  assert "process 0 stopped the job at start" in errors[1] and "process 2 differs" in errors[1]


def test_a_process_from_other_code_or_silent_is_named():
  store = _BlockingStore()
  other = _signature()
  other["ops"] = other["ops"] + ["pause"]   # newer code: an op process 0's code does not know
  errors = _agree_all(store, [_signature(), other, _signature()], timeout_s=1.0)
  assert "ops:" in errors[1] and "'pause'" in errors[1] and "process 1 differs" in errors[0]
  # a process that never answers (it died while loading): process 0 says which, after its timeout
  store = _BlockingStore()
  with pytest.raises(multihost.JobMismatch, match="process 1 did not answer within 0 s"):
    multihost.agree(store, _signature(), 0, 2, timeout_s=0.2, name="t")
  # and a process whose process 0 never publishes says so
  with pytest.raises(multihost.JobMismatch, match="process 0 published no job signature"):
    multihost.agree(_BlockingStore(), _signature(), 1, 2, timeout_s=0.2, name="t")


def test_the_signature_covers_the_model_and_the_settings_but_not_local_ones(tmp_path):
  from nanoflow_jax import LLM
  engine = LLM("tiny", dense_batch=64, num_pages=64, max_num_seqs=4).engine
  sig = multihost.job_signature(engine)
  assert sig == json.loads(json.dumps(sig))   # what the other side reads back from the store
  assert sig["engine"]["dense_batch"] == 64 and sig["num_pages"] == 64 and sig["model"]["num_layers"] >= 1
  assert "compilation_cache_dir" not in sig["engine"] and "overlap_dispatch" not in sig["engine"]
  assert sig["ops"] == ["add", "abort", "reset_prefix_cache"]
  # nanoflow mode: the plan compared by its contents, so the same file at another path on each host agrees
  plan_path = tmp_path / "plan.json"
  plan_path.write_text(open(os.path.join(ROOT, "nanoflow_jax", "runtime", "configs", "tiny_cpu.json")).read())
  a = multihost.job_signature(LLM("tiny", dense_batch=256, num_pages=64, max_num_seqs=4, mode="nanoflow",
                                  pipeline_config=str(plan_path)).engine)
  plan_path.rename(tmp_path / "elsewhere.json")
  b = multihost.job_signature(LLM("tiny", dense_batch=256, num_pages=64, max_num_seqs=4, mode="nanoflow",
                                  pipeline_config=str(tmp_path / "elsewhere.json")).engine)
  assert a == b and a["engine"]["pipeline_config"]["nano_batches"]
  assert multihost.job_signature(LLM("tiny", dense_batch=256, num_pages=64, max_num_seqs=4, mode="nanoflow",
                                     pipeline_config="generic").engine) != a
  other = json.loads(json.dumps(sig))
  other["model"]["hidden_size"] += 1
  assert multihost.signature_differences(sig, other) == [
      f"model.hidden_size: {sig['model']['hidden_size']} != {sig['model']['hidden_size'] + 1}"]


def test_two_hosts_started_with_other_settings_both_stop_with_an_error_not_a_hang():
  addr = f"127.0.0.1:{free_port()}"
  job = [f"--coordinator_address={addr}", "--num_processes=2"]

  def start(pid, flags):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "serve.py"), *flags, *job,
                             f"--process_id={pid}", f"--port={free_port()}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **ENV})
  procs = [start(0, FLAGS), start(1, [f for f in FLAGS if not f.startswith("--dense_batch")] + ["--dense_batch=32"])]
  try:
    outs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [2, 2], outs
  assert "process 1 differs" in outs[0] and "engine.dense_batch: 64 != 32" in outs[0], outs[0][-3000:]
  assert "does not run what process 0 runs" in outs[1] and "engine.dense_batch: 64 != 32" in outs[1]


def test_a_follower_refuses_an_op_its_code_does_not_know():
  """The ops a follower applies are the ops its signature names (KNOWN_OPS): one outside them is an error naming
  it, not skipped (skipping would let the engines' states part)."""
  from nanoflow_jax import LLM
  engine = LLM("tiny", dense_batch=64, num_pages=64, max_num_seqs=4).engine
  multihost.apply(engine, [["reset_prefix_cache"], ["abort", "no-such-request"]])   # known ops apply
  with pytest.raises(ValueError, match="unknown op 'pause'"):
    multihost.apply(engine, [["pause"]])
