"""Run in a fresh process with 4 CPU devices (test_prefix_cache.py): the host KV tier under tensor parallelism
2, where the cache's pages are sharded over the devices' KV heads. Three prompts taking turns on a 10-page
pool evict each other's cached pages to the host tier and get them back; the tokens are compared with the
same TP engine without any cache. JSON on the last line."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from nanoflow_jax.llm import build_engine  # noqa: E402
from nanoflow_jax.sampling_params import SamplingParams  # noqa: E402


def run(caching: bool, host_gb: float, copy: str = "thread"):
  eng = build_engine("tiny", random_weights=True, dense_batch=32, num_pages=10, max_num_seqs=1,
                     tensor_parallel=2, enable_prefix_caching=caching, host_kv_cache_gb=host_gb, host_kv_copy=copy)
  rng = np.random.default_rng(1)
  prompts = [[int(t) for t in rng.integers(1, 250, 70)] for _ in range(3)]
  tokens, cached = [], []
  for j, i in enumerate([0, 1, 2, 0, 1, 2]):
    eng.add_request(f"r{j}", prompts[i], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    eng.run_until_done()
    o = eng.pop_output(f"r{j}")
    tokens.append(o.outputs[0].token_ids)
    cached.append(o.num_cached_tokens)
  eng.pool.check()
  host = eng.pool.host
  shards = sorted({len(a.sharding.device_set) for a in host.host_arrays()}) if host else []
  kinds = sorted({a.sharding.memory_kind for a in host.host_arrays()}) if host else []
  return {"tokens": tokens, "cached": cached, "kv_devices": len(eng.executor.kv[0].sharding.device_set),
          "host_loaded": host.loaded if host else 0, "host_hit_tokens": eng.pool.host_hit_tokens,
          "host_page_devices": shards, "host_kinds": kinds}


print(json.dumps({"ref": run(False, 0.0), **{f"host-{c}": run(True, 0.01, c) for c in ("thread", "put", "jit")}}))
