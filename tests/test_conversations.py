"""The multi-round workload (benchmark --workload=multiround): each round arrives when its predecessor has
finished, with the whole history (system prompt, earlier turns and the answers as generated) plus a new turn,
so prefix caching finds the history; lengths are LMSYS-like and fit max_model_len."""
from launch import workloads
from launch.conversations import Conversations
from nanoflow_jax.engine import Engine, EngineConfig
from nanoflow_jax.model import load_model
from nanoflow_jax.sampling_params import SamplingParams


def test_round_lengths_fit_and_vary():
  convs = workloads.multiround(200, seed=1, max_model_len=2048)
  assert all(1 <= len(c) <= workloads.MULTIROUND["max_rounds"] for c in convs)
  assert all(workloads.MULTIROUND["system"] + sum(u + o for u, o in c) <= 2048 for c in convs)
  assert 1.8 < sum(len(c) for c in convs) / len(convs) < 3.2   # mean 2.5 rounds


def test_each_round_carries_the_history_and_hits_the_cache():
  model = load_model("tiny", dtype="float32", random_weights=True)
  eng = Engine(model, EngineConfig(dense_batch=256, num_pages=512, max_num_seqs=8, max_model_len=2048,
                                   compilation_cache_dir=None))
  params = lambda n: SamplingParams(max_tokens=min(n, 8), temperature=0, ignore_eos=True, detokenize=False)
  conv = Conversations(4, 3, model.config.vocab_size, 2048, params)
  conv.start(eng)
  while eng.has_work():
    eng.step()
    conv.advance(eng)
  assert len(conv.outputs) == conv.num_requests
  by_id = {o.request_id: o for o in conv.outputs}
  for c, rounds in enumerate(conv.rounds):
    prev = None
    for k in range(len(rounds)):
      o = by_id[f"c{c}-r{k}"]
      assert o.prompt_token_ids[:len(conv.system)] == conv.system
      if prev is not None:   # the previous prompt, its answer, then this round's user turn
        history = list(prev.prompt_token_ids) + list(prev.outputs[0].token_ids)
        assert list(o.prompt_token_ids) == history + conv.users[c][k]
        assert o.num_cached_tokens >= (len(history) - 1) // 16 * 16 - 16
      prev = o
  assert eng.pool.hit_tokens > 0.5 * eng.pool.queried_tokens
