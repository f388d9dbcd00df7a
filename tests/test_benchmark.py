"""launch/benchmark.py end to end on the CPU with the tiny model (offline, compare, online, outputs)."""
import json
import os
import subprocess
import sys

import pytest

from launch import workloads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"total_tokens_per_s", "output_tokens_per_s", "requests_per_s", "percent_of_optimal", "gemm_peak_tflops",
        "total_input_tokens", "total_output_tokens", "num_requests"}


def _run(tmp_path, *flags, env=None):
  out = tmp_path / "b.json"
  png = tmp_path / "b.png"
  cmd = [sys.executable, os.path.join(ROOT, "launch", "benchmark.py"), "--model=tiny", "--random_weights",
         "--dense_batch=128", "--num_pages=1024", "--max_num_seqs=32", f"--json_out={out}", f"--plot_out={png}",
         *flags]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.path.getsize(png) > 1000
  with open(out) as f:
    return json.load(f), r.stdout


def test_offline_compare_on_cpu(tmp_path):
  res, stdout = _run(tmp_path, "--workload=512-512", "--num_requests=4", "--max_model_len=1024",
                     "--mode=nanoflow", "--compare=sequential", f"--trace_dir={tmp_path / 'trace'}",
                     "--trace_steps=1:3")
  assert KEYS <= set(res)
  assert res["num_requests"] == 4 and res["total_input_tokens"] == 4 * 512 and res["total_output_tokens"] == 4 * 512
  assert res["total_tokens_per_s"] > 0 and 0 < res["percent_of_optimal"]
  # the same throughput against the peak on random data: the two percents scale by the two peaks
  assert res["gemm_peak_random_tflops"] > 0
  assert res["percent_of_optimal_random_peak"] == pytest.approx(
      res["percent_of_optimal"] * res["gemm_peak_tflops"] / res["gemm_peak_random_tflops"])
  assert "against the random-data peak" in stdout
  assert set(res["results"]) == {"nanoflow", "sequential"}
  # the warm-up compiled every bucket: nothing compiled inside a timed run (with prefix caching on, warm-up
  # prompts that began alike once left the largest bucket to compile in the run)
  assert all(r["offline"]["compiled_in_run_seconds"] == {} for r in res["results"].values())
  assert "| kernel kind |" in stdout   # the traced steps are summarized
  assert "throughput:" in stdout and res["results"]["sequential"]["environment"]["git_commit"]
  # Every step is recorded: one row per step, and their tokens are all the tokens the model ran.
  seq = res["results"]["sequential"]["offline"]
  assert len(seq["step_records"]) == seq["steps"]
  assert sum(r[1] for r in seq["step_records"]) == 4 * (512 + 511)  # the last output is never fed back
  # step gaps: one fewer than the steps, less the traced ones and their neighbours (--trace_steps=1:3)
  assert seq["step_summary"]["steps_timed"] == seq["steps"] - 1 - len(range(0, 4))
  assert os.path.getsize(tmp_path / "b_steps_sequential.png") > 1000


def test_offline_compare_overlap_runs_the_mode_both_ways_on_one_model(tmp_path):
  res, stdout = _run(tmp_path, "--workload=512-512", "--num_requests=2", "--max_model_len=1024", "--compare=overlap")
  assert set(res["results"]) == {"sequential", "sequential+overlap"}
  opts = {k: r["environment"]["engine_options"]["overlap_dispatch"] for k, r in res["results"].items()}
  assert opts == {"sequential": False, "sequential+overlap": True}
  assert all(r["offline"]["total_output_tokens"] == 2 * 512 for r in res["results"].values())
  assert "sequential / sequential+overlap throughput:" in stdout
  assert stdout.count("(dispatch on a thread of its own") == 1


def test_the_decode_sweep_both_ways_on_one_model(tmp_path):
  res, stdout = _run(tmp_path, "--decode_sweep=1,2", "--decode_context=32", "--max_model_len=256", "--compare=overlap",
                     "--plain_baseline")
  sweeps = res["decode_sweeps"]
  assert [s["overlap_dispatch"] for s in sweeps.values()] == [False, True]
  assert all([r["batch"] for r in s["rows"]] == [1, 2] for s in sweeps.values())
  assert res["decode_sweep"] == next(iter(sweeps.values()))
  assert "inline dispatch" in stdout and "dispatch thread" in stdout
  # the plain JAX step at the same batch sizes, after the engines, beside each sweep's rows
  assert all(r["plain_ms"] > 0 and r["ratio_to_plain"] == r["step_ms"] / r["plain_ms"]
             for s in sweeps.values() for r in s["rows"])
  assert stdout.count("| plain JAX ms | step / plain |") == 2
  # the TTFT of the default prompts: 128 tokens timed, 1024 past max_model_len 256 and said so
  assert all([t["prompt_tokens"] for t in s["ttft"]] == [128] for s in sweeps.values())
  assert "TTFT of a 1024-token prompt: skipped (max_model_len 256)" in stdout


