"""lab/collective_bench.py: variant parsing, the table, and a run over 2 CPU devices (no NCCL there)."""
import os
import subprocess
import sys

import pytest

from lab import collective_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_variant():
  assert collective_bench.parse_variant("default") == {}
  assert collective_bench.parse_variant("NCCL_PROTO=Simple+NCCL_ALGO=Ring") == {"NCCL_PROTO": "Simple",
                                                                                "NCCL_ALGO": "Ring"}
  for bad in ("NCCL_PROTO", "=1", "A=1+B", "NCCL_NVLS_ENABLE=1"):
    with pytest.raises(ValueError):
      collective_bench.parse_variant(bad)


def test_bandwidths_are_nccls():
  # 2048 x 8192 bf16 = 33.5 MB in 0.2 ms: 168 GB/s of algorithm bandwidth, x 2 * 3 / 4 on the bus at TP 4
  alg, bus = collective_bench.bandwidths(0.2, 2048, 8192, 4)
  assert alg == pytest.approx(167.77, rel=1e-3) and bus == pytest.approx(alg * 1.5)
  assert collective_bench.bandwidths(0.0, 2048, 8192, 4) == (0.0, 0.0)


def test_table_compares_each_variant_with_the_first():
  text = collective_bench.table([("default", {"1024": 0.2, "2048": 0.3}), ("NCCL_PROTO=Simple", {"1024": 0.1,
                                 "2048": 0.3}), ("NCCL_ALGO=Tree", "exit 1: boom")], 8192, 4)
  assert "| default | 0.200 (126) | 0.300 (168) |" in text
  assert "| NCCL_PROTO=Simple | 0.100 (252, 2.00x) | 0.300 (168, 1.00x) |" in text
  assert "| NCCL_ALGO=Tree | failed: exit 1: boom |" in text


def test_runs_each_variant_in_its_own_process_on_cpu_devices(tmp_path):
  out = tmp_path / "c.md"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": ROOT}
  r = subprocess.run([sys.executable, os.path.join(ROOT, "lab", "collective_bench.py"), "--hidden=256",
                      "--rows=16,32", "--chain=2,6", "--variants=default,NCCL_PROTO=Simple", f"--out={out}"],
                     capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  text = out.read_text()
  assert "over 2 devices" in text and "| default |" in text and "| NCCL_PROTO=Simple |" in text
  assert "failed" not in text
