"""Multi-host start-up: two local processes join one JAX job on CPU devices and reduce across it."""
import json
import os
import subprocess
import sys

import pytest

from nanoflow_jax import distributed
from server_process import free_port

HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_processes_form_one_job():
  addr = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "distributed_worker.py"), addr, "2", str(i)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  results = sorted((json.loads(o.strip().splitlines()[-1]) for o, _ in outs), key=lambda r: r["process"])
  assert [r["process"] for r in results] == [0, 1]
  for r in results:
    assert r["processes"] == 2 and r["devices"] == 4 and r["sum"] == sum(range(12))


def _job(worker: str, *args) -> list[dict]:
  """Runs `worker` as the two processes of one job; their last JSON lines, by process."""
  addr = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, worker), addr, "2", str(i), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return sorted((json.loads(o.strip().splitlines()[-1]) for o, _ in outs), key=lambda r: r["process"])


def test_engine_across_two_processes_matches_one():
  """The offline API over both processes' devices (TP 4 across 2 hosts of 2 CPU devices), in both modes within
  one job: greedy tokens equal one device's; sampled ones without a seed agree between the processes (the
  engine's seeds for unseeded requests come from process 0, so every process feeds the same inputs to the one
  computation)."""
  from nanoflow_jax import LLM, SamplingParams
  results = _job("distributed_engine_worker.py", "sequential,nanoflow")
  assert [r["devices"] for r in results] == [4, 4]
  one = LLM("tiny", random_weights=True, dense_batch=64, num_pages=256, max_num_seqs=8)
  ref = one.generate(["hello world", "the quick brown fox", "a"],
                     SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
  for mode in ("sequential", "nanoflow"):
    a, b = results[0][mode], results[1][mode]
    assert a["greedy"] == b["greedy"] and a["sampled"] == b["sampled"], mode
    assert a["next_seed"] == b["next_seed"], mode   # one seed generator for the whole job
    assert a["greedy"] == [o.outputs[0].token_ids for o in ref], mode
    # prefix caching across hosts: both processes hit the same pages, the tokens unchanged
    assert a["rounds"] == b["rounds"] and a["rounds"][0] == a["rounds"][1], mode
    assert a["cached"] == b["cached"] and a["cached"][0] == 0 and a["cached"][1] >= 64, mode
  # the host KV tier across hosts: evicted pages came back from both processes' host memory, and the tokens are
  # one device's without any cache
  a, b = results[0]["host_tier"], results[1]["host_tier"]
  assert a == b and a["host_loaded"] > 0 and a["host_hit_tokens"] > 0
  plain = LLM("tiny", random_weights=True, dense_batch=32, num_pages=10, max_num_seqs=1, enable_prefix_caching=False)
  want = [plain.generate([a["prompts"][i]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
          .outputs[0].token_ids for i in (0, 1, 2, 0, 1, 2)]
  assert a["tokens"] == want


@pytest.mark.parametrize("args,match", [
    ((None, 2, 0), "need --coordinator_address"),
    (("127.0.0.1:1234", None, 0), "needs --num_processes"),
    (("127.0.0.1:1234", 2, 2), "process_id must be"),
    (("nohostport", 2, 0), "HOST:PORT"),
])
def test_bad_flags(args, match):
  with pytest.raises(ValueError, match=match):
    distributed.initialize(*args)
  assert distributed.initialize(None, None, None) is False


def test_a_multi_host_engine_needs_num_pages(monkeypatch):
  """Sized from each process's free memory, the one global KV cache could differ in shape between
  processes: refused before the model loads."""
  import jax
  from nanoflow_jax.llm import build_engine
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match="num_pages"):
    build_engine("no-such-model-dir")   # refused before the (missing) model is looked at


MISMATCHED = r"""
import os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
from nanoflow_jax import distributed
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import jax
from nanoflow_jax import LLM, llm, multihost
real_load = llm.load_model
def loading(*a, **kw):
  print("loading", flush=True)
  return real_load(*a, **kw)
llm.load_model = loading
try:
  LLM(sys.argv[5] if len(sys.argv) > 5 else "tiny", random_weights=True, dense_batch=int(sys.argv[3]),
      num_pages=256, max_num_seqs=8,
      tensor_parallel=jax.device_count(), quantization=None if sys.argv[4] == "none" else sys.argv[4])
except multihost.JobMismatch as e:
  print("mismatch:", e)
  sys.exit(3)
print("built")
"""


def test_offline_processes_built_with_other_settings_stop_at_start_not_later():
  """The offline API across hosts (every process its own LLM): a process given another dense batch makes every
  process's LLM(...) raise at start, naming the setting, instead of hanging the job at a later step."""
  outs = _two_processes(MISMATCHED, [("64", "none"), ("32", "none")])
  assert "process 1 differs" in outs[0] and "engine.dense_batch: 64 != 32" in outs[0]
  assert "does not run what process 0 runs" in outs[1] and "engine.dense_batch: 64 != 32" in outs[1]
  assert "loading" not in outs[0] + outs[1]   # stopped before either loaded its weights


def test_processes_loading_other_models_stop_before_the_load():
  """A process that would load another model (here fp8 weights where process 0 has bf16) stops every process
  before any loads its weights: the load's first collective would otherwise hang the job before the engines'
  settings are compared."""
  outs = _two_processes(MISMATCHED, [("64", "none"), ("64", "fp8")])
  assert "model.quantization: None != " in outs[0] and "model.quantization: None != " in outs[1]
  assert "loading" not in outs[0] + outs[1]


def test_a_process_whose_model_does_not_resolve_stops_every_process_at_once():
  """A process whose model is not there tells the others (its error is its signature), so every process stops
  at once naming it, instead of the others waiting out the agreement's timeout (600 s)."""
  outs = _two_processes(MISMATCHED, [("64", "none"), ("64", "none", "/no/such/model")])
  assert "error: None != " in outs[0] and "/no/such/model" in outs[0]
  assert "loading" not in outs[0] + outs[1]


def _two_processes(script, args):
  """Runs `script` as processes 0 and 1 of one job (each with its args); both must exit 3 (JobMismatch):
  their stdouts."""
  addr = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen([sys.executable, "-c", script, addr, str(i), *a], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(HERE))
           for i, a in enumerate(args)]
  try:
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [3, 3], [err[-2000:] for _, err in outs]
  return [out for out, _ in outs]
