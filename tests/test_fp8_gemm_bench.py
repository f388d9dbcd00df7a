"""lab/fp8_gemm.py on the CPU for one decode-sized GEMM: every form is checked against the float32 product
before it is timed, and the small-M table gives weight bytes per second for each (the figures mean nothing here)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_small_m_table_has_every_form(tmp_path):
  out = tmp_path / "t.md"
  r = subprocess.run([sys.executable, "lab/fp8_gemm.py", "--rows=1", "--shapes=o", f"--out={out}"], cwd=ROOT,
                     capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-2000:]
  text = out.read_text()
  assert "| GEMM | M | bf16 TB/s | fp8 engine path TB/s | bare fp8 dot TB/s | W8A16 TB/s |" in text
  row = [line for line in text.splitlines() if line.startswith("| o 4096x4096 | 1 |")]
  assert len(row) == 2   # the TFLOP/s table's row and the small-M table's
  assert float(row[1].split("|")[-2]) < 0.08   # W8A16's error against the float32 product
  # the whole op (here o: the quantization, the GEMM, the scales, the residual) by XLA; the Triton kernel needs
  # jax-triton; the Pallas one ran (interpreted here) and agrees with XLA's op
  fused = next(line for line in text.splitlines() if line.startswith("| o | 1 |"))
  assert "unavailable (jax-triton)" in fused
  assert float(fused.split("|")[-2]) < 1e-2
  fused16 = [line for line in text.splitlines() if line.startswith("| o | 1 |")][1]   # the bf16 whole op's row
  assert "interpreted" in fused16 and float(fused16.split("|")[-2]) < 1e-2
