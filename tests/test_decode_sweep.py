"""launch/decode_sweep.py on the CPU with the tiny model: each batch is timed with exactly that many
sequences decoding, even when their prefill takes many steps (the first ones decode meanwhile)."""
import pytest

from launch import decode_sweep
from nanoflow_jax.llm import build_engine


@pytest.fixture(scope="module", params=[False, True], ids=["inline-dispatch", "overlap-dispatch"])
def engine(request):
  # dense_batch 32: 8 prompts of 59 tokens prefill over ~15 steps, so the first sequence decodes ~14 tokens
  # before the last has its first (more than steps + warmup: the sweep once let such sequences finish)
  return build_engine("tiny", random_weights=True, dense_batch=32, num_pages=256, max_num_seqs=16,
                      max_model_len=128, overlap_dispatch=request.param)


def test_sweep_times_every_batch_at_full_size(engine):
  res = decode_sweep.sweep(engine, [1, 8], context=60, steps=4)
  assert [r["batch"] for r in res["rows"]] == [1, 8]
  for r in res["rows"]:
    assert r["step_ms"] > 0 and r["floor_ms"] > 0
    # the loop's parts per step: the host's own (schedule, build, dispatch, process) and its wait for the device
    assert set(r["host_ms"]) == set(decode_sweep.HOST_PARTS) and r["host_ms"]["dispatch"] > 0
    # the engine thread's parts add up to at most the step (a dispatch on its own thread runs beside them)
    own = decode_sweep.engine_thread_parts(engine.config.overlap_dispatch)
    assert sum(r["host_ms"][p] for p in own) <= 1.05 * r["step_ms"]
    assert r["host_ms"]["dispatch"] <= 1.05 * r["step_ms"]
  assert "dispatch" in decode_sweep.table(res, "t")
  assert res["overlap_dispatch"] == engine.config.overlap_dispatch
  assert not engine.has_work()   # the sweep's sequences are gone


def test_too_little_room_to_decode_is_an_error(engine):
  with pytest.raises(ValueError, match="no room"):
    decode_sweep.time_decode(engine, 1, context=120, steps=4)


def test_a_batch_the_pool_cannot_hold_is_refused_not_timed_smaller(engine):
  # more sequences than max_num_seqs (16) never all decode at once
  with pytest.raises(RuntimeError, match="decoding at the end"):
    decode_sweep.time_decode(engine, 20, context=60, steps=4)
  assert not engine.has_work()


def test_fitting_batch_is_what_the_pool_holds(engine):
  """256 pages of 16 tokens: a sequence at context 60 decoding 4 steps (+ the prefill phase and margin) needs 5
  pages, so 16 slots' worth fit; at context 120 (8-9 pages each) fewer, and that many do decode at once."""
  assert decode_sweep.fitting_batch(engine, 64, context=60, steps=4) == 16        # the slots
  small = build_engine("tiny", random_weights=True, dense_batch=32, num_pages=40, max_num_seqs=16,
                       max_model_len=256)
  n = decode_sweep.fitting_batch(small, 16, context=100, steps=4)
  assert 3 <= n < 16
  assert decode_sweep.time_decode(small, n, context=100, steps=4) > 0           # checked: all n decoding
  with pytest.raises(RuntimeError, match="decoding at the end"):
    decode_sweep.time_decode(small, n + 2, context=100, steps=4)


def test_fitting_batch_decodes_all_at_once_on_a_pool_it_fills():
  """256 pages, sequences of 121 tokens (8 pages each): 32 would fill the pool exactly, but admission projects a
  partial page more per sequence, so the fitting batch is what it admits at once, and all of it decodes."""
  eng = build_engine("tiny", random_weights=True, dense_batch=256, num_pages=256, max_num_seqs=64,
                     max_model_len=1024)
  n = decode_sweep.fitting_batch(eng, 64, context=64, steps=40)
  assert 24 <= n < 32
  assert decode_sweep.time_decode(eng, n, context=64, steps=40) > 0   # checked: all n decoding at the end


def test_ttft_of_a_short_prompt_on_the_idle_engine(engine):
  """From add_request to the first token's delta: the prefill step, and the step that reads its token back (the
  loop runs one step ahead), then nothing left behind."""
  t = decode_sweep.time_first_token(engine, 20, repeats=3)
  assert t["prompt_tokens"] == 20 and t["ttft_ms"] > 0
  assert 1 <= t["steps"] <= 3 and set(t["host_ms_per_step"]) == set(decode_sweep.HOST_PARTS)
  assert not engine.has_work()
  res = decode_sweep.sweep(engine, [1], context=60, steps=2, ttft_prompts=(20,))
  assert [x["prompt_tokens"] for x in res["ttft"]] == [20]
  assert "TTFT of one 20-token prompt on the idle engine" in decode_sweep.table(res, "t")
