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
