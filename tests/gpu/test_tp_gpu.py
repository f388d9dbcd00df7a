"""Tensor parallelism with our kernels on several GPUs (skipped with fewer than two): the per-device
layer (shard_map) with the Mosaic GEMM and the Triton or Pallas attention kernel against one GPU.

  NANOFLOW_GPU_TESTS=1 PYTHONPATH=.:.carry python3 -m pytest -q -s tests/gpu/test_tp_gpu.py   # on nvidia-h200-x2 or x4
"""
import jax
import numpy as np
import pytest

from nanoflow_jax.llm import build_engine
from nanoflow_jax.sampling_params import MAX_LOGPROBS, SamplingParams

from agreement import max_first_logprob_diff, real_disagreements

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu" or jax.device_count() < 2, reason="needs 2 GPUs")]


def test_tp_kernels_agree_with_one_gpu(tmp_path):
  """TP 2 (and 4 where there are 4 GPUs) in sequential mode, and the top degree in nanoflow mode (all-reduces
  as separate nano-ops; then both nano-batches in o's all-gather form), against one GPU."""
  from nanoflow_jax.runtime.plan import generic_default
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 128000, size=int(n)).tolist() for n in rng.integers(50, 500, size=16)]
  degrees = [tp for tp in (2, 4) if tp <= jax.device_count()]
  runs = ([(1, "sequential")] + [(tp, "sequential") for tp in degrees] + [(degrees[-1], "nanoflow"),
                                                                            (degrees[-1], "nanoflow-ag")])
  ag_plan = tmp_path / "ag.json"
  ag_plan.write_text(generic_default(1024, 132, tp=degrees[-1], allgather=(0, 1)).to_json())
  firsts = {}
  for tp, mode in runs:
    eng = build_engine("llama-3-8b", random_weights=True, dense_batch=1024, num_pages=4096, max_num_seqs=32,
                       tensor_parallel=tp, mode=mode.removesuffix("-ag"),
                       pipeline_config=str(ag_plan) if mode.endswith("-ag") else None)
    assert eng.executor.allgather_o == mode.endswith("-ag")
    assert eng.executor.manual_tp == (tp > 1) and eng.executor.kernels in ("triton", "pallas")
    for i, p in enumerate(prompts):
      eng.add_request(f"r{i}", p, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=MAX_LOGPROBS))
    eng.run_until_done()
    firsts[tp, mode] = [eng.pop_output(f"r{i}").outputs[0] for i in range(len(prompts))]
    del eng
  one = firsts[1, "sequential"]
  for (tp, mode), outs in list(firsts.items())[1:]:
    same = sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(one, outs))
    lp = max_first_logprob_diff(one, outs)
    bad = real_disagreements(one, outs)
    print(f"TP {tp} {mode} vs 1: {same}/{len(prompts)} first tokens equal; not near ties: {bad}; "
          f"max logprob diff {lp:.3f}")
    assert bad == 0 and lp < 0.25, (tp, mode)
