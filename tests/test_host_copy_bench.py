"""lab/host_copy_bench.py's fill probe on the CPU: the tier's warm-up fill timed twice, each the tier's size."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_fill_probe_fills_the_tiers_size_twice():
  r = subprocess.run([sys.executable, os.path.join(ROOT, "lab", "host_copy_bench.py"), "--pages=64", "--layers=2",
                      "--kv_heads=2", "--head_dim=16", "--block_pages=", "--put_probe=false", "--fill_probe_gb=0.01",
                      "--host_pool_gb=0"], capture_output=True, text=True, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-3000:]
  fills = re.findall(r"Host pool fill, (first|second): ([0-9.]+) GB in ([0-9.]+) s", r.stdout)
  assert [f[0] for f in fills] == ["first", "second"]
  page_bytes = 2 * 2 * 2 * 16 * 16   # K and V, layers x heads x page size x head dim, e4m3
  pages = int(0.01e9) // page_bytes // 16 * 16   # whole blocks of 16 pages
  assert all(abs(float(gb) - pages * page_bytes / 1e9) < 0.0005 for _, gb, _ in fills)
  assert "Process peak RSS before the fill" in r.stdout
