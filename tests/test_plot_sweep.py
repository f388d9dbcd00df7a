"""lab/plot_sweep.py: kernel_bench's markdown tables read back (variants, ceilings, sections, merged calls) and
drawn."""
import os

from lab import plot_sweep

TABLE = """## context 1024
| kernel | SMs | achieved | ratio to ceiling |
|---|---|---|---|
| copy (read+write) | - | 3.31 TB/s | 1.00 |
| read only (sum) | - | 4.46 TB/s | 1.35 |
| XLA GEMM 8192^3 | - | 826 TFLOP/s | 1.00 |
| decode triton block_q=1 block_n=64 num_warps=1 num_stages=2 programs_per_sm=16 dot_f16=True (rel. error 1.1e-03) | 132 | 3.63 TB/s | 1.10 |
| decode triton block_q=1 block_n=128 num_warps=4 num_stages=3 programs_per_sm=2 dot_f16=True (rel. error 1.1e-03) | 132 | 2.69 TB/s | 0.81 |

## context 2048
| decode triton block_q=1 block_n=64 num_warps=1 num_stages=2 programs_per_sm=16 dot_f16=True | 132 | 3.77 TB/s | 1.14 |
"""


def test_read_table_by_section(tmp_path):
  variants, ceilings = plot_sweep.read_table(TABLE, "context 1024")
  assert variants == [("block_n=64 num_warps=1 num_stages=2 programs_per_sm=16", 3.63),
                      ("block_n=128 num_warps=4 num_stages=3 programs_per_sm=2", 2.69)]
  assert ceilings == {"copy": 3.31, "read only": 4.46}
  assert plot_sweep.read_table(TABLE, "context 2048")[0] == [("block_n=64 num_warps=1 num_stages=2 programs_per_sm=16",
                                                             3.77)]


def test_tables_merge_and_draw(tmp_path):
  a = tmp_path / "a.md"
  a.write_text(TABLE)
  b = tmp_path / "b.md"
  b.write_text("| copy (read+write) | - | 3.29 TB/s | 1.00 |\n"
               "| decode triton block_n=64 num_warps=2 programs_per_sm=8 | 132 | 2.90 TB/s | 0.88 |\n"
               "| decode triton block_n=128 num_warps=4 num_stages=3 programs_per_sm=2 | 132 | 2.67 TB/s | 0.81 |\n")
  variants, ceilings = plot_sweep.read_tables([f"{a}#context 1024", str(b)])
  assert dict(variants)["block_n=128 num_warps=4 num_stages=3 programs_per_sm=2"] == 2.69   # the first figure
  assert len(variants) == 3 and ceilings["copy"] == 3.29                                      # the lowest ceiling
  out = tmp_path / "sweep.png"
  plot_sweep.plot(variants, ceilings, str(out), "t", {"block_n=64 num_warps=2 programs_per_sm=8": "marked"})
  assert os.path.getsize(out) > 1000
