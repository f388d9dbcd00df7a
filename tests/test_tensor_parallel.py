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
  # the all-gather form of o ran (o's column-split copy in place) and gave the same tokens
  assert {k for k, v in out.items() if v["allgather_o"]} == ({"2-nanoflow-ag1", "4-nanoflow-ag01"}
                                                            if arch == "llama2" else set())
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


COLLECTIVES_SCRIPT = r"""
import json, os, re, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
from nanoflow_jax.llm import build_engine
from nanoflow_jax.sampling_params import SamplingParams
out = {}
def collectives(name, mode, plan_path=None):
  eng = build_engine("tiny", random_weights=True, dense_batch=256, num_pages=256, max_num_seqs=4, tensor_parallel=2,
                     mode=mode, pipeline_config=plan_path)
  eng.add_request("a", list(range(1, 200)), SamplingParams(max_tokens=2, temperature=0))
  eng.run_until_done()
  # collectives in the compiled step: XLA's CPU pipeline may merge several into one tuple all-reduce, so
  # count operands (one per psum or all-gather)
  text = eng.executor._compiled[256].as_text()
  count = lambda op: sum(c.count("%") for c in re.findall(op + r"(?:-start)?\(([^)]*)\)", text))
  ops = {o.op for o in eng.executor.plan.ops} if eng.executor.plan else set()
  o_col = eng.executor.params["layers"].get("o_col")
  out[name] = {"gathers": count("all-gather"), "reduces": count("all-reduce"), "ops": sorted(ops),
               "plan_tp": eng.executor.plan.tp if eng.executor.plan else None,
               "o_col_spec": str(o_col.sharding.spec) if o_col is not None else None}
collectives("sequential", "sequential")
collectives("nanoflow", "nanoflow")
collectives("allgather", "nanoflow", sys.argv[2])
try:
  build_engine("tiny", random_weights=True, dense_batch=256, num_pages=256, max_num_seqs=4, tensor_parallel=2,
               mode="nanoflow", pipeline_config=sys.argv[1])
  out["tp1_plan"] = "no error"
except ValueError as e:
  out["tp1_plan"] = f"refused: {e}"
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def collectives(tmp_path_factory):
  """One subprocess on 2 CPU devices for the tests below: the 256-token step's collectives in sequential
  mode, with the TP-2 generic plan, and with nano-batch 1 in o's all-gather form; and whether a TP-1 plan
  is refused under TP 2."""
  from nanoflow_jax.runtime import plan
  d = tmp_path_factory.mktemp("plans")
  (d / "tp1.json").write_text(plan.generic_default(256, 132).to_json())
  (d / "ag.json").write_text(plan.generic_default(256, 132, tp=2, allgather=(1,)).to_json())
  r = subprocess.run([sys.executable, "-c", COLLECTIVES_SCRIPT, str(d / "tp1.json"), str(d / "ag.json")],
                     capture_output=True, text=True, timeout=600, cwd=os.path.dirname(HERE))
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_nanoflow_under_tp_runs_an_allreduce_per_nano_batch(collectives):
  """The 256-token step of the TP-2 generic plan all-reduces each of its two nano-batches after o and after
  down (4 per layer) where the sequential step all-reduces twice; a TP-1 plan is refused under TP 2."""
  nano = collectives["nanoflow"]
  assert nano["plan_tp"] == 2 and "o_allreduce" in nano["ops"]
  assert collectives["tp1_plan"].startswith("refused:") and "tensor parallelism 1" in collectives["tp1_plan"]
  seq = collectives["sequential"]["reduces"]
  assert seq >= 2 and nano["reduces"] == seq + 2, (seq, nano["reduces"])


def test_allgather_form_gathers_instead_of_reducing_o(collectives):
  """A TP-2 plan with nano-batch 1 in o's all-gather form: per layer two all-gathers (its attention output,
  its o columns) and three all-reduced partial sums (nano-batch 0's o and down, nano-batch 1's down: one
  more than the sequential step's two), with o's stack split by output column beside the usual one."""
  ag, seq = collectives["allgather"], collectives["sequential"]
  assert (ag["gathers"], ag["reduces"] - seq["reduces"]) == (2, 1)
  assert "None, None, None, 'tp'" in ag["o_col_spec"]


def test_kv_pages_count_the_per_gpu_share(monkeypatch):
  """Under TP each GPU holds 1/TP of every page (KV heads split), so as many times more pages fit; with
  KV heads that do not divide the pages are whole on every GPU. (Session 4: the 70B at TP 4 sized its cache
  as if each GPU held whole pages, 279k tokens instead of ~1.1M.)"""
  import types
  from nanoflow_jax import kv_cache
  cfg = config_lib.NAMED_SHAPES["llama-2-70b"]
  free = 100 << 30
  gpu = types.SimpleNamespace(platform="gpu", memory_stats=lambda: {
      "bytes_limit": free + kv_cache.GPU_RESERVE_BYTES, "bytes_in_use": 0})
  monkeypatch.setattr(kv_cache.jax, "devices", lambda: [gpu])
  page = kv_cache.page_bytes(cfg, 16, "bfloat16")
  assert kv_cache.pages_from_memory(cfg, 16, "bfloat16", 1.0) == free // page
  assert kv_cache.pages_from_memory(cfg, 16, "bfloat16", 1.0, kv_shards=4) == free // (page // 4)
  mesh = lambda tp: types.SimpleNamespace(shape={parallel.AXIS: tp})
  assert parallel.kv_shards(cfg, None) == 1 and parallel.kv_shards(cfg, mesh(4)) == 4
  assert parallel.kv_shards(config_lib.NAMED_SHAPES["llama-3-8b"], mesh(16)) == 1   # 8 KV heads, replicated


class _SplitMemory:
  """A GPU allocator's free blocks (best fit, as the BFC allocator places), for the KV sizing tests."""

  def __init__(self, blocks):
    self.free, self.failed = list(blocks), 0

  def stats(self):
    return {"bytes_limit": 1 << 50, "pool_bytes": 1 << 50, "largest_free_block_bytes": max(self.free)}

  def place(self, nbytes):
    fits = [i for i, b in enumerate(self.free) if b >= nbytes]
    if not fits:
      self.failed += 1
      raise MemoryError("an allocation that fails on the GPU (and keeps what it had placed)")
    i = min(fits, key=lambda i: self.free[i])
    self.free[i] -= nbytes
    return _Placed(self, i, nbytes)


class _Placed:
  def __init__(self, mem, block, nbytes):
    self.mem, self.block, self.nbytes = mem, block, nbytes

  def __del__(self):
    self.mem.free[self.block] += self.nbytes


@pytest.mark.parametrize("blocks_k,expect_k", [((29, 67), 33.5), ((200,), 50.0), ((29, 30), 29.0)])
def test_kv_cache_fits_split_free_memory(monkeypatch, blocks_k, expect_k):
  """K and V each need a contiguous block. With the 70B-at-TP-4 layout (a 29-unit hole below the weights,
  67 above) the asked-for 50 units each cannot both be placed: no allocation may fail (a failed one kept
  its half on the GPU), and the cache ends as large as the blocks allow."""
  import types
  from nanoflow_jax import kv_cache
  cfg = config_lib.tiny_config()
  per_page = kv_cache.page_bytes(cfg, 16, "float32") // 2
  unit = 100_000 * per_page   # allocator slack (64 MiB) is small beside a unit
  mem = _SplitMemory([b * unit for b in blocks_k])
  monkeypatch.setattr(kv_cache.jax, "devices", lambda: [types.SimpleNamespace(platform="gpu",
                                                                               memory_stats=mem.stats)])
  monkeypatch.setattr(kv_cache, "allocate_one", lambda cfg_, pages, *a, **k: mem.place(pages * per_page))
  monkeypatch.setattr(kv_cache.jax, "block_until_ready", lambda x: x)
  pages, (k, v) = kv_cache.allocate_kv_fitting(cfg, 5_000_000, 16, "float32")
  assert mem.failed == 0 and k.nbytes == v.nbytes == pages * per_page
  assert abs(pages / 100_000 - expect_k) < 0.2, pages    # the best split, within the slack
  del k, v
  assert sorted(mem.free) == sorted(b * unit for b in blocks_k)
