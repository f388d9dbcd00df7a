"""lab/sm_bandwidth.py's read kernel in Triton's interpreter: every program sums exactly its slice of
rows, in order or through the page table (a wrong row or a missed tile changes the sums)."""
import numpy as np
import pytest

pytest.importorskip("triton")
from lab import sm_bandwidth as smb  # noqa: E402


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("programs", [1, 3])
def test_read_sums_match_numpy(paged, programs):
  rng = np.random.default_rng()
  rows = 8 * 64 + 16            # a remainder no program reads
  src = rng.normal(size=(rows, smb.WIDTH)).astype(np.float32)
  table = rng.permutation(rows // smb.PAGE_ROWS).astype(np.int32)
  got = smb.read_sums(src, table, programs, block_rows=32, paged=paged, stages=2)
  ref = smb.reference_sums(src, table, programs, block_rows=32, paged=paged)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
  if paged:   # the table is used: in order gives other sums
    assert not np.allclose(ref, smb.reference_sums(src, table, programs, block_rows=32, paged=False))


def test_too_many_programs_is_an_error():
  with pytest.raises(ValueError, match="cannot give"):
    smb._meta(64, 4, 32, False, 2)
