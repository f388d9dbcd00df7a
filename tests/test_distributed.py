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
