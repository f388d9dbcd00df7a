"""One process of a 2-process CPU job running the engine over both hosts' devices (test_distributed.py):
greedy and sampled (unseeded) generation, the tokens printed as JSON."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoflow_jax import distributed  # noqa: E402

distributed.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
import jax  # noqa: E402

from nanoflow_jax import LLM, SamplingParams  # noqa: E402

PROMPTS = ["hello world", "the quick brown fox", "a"]
# ~70 tokens each (the tiny tokenizer is byte-level): 5 pages of 16
HOST_TIER_PROMPTS = [f"{w} " * 23 for w in ("ab", "cd", "ef")]
out = {"process": jax.process_index(), "devices": jax.device_count()}
for mode in sys.argv[4].split(","):   # each mode in the same job: one start-up for all of them
  llm = LLM("tiny", random_weights=True, dense_batch=64, num_pages=256, max_num_seqs=8, mode=mode,
            tensor_parallel=jax.device_count())
  greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
  sampled = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True))
  long = ["a system prompt that every round shares, " * 2] * 2   # the second round hits the prefix cache
  rounds = [llm.generate(long[:1], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0] for _ in long]
  out[mode] = {"next_seed": llm.engine._rng.getrandbits(32), "greedy": [o.outputs[0].token_ids for o in greedy],
               "sampled": [o.outputs[0].token_ids for o in sampled],
               "rounds": [r.outputs[0].token_ids for r in rounds], "cached": [r.num_cached_tokens for r in rounds]}
  llm.engine.shutdown()
# The host KV tier across both hosts: three prompts taking turns on a 10-page pool evict each other's cached
# pages to host memory (each process keeps its devices' shards) and get them back.
llm = LLM("tiny", random_weights=True, dense_batch=32, num_pages=10, max_num_seqs=1,
          tensor_parallel=jax.device_count(), host_kv_cache_gb=0.01)
turns = [o.outputs[0] for o in (llm.generate([HOST_TIER_PROMPTS[i]], SamplingParams(max_tokens=4, temperature=0.0,
                                                                                      ignore_eos=True))[0]
                                for i in (0, 1, 2, 0, 1, 2))]
out["host_tier"] = {"prompts": HOST_TIER_PROMPTS, "tokens": [t.token_ids for t in turns],
                    "host_loaded": llm.engine.pool.host.loaded,
                    "host_hit_tokens": llm.engine.pool.host_hit_tokens}
llm.engine.shutdown()
print(json.dumps(out))
