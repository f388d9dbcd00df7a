"""TP 1, 2 and 4 on 4 CPU devices give the single-device tokens, in both modes: through the per-device
(shard_map) layer where heads and MLP divide by the TP degree, through XLA's partitioner elsewhere."""
import json
import os
import subprocess
import sys

import pytest

from nanoflow_jax import config as config_lib, parallel
from jax.sharding import PartitionSpec as P

HERE = os.path.dirname(os.path.abspath(__file__))


# arch -> the TP degrees that run the per-device layer (2 KV heads: TP 4 falls back; MoE: always)
MANUAL = {"llama2": {2, 4}, "llama3": {2}, "qwen2": {2}, "mixtral": set()}


@pytest.mark.parametrize("arch", sorted(MANUAL))
def test_tp_matches_single_device(arch):
  r = subprocess.run([sys.executable, os.path.join(HERE, "tp_worker.py"), arch], capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  ref = out["1-sequential"]["tokens"]
  for key, v in out.items():
    assert v["tokens"] == ref, key
  assert out["2-sequential"]["devices"] == 2 and out["4-nanoflow"]["devices"] == 4
  assert out["2-sequential"]["kv_devices"] == 2
  assert ("2-sequential-interpret" in out) == (arch == "llama2")   # the Pallas attention kernel under TP
  for key, v in out.items():
    assert v["manual"] == (int(key.split("-")[0]) in MANUAL[arch]), key


def test_sharding_rules():
  cfg = config_lib.NAMED_SHAPES["llama-3-8b"]
  spec = lambda name, shape, tp=8: parallel.param_spec(cfg, ("layers_0", name), shape, tp)
  assert spec("qkv", (4096, 8, 6, 128)) == P(None, "tp", None, None)
  assert spec("o", (32, 128, 4096)) == P("tp", None, None)
  assert spec("gate_up", (4096, 2, 14336)) == P(None, None, "tp")
  assert spec("down", (14336, 4096)) == P("tp", None)
  assert spec("input_norm", (4096,)) == P()
  assert parallel.param_spec(cfg, ("embedding",), (128256, 4096), 8) == P("tp", None)
  # more devices than KV heads: attention weights replicated
  assert spec("qkv", (4096, 8, 6, 128), tp=16) == P() and spec("o", (32, 128, 4096), tp=16) == P()
