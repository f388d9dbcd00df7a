"""lab/plot_workloads.py: benchmark JSONs (as --json_out writes them) to one plot by workload and mode."""
import json

import pytest

from lab import plot_workloads


def _run(path, workload, values):
  results = {mode: {"environment": {"workload": workload, "model": "tiny", "device": "cpu", "mode": mode},
                    "offline": {"total_tokens_per_s": tok, "percent_of_optimal": pct}}
             for mode, (tok, pct) in values.items()}
  path.write_text(json.dumps({"results": results}))
  return str(path)


def test_rows_by_workload_and_mode_and_a_png(tmp_path):
  a = _run(tmp_path / "a.json", "1024-512", {"nanoflow": (25375.0, 44.1), "sequential": (25363.0, 44.1)})
  b = _run(tmp_path / "b.json", "splitwise", {"sequential": (25749.0, 47.1)})
  rows = plot_workloads.load_runs([a, b])
  assert [(r["workload"], r["mode"], r["tokens_per_s"]) for r in rows] == [
      ("1024-512", "nanoflow", 25375.0), ("1024-512", "sequential", 25363.0), ("splitwise", "sequential", 25749.0)]
  out = tmp_path / "img" / "by_workload.png"
  plot_workloads.plot(rows, str(out))
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refuses_files_that_are_not_offline_benchmark_results(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"total_tokens_per_s": 1.0}))
  with pytest.raises(ValueError, match="no 'results' by mode"):
    plot_workloads.load_runs([str(bad)])
  online = tmp_path / "online.json"
  online.write_text(json.dumps({"results": {"sequential": {"online": {}}}}))
  with pytest.raises(ValueError, match="no offline results"):
    plot_workloads.load_runs([str(online)])
