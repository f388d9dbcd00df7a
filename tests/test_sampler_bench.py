"""lab/sampler_bench.py on the CPU: every mode of the sampler timed for each row count, in one table."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_mode_is_timed_for_each_row_count(tmp_path):
  out = tmp_path / "sampler.md"
  r = subprocess.run([sys.executable, os.path.join(ROOT, "lab", "sampler_bench.py"), "--rows=1,4", "--vocab=300", "--search_bits=2",
                      f"--out={out}"], capture_output=True, text=True, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-3000:]
  assert "| top_p 2b ms |" in out.read_text()
  rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ") and "ms" not in line]
  assert [int(row[0]) for row in rows] == [1, 4]
  for row in rows:
    times = [float(x) for x in row[1:9]]    # greedy, sample, top_p, top_k, top_p sort, logprobs, penalties, top_p 2b
    assert all(t > 0 for t in times), row
    assert row[-1].strip().endswith("x")
