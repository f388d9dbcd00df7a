"""fp8 weights under tensor parallelism (4 CPU devices): the scales sharded with their weights, TP 2 through the
per-device (shard_map) layer and TP 4 through XLA's partitioner give the single device's greedy tokens; so do TP 2 with the layers unrolled (per-layer arrays, each sharded) and
TP 2 with the activation quantizations fused into their producers (fp8_gemm="xla_fused") and with the small
steps' GEMM ops as one kernel (small_gemm) and with the hybrid layer loop; a repeated prompt hits the prefix cache under TP with the same
tokens."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
from nanoflow_jax.llm import LLM
from nanoflow_jax.sampling_params import SamplingParams
prompts = [[1, 5, 9, 200, 33], [1, 250, 2, 90, 91, 92, 4], list(range(10, 50))]
out = {}
for tp in (1, 2, 4):
  llm = LLM("tiny", dtype="float32", dense_batch=64, num_pages=64, max_num_seqs=4, tensor_parallel=tp,
            quantization="fp8")
  layers = llm.engine.executor.params["layers"]
  res = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
  again = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
  out[tp] = {"tokens": [r.outputs[0].token_ids for r in res],
             "again": [r.outputs[0].token_ids for r in again], "cached": again[2].num_cached_tokens,
             "qkv_scale_spec": str(getattr(layers["qkv_fp8_scale"].sharding, "spec", None)),
             "gate_up_spec": str(getattr(layers["gate_up_fp8"].sharding, "spec", None)),
             "manual": llm.engine.executor.manual_tp}
  llm.engine.shutdown()
# TP 2 with the layers unrolled (the fp8 default on a GPU): each layer's arrays keep their shards
llm = LLM("tiny", dtype="float32", dense_batch=64, num_pages=64, max_num_seqs=4, tensor_parallel=2,
          quantization="fp8", layer_loop="unrolled")
layer0 = llm.engine.executor.params["layers"][0]
res = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
out["2u"] = {"tokens": [r.outputs[0].token_ids for r in res], "manual": llm.engine.executor.manual_tp,
             "gate_up_spec": str(getattr(layer0["gate_up_fp8"].sharding, "spec", None))}
llm.engine.shutdown()
# TP 2 with the activation quantizations fused into their producers (fp8_gemm="xla_fused"; their references on
# the CPU): the norms' quantization is fused under the per-device layer, down's (row-parallel, its amax over
# the devices) is not
llm = LLM("tiny", dtype="float32", dense_batch=64, num_pages=64, max_num_seqs=4, tensor_parallel=2,
          quantization="fp8", fp8_gemm="xla_fused")
res = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
out["2f"] = {"tokens": [r.outputs[0].token_ids for r in res], "manual": llm.engine.executor.manual_tp}
llm.engine.shutdown()
# TP 2 with the small steps' whole GEMM ops as one kernel (small_gemm; its reference on the CPU): qkv and
# gate_up (column-parallel) take it with their norms, o and down (row-parallel) do not
llm = LLM("tiny", dtype="float32", dense_batch=64, num_pages=64, max_num_seqs=4, tensor_parallel=2,
          quantization="fp8", small_gemm=True)
res = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
out["2s"] = {"tokens": [r.outputs[0].token_ids for r in res], "manual": llm.engine.executor.manual_tp}
# TP 2 with the hybrid layer loop: the 40-token prompt's step scans, the others unroll over slices of the stacks
from nanoflow_jax.runtime import executor
executor.UNROLL_BELOW = 32
llm = LLM("tiny", dtype="float32", dense_batch=64, num_pages=64, max_num_seqs=4, tensor_parallel=2,
          quantization="fp8", layer_loop="hybrid")
res = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
ex = llm.engine.executor
out["2h"] = {"tokens": [r.outputs[0].token_ids for r in res], "manual": ex.manual_tp,
             "unrolls": sorted({ex.unrolls(k if isinstance(k, int) else k[0]) for k in ex._compiled})}
llm.engine.shutdown()
print(json.dumps(out))
"""


def test_fp8_under_tp_gives_the_single_device_tokens():
  r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900, cwd=ROOT,
                     env={**os.environ, "PYTHONPATH": ROOT})
  assert r.returncode == 0, r.stderr[-4000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["2"]["tokens"] == out["1"]["tokens"] and out["4"]["tokens"] == out["1"]["tokens"]
  assert out["2"]["manual"] and not out["4"]["manual"]
  assert "tp" in out["2"]["qkv_scale_spec"] and "tp" in out["2"]["gate_up_spec"]   # sharded with the weights
  for tp in ("1", "2", "4"):   # the repeat hits the prefix cache (32 of the 40-token prompt) with the same tokens
    assert out[tp]["again"] == out[tp]["tokens"] and out[tp]["cached"] == 32
  assert out["2u"]["tokens"] == out["1"]["tokens"] and out["2u"]["manual"] and "tp" in out["2u"]["gate_up_spec"]
  assert out["2f"]["tokens"] == out["1"]["tokens"] and out["2f"]["manual"]
  assert out["2s"]["tokens"] == out["1"]["tokens"] and out["2s"]["manual"]
  assert out["2h"]["tokens"] == out["1"]["tokens"] and out["2h"]["manual"] and out["2h"]["unrolls"] == [False, True]