def test_decode_variants_sweep_on_the_same_model(tmp_path):
  """--decode_variants: each NAME:changes engine swept after the flags' one, its options as changed."""
  res, stdout = _run(tmp_path, "--decode_sweep=1", "--decode_context=32", "--max_model_len=256", "--ttft_prompts=",
                     "--decode_variants=graph:split_decode_keys=true,small_step_attention=16",
                     "--decode_variants=pages:num_pages=512,split_decode_keys=false")
  sweeps = list(res["decode_sweeps"].items())
  assert len(sweeps) == 3 and sweeps[1][0].startswith("graph (split_decode_keys=True, small_step_attention=16): ")
  options = [s["environment"]["engine_options"] for _, s in sweeps]
  assert [(o["split_decode_keys"], o["small_step_attention"], o["num_pages"]) for o in options] == [
      (True, 0, 1024), (True, 16, 1024), (False, 0, 512)]
  assert all(s["rows"][0]["step_ms"] > 0 for _, s in sweeps)


@pytest.mark.parametrize("variant, says", [
    ("graph", "takes NAME:key=value"), ("g:nonsense=1", "'nonsense=1' is not key=value with an engine option"),
    ("g:split_decode_keys=maybe", "split_decode_keys takes true or false"),
    ("g:small_step_attention=x", "small_step_attention takes an integer")])
def test_a_bad_decode_variant_is_refused_by_name_before_the_load(tmp_path, variant, says):
  cmd = [sys.executable, os.path.join(ROOT, "launch", "benchmark.py"), "--model=tiny", "--random_weights",
         "--decode_sweep=1", f"--decode_variants={variant}"]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert r.returncode != 0 and says in r.stderr, r.stderr[-2000:]
  assert "decode batch" not in r.stdout


FAKE_SMI = """#!{python}
import sys, time
args = sys.argv[1:]
query = next(a for a in args if a.startswith("--query-gpu=")).split("=", 1)[1].split(",")
if "-lms" not in args:   # one reading of GPU 0: the limit, or a probe of the fields
  print(", ".join("700.00" if f == "enforced.power.limit" else "1" for f in query), flush=True)
  sys.exit(0)
while True:   # every GPU's reading each period, led by its index
  for g in (0, 1):
    print(f"{{g}}, 1700, 3201, {{650.0 + 10 * g}}, 60, 0x4", flush=True)
  time.sleep(0.02)
"""


def test_offline_power_sampling_with_a_stand_in_nvidia_smi(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  smi = bin_dir / "nvidia-smi"
  smi.write_text(FAKE_SMI.format(python=sys.executable))
  smi.chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
  res, stdout = _run(tmp_path, "--workload=512-512", "--num_requests=2", "--max_model_len=1024",
                     "--power_sample_ms=20", env=env)
  p = res["power"]
  assert p["limit_w"] == 700.0 and set(p["gpus"]) == {"0", "1"}
  assert p["gpus"]["1"]["idle_mean_power_w"] == 660.0   # the readings before the run, GPU 1's own
  assert "power over the full steps" in stdout
  if p["steady_seconds_sampled"]:   # a run this short on the CPU may have no full steps long enough
    assert p["bound"] == pytest.approx(700 / 660)


def test_online_sweep_and_workload_file(tmp_path):
  csv = tmp_path / "w.csv"
  csv.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nx,30,5\nx,12,9\nx,50,3\nx,7,4\n")
  res, stdout = _run(tmp_path, f"--workload_file={csv}", "--num_requests=3", "--rates=5,50")
  online = res["results"]["sequential"]["online"]
  assert [s["rate"] for s in online["sweep"]] == [5.0, 50.0]
  assert {"p50", "p90", "p99", "mean"} <= set(online["sweep"][0]["normalized_latency_ms"])
  assert "highest rate within" in stdout


def test_online_multiround_in_process(tmp_path):
  res, stdout = _run(tmp_path, "--workload=multiround", "--num_requests=3", "--max_model_len=1024", "--rates=50,60")
  sweep = res["results"]["sequential"]["online"]["sweep"]
  for point in sweep:   # each rate draws its own conversations: the second does not find the first's cached
    assert point["requests"] > 3 and 0 < point["hit_rate"] < 0.95
  assert "prompt tokens cached" in stdout


def test_online_multiround_users_think_between_rounds(tmp_path):
  """--think_time_s: each round after the first waits the user's pause (drawn per conversation and round), so the
  run lasts at least its longest conversation's pauses; outside online multi-round the flag is refused."""
  res, _ = _run(tmp_path, "--workload=multiround", "--num_requests=3", "--max_model_len=1024", "--rates=50",
                "--think_time_s=8")
  point = res["results"]["sequential"]["online"]["sweep"][0]
  assert point["think_time_s"] == 8 and point["requests"] > 3
  assert point["longest_thinking_s"] > 2 and point["wall_seconds"] >= point["longest_thinking_s"]
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "benchmark.py"), "--model=tiny", "--random_weights",
                      "--workload=1024-512", "--num_requests=2", "--think_time_s=1"],
                     capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert r.returncode != 0 and "--think_time_s is the pause between rounds" in r.stderr


