import gzip
import json

from launch import trace_overlap


def test_overlap_of_two_streams(tmp_path):
  ev = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "Stream #1(Compute)"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "Stream #2(Compute)"}},
        {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 100}, {"ph": "X", "pid": 1, "tid": 1, "ts": 50, "dur": 100},
        {"ph": "X", "pid": 1, "tid": 2, "ts": 120, "dur": 100}, {"ph": "X", "pid": 1, "tid": 3, "ts": 0, "dur": 999}]
  path = tmp_path / "t.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": ev}, f)
  by = trace_overlap.stream_intervals(str(path))
  assert trace_overlap.busy(by["Stream #1(Compute)"]) == 150
  assert trace_overlap.overlap_time(by) == 30


def test_time_by_kernel_kind(tmp_path):
  ev = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "Stream #1(Compute)"}},
        {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 10, "name": "gemm_3"},
        {"ph": "X", "pid": 1, "tid": 1, "ts": 10, "dur": 30, "name": "gemm.12"},
        {"ph": "X", "pid": 1, "tid": 1, "ts": 40, "dur": 5, "name": "loop_fusion_2"},
        {"ph": "X", "pid": 1, "tid": 9, "ts": 0, "dur": 99, "name": "host_thing"}]   # not a stream: ignored
  path = tmp_path / "t.json"
  path.write_text(json.dumps(ev))
  assert trace_overlap.time_by_kind(str(path)) == {"gemm": (2, 40.0), "loop_fusion": (1, 5.0)}


def test_timeline_png(tmp_path):
  ev = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": t, "args": {"name": f"Stream #{t}(Compute)"}}
        for t in (1, 2)]
  ev += [{"ph": "X", "pid": 1, "tid": 1 + i % 2, "ts": 100 * i, "dur": 80, "name": n}
         for i, n in enumerate(["gemm_1", "_paged_attention_kernel", "MemcpyD2D", "loop_fusion"] * 5)]
  path = tmp_path / "t.json"
  path.write_text(json.dumps(ev))
  assert trace_overlap.category("anonymous_mosaic_gpu_kernel")[0] == "GEMM"
  assert trace_overlap.category("_paged_attention_kernel")[0] == "attention"
  trace_overlap.timeline_png(str(path), str(tmp_path / "t.png"), window_ms=1.0)
  assert (tmp_path / "t.png").stat().st_size > 5000


def test_per_device_idle_and_host_events(tmp_path, capsys):
  """Two GPUs (trace processes): each one's idle time; host threads' events by name."""
  ev = [{"ph": "M", "name": "process_name", "pid": p, "args": {"name": f"/device:GPU:{p}"}} for p in (1, 2)]
  ev += [{"ph": "M", "name": "thread_name", "pid": p, "tid": 1, "args": {"name": "Stream #1(Compute)"}} for p in (1, 2)]
  ev += [{"ph": "M", "name": "thread_name", "pid": 3, "tid": 7, "args": {"name": "python"}}]
  ev += [{"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 100, "name": "gemm_1"},
         {"ph": "X", "pid": 1, "tid": 1, "ts": 150, "dur": 50, "name": "gemm_1"},
         {"ph": "X", "pid": 2, "tid": 1, "ts": 0, "dur": 200, "name": "gemm_1"},
         {"ph": "X", "pid": 3, "tid": 7, "ts": 0, "dur": 40, "name": "WaitForEvent"},
         {"ph": "X", "pid": 3, "tid": 7, "ts": 50, "dur": 30, "name": "WaitForEvent"}]
  path = tmp_path / "t.json"
  path.write_text(json.dumps(ev))
  assert trace_overlap.device_idle(str(path)) == {"/device:GPU:1": (150.0, 200.0), "/device:GPU:2": (200.0, 200.0)}
  assert trace_overlap.host_time_by_name(str(path)) == {"WaitForEvent": (2, 70.0)}
  trace_overlap.main(str(path))
  out = capsys.readouterr().out
  assert "/device:GPU:1: kernels 0.15 ms of 0.20 ms per step (idle 0.05 ms)" in out and "| WaitForEvent | 2.0 |" in out


def test_kernel_sequence_names_the_nano_ops(tmp_path):
  """Kernels listed in start order from the middle of the trace, each with the executor's nano-op found in
  its op name (the named scope nano_<op>_<nano-batch>)."""
  ev = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": t, "args": {"name": f"Stream #{t}(Compute)"}}
        for t in (1, 2)]
  ev += [{"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 1000, "name": "early"},
         {"ph": "X", "pid": 1, "tid": 2, "ts": 1500, "dur": 400, "name": "_paged_attention_kernel",
          "args": {"tf_op": "jit(step)/while/body/nano_attention_0/pallas_call"}},
         {"ph": "X", "pid": 1, "tid": 1, "ts": 1200, "dur": 300, "name": "body_mosaic_gpu_kernel",
          "args": {"tf_op": "jit(step)/while/body/nano_gate_up_1/custom_call", "kernel_details": "regs:90 grid:66,1,1"}},
         {"ph": "X", "pid": 1, "tid": 1, "ts": 1600, "dur": 2, "name": "tiny"},
         {"ph": "X", "pid": 1, "tid": 1, "ts": 2000, "dur": 100, "name": "loop_fusion"}]
  path = tmp_path / "t.json"
  path.write_text(json.dumps(ev))
  rows = trace_overlap.kernel_sequence(str(path), window_ms=1.0, min_us=5)
  assert rows[2:] == ["| 0.150 | 0.300 | Stream #1 | gate_up@1 | body_mosaic_gpu_kernel | 66,1,1 |",
                      "| 0.450 | 0.400 | Stream #2 | attention@0 | _paged_attention_kernel |  |",
                      "| 0.950 | 0.100 | Stream #1 |  | loop_fusion |  |"]
