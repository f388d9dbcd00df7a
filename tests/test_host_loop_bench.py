"""lab/host_loop_bench.py: the engine loop on a stub executor, offline and through the server."""
import pytest

from lab import host_loop_bench as hlb

LOAD = hlb.Load(tokens=6, prompt=20)


@pytest.mark.parametrize("overlap", [False, True])
def test_offline_runs_every_token_and_reports_the_loops_parts(overlap):
  r = hlb.run_offline(8, overlap, 0.002, LOAD)
  assert r["tokens"] == 8 * 5   # (timed from every sequence's first token: 5 more each)
  assert r["tokens_per_s"] > 0 and r["ms_per_step"] >= 2.0   # (every step's dispatch sleeps 2 ms)
  assert set(hlb.PARTS) <= set(r) and r["dispatch"] >= 2.0
  text = hlb.table([{"seqs": 8, "dispatch_ms": 2.0, "overlap": overlap, **r}], LOAD, server=False)
  assert "| 8 | 2 |" in text and "offline" in text


def test_through_the_server_every_streamed_token_is_counted():
  r = hlb.run_server(4, True, 0.001, LOAD)
  assert r["tokens"] == 4 * 6 and r["tokens_per_s"] > 0 and r["dispatch"] >= 1.0


@pytest.mark.parametrize("overlap", [False, True])
def test_a_simulated_device_sets_the_period_where_it_is_the_longest(overlap):
  r = hlb.run_offline(4, overlap, 0.001, LOAD, device_s=0.02)
  assert r["tokens"] == 4 * 5 and r["ms_per_step"] >= 20.0 and r["wait"] > 0