def test_workload_lengths():
  split = workloads.lengths("splitwise", 100)
  assert len(split) == 100 and split[0] == (374, 44)
  for name in ("lmsys", "sharegpt"):
    lens = workloads.lengths(name, 4000, seed=1)
    mean_in = sum(i for i, _ in lens) / len(lens)
    (mi, _), _ = workloads.SYNTHETIC[name]
    assert abs(mean_in - mi) / mi < 0.15, (name, mean_in)
  assert workloads.lengths("1024-512", 2, max_model_len=1000) == [(999, 1)] * 2
  with pytest.raises(ValueError, match="unknown workload"):
    workloads.lengths("nope", 1)


def test_online_through_http_against_a_live_server(tmp_path):
  from server_process import ServerProcess
  server = ServerProcess("--dense_batch=128", "--num_pages=1024", "--max_num_seqs=16", "--max_model_len=1024")
  try:
    out = tmp_path / "h.json"
    cmd = [sys.executable, os.path.join(ROOT, "launch", "benchmark.py"), "--model=tiny", f"--url={server.url}",
           "--workload=lmsys", "--num_requests=4", "--max_model_len=256", "--rates=20", f"--json_out={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = json.loads(out.read_text())["results"]["http"]["online"]["sweep"]
    assert sweep[0]["rate"] == 20.0 and sweep[0]["ttft_ms"]["p50"] > 0 and sweep[0]["normalized_latency_ms"]["p99"] > 0
    assert "highest rate within" in r.stdout
    # multi-round conversations through the server: each round's prompt is the history as returned
    # (return_token_ids), so every round after the first finds its history cached; the conversations are sized
    # to the server's max_model_len (/v1/models), below the model's, or their late rounds would be refused
    cmd = cmd[:-5] + ["--workload=multiround", "--num_requests=3", "--rates=50", f"--json_out={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    point = json.loads(out.read_text())["results"]["http"]["online"]["sweep"][0]
    assert point["requests"] > 3 and point["cached_prompt_tokens"] > 0 and 0 < point["hit_rate"] < 1
    assert "prompt tokens cached" in r.stdout
  finally:
    assert server.stop() == 0


def test_the_http_client_sends_a_request_again_when_its_connection_is_reset_before_any_response():
  """A server that resets the first connection after reading its request (as one closing an idle keep-alive
  connection does when a request arrives that moment: session 25's online runs died of it), then answers: the
  client's stream comes through, sent twice; and the client lets idle connections go before our server would."""
  import asyncio
  from launch import http_client
  from nanoflow_jax.server.app import ServerLimits
  assert http_client.CLIENT_KEEPALIVE_S < min(5.0, ServerLimits().header_timeout)   # 5: uvicorn's (vLLM's)
  sse = (b'data: {"choices": [{"text": "a", "logprobs": {"tokens": ["a", "b"]}}]}\n\n'
         b'data: {"choices": [{"text": "c", "logprobs": {"tokens": ["c"]}}]}\n\ndata: [DONE]\n\n')
  requests = []

  async def handle(reader, writer):
    head = await reader.readuntil(b"\r\n\r\n")
    length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
    requests.append(await reader.readexactly(length))
    if len(requests) == 1:
      writer.transport.abort()   # RST, no response
      return
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + sse)
    await writer.drain()
    writer.close()

  async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    session = http_client.new_session()
    try:
      return [k async for k in http_client.stream_completion(session, f"http://127.0.0.1:{port}", [1, 2, 3], 3)]
    finally:
      await session.close()
      server.close()

  assert asyncio.run(main()) == [2, 1]
  assert len(requests) == 2 and requests[0] == requests[1]
