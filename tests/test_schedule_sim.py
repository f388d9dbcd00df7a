"""lab/schedule_sim.py: the real scheduler driven without a model, each step costed by a fit."""
import pytest

from lab.schedule_sim import simulate


def test_every_token_is_scheduled_once_and_costed_by_the_fit():
  requests = [(100, 10), (37, 5), (250, 1), (64, 30)]
  r = simulate(requests, kv_tokens=4096, page_size=16, dense_batch=128, max_num_seqs=8, max_model_len=512,
               fit=(1.0, 0.0, 0.0))
  # prompts, then one decode per output token after the first (which the prompt's last position samples)
  assert r["tokens_per_s"] * r["seconds"] == pytest.approx(sum(i + o - 1 for i, o in requests))
  assert r["seconds"] == pytest.approx(r["steps"] * 1e-3)     # 1 ms per step, nothing else
  assert r["preemptions"] == 0
  # 451 prompt tokens fill 128-token steps: at least 4 steps, and the 30-token output needs 29 more
  assert r["steps"] >= 4 + 29 and r["full_steps"] >= 3


def test_a_smaller_cache_makes_more_smaller_steps():
  requests = [(512, 64)] * 40
  big = simulate(requests, 1 << 20, 16, 2048, 64, 1024, fit=(5.0, 20.0, 10.0))
  small = simulate(requests, 8 * 576, 16, 2048, 64, 1024, fit=(5.0, 20.0, 10.0))
  assert small["steps"] > big["steps"] and small["mean_tokens_per_step"] < big["mean_tokens_per_step"]
  assert small["tokens_per_s"] < big["tokens_per_s"] and small["preemptions"] == 0
