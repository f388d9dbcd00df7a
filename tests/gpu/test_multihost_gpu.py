"""Serving across processes on GPUs: two processes of one job, one GPU each (as two hosts would be),
LLaMA-3-8B shape at TP 2 across them. Process 0 serves HTTP, process 1 steps with it (multihost.py). The
greedy tokens (their logprobs) must equal the same TP-2 model's run by one process over both GPUs.

  XLA_PYTHON_CLIENT_PREALLOCATE=false NANOFLOW_GPU_TESTS=1 PYTHONPATH=.:.carry \\
      python3 -m pytest -q tests/gpu/test_multihost_gpu.py        # on nvidia-h200-x2 or larger

Run with XLA_PYTHON_CLIENT_PREALLOCATE=false: the test process itself must leave the GPUs' memory to the job.
"""
import json
import os
import shutil
import subprocess
import sys
import urllib.request

import pytest

from server_process import ROOT, ServerProcess, free_port


def _gpus() -> int:
  if not shutil.which("nvidia-smi"):
    return 0
  r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
  return sum(line.startswith("GPU ") for line in r.stdout.splitlines())


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")]

ENGINE = ["--model=llama-3-8b", "--random_weights", "--tp=2", "--dense_batch=1024", "--max_num_seqs=16",
          "--num_pages=4096", "--max_model_len=2048"]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
REFERENCE = """
import json, sys
from nanoflow_jax import LLM, SamplingParams
llm = LLM("llama-3-8b", random_weights=True, tensor_parallel=2, dense_batch=1024, max_num_seqs=16,
          num_pages=4096, max_model_len=2048)
outs = llm.generate(json.loads(sys.argv[1]), SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True,
                                                            logprobs=0))
print(json.dumps([[lp.logprob for lp in o.outputs[0].logprobs] for o in outs]))
"""


def _complete(url, prompt):
  """The greedy tokens' logprobs: with random weights most tokens decode to no text, so these are what
  tells two runs' tokens apart."""
  body = json.dumps({"prompt": prompt, "max_tokens": 16, "temperature": 0.0, "ignore_eos": True,
                     "logprobs": 0}).encode()
  req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=600) as r:
    return json.loads(r.read())["choices"][0]["logprobs"]["token_logprobs"]


def test_two_processes_one_gpu_each_serve_what_one_process_serves():
  env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.path.join(ROOT, '.carry')}"}
  job = [f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2"]
  log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), "follower-gpu.log"), "w+")
  follower = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "serve.py"), *ENGINE, *job,
                               "--process_id=1", f"--port={free_port()}"], stdout=log, stderr=subprocess.STDOUT,
                              env={**env, "CUDA_VISIBLE_DEVICES": "1"})
  try:
    leader = ServerProcess(*ENGINE, *job, "--process_id=0", env={**env, "CUDA_VISIBLE_DEVICES": "0"},
                           start_timeout=600)
    try:
      got = [_complete(leader.url, p) for p in PROMPTS]
      assert "2 devices in the job, 1 here" in leader.output()
    finally:
      assert leader.stop(timeout=120) == 0, leader.output()
    assert follower.wait(timeout=120) == 0
  finally:
    if follower.poll() is None:
      follower.kill()
    log.seek(0)
    print(log.read()[-2000:])
  ref = subprocess.run([sys.executable, "-c", REFERENCE, json.dumps(PROMPTS)], capture_output=True, text=True,
                       env={**env, "CUDA_VISIBLE_DEVICES": "0,1"}, timeout=900)
  assert ref.returncode == 0, ref.stderr[-3000:]
  expected = json.loads(ref.stdout.strip().splitlines()[-1])
  print("job:", got, "\none process:", expected)
  # the same program on the same two GPUs: the same tokens, and their logprobs to rounding
  assert all(len(a) == len(b) == 16 for a, b in zip(got, expected))
  assert all(abs(x - y) < 1e-3 for a, b in zip(got, expected) for x, y in zip(a, b))
