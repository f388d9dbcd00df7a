"""Run in a fresh process with 4 CPU devices (see test_tensor_parallel.py): greedy tokens for TP 1, 2, 4
in both modes, printed as JSON on the last line."""
import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import engine_fixtures as fx  # noqa: E402
import hf_models  # noqa: E402
from checkpoints.convert import convert  # noqa: E402
from nanoflow_jax.llm import build_engine  # noqa: E402
from nanoflow_jax.runtime.plan import generic_default  # noqa: E402
from nanoflow_jax.sampling_params import SamplingParams  # noqa: E402


def main(arch):
  root = tempfile.mkdtemp()
  hf_models.make_hf_model(arch, os.path.join(root, "hf"))
  convert(os.path.join(root, "hf"), os.path.join(root, "ckpt"), dtype="float32", progress=False)
  prompts = fx.random_prompts(np.random.default_rng(0), [5, 23, 11])
  out = {}
  runs = [(tp, mode, "auto", (), 1) for tp in (1, 2, 4) for mode in ("sequential", "nanoflow")]
  if arch == "llama2":   # our attention kernel (interpret mode) inside the per-device layer
    runs.append((2, "sequential", "interpret", (), 1))
    # the all-gather form of o (plan.AG_OPS) for one nano-batch and for both; two layers per scan step
    runs += [(2, "nanoflow", "auto", (1,), 1), (4, "nanoflow", "auto", (0, 1), 1), (4, "nanoflow", "auto", (), 2)]
  for tp, mode, kernels, allgather, unroll in runs:
    plan_path = None
    if allgather:
      plan_path = os.path.join(root, f"plan-tp{tp}.json")
      with open(plan_path, "w") as f:
        f.write(generic_default(32, 132, tp=tp, allgather=allgather).to_json())
    eng = build_engine(os.path.join(root, "ckpt"), dtype="float32", dense_batch=32, num_pages=64, max_num_seqs=4,
                       mode=mode, tensor_parallel=tp, kernels=kernels, pipeline_config=plan_path,
                       layer_unroll=unroll)
    qkv = eng.executor.params["layers"]["qkv"]
    for i, p in enumerate(prompts):
      eng.add_request(f"r{i}", p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    eng.run_until_done()
    key = (f"{tp}-{mode}" + ("" if kernels == "auto" else f"-{kernels}")
           + ("-ag" + "".join(map(str, allgather)) if allgather else "") + (f"-u{unroll}" if unroll > 1 else ""))
    out[key] = {"tokens": [eng.pop_output(f"r{i}").outputs[0].token_ids for i in range(len(prompts))],
                "devices": len(qkv.sharding.device_set),
                "kv_devices": len(eng.executor.kv[0].sharding.device_set),
                "manual": eng.executor.manual_tp, "allgather_o": eng.executor.allgather_o}
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1])
