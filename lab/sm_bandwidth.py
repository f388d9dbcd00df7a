"""How many bytes per second one SM can read from HBM, by the same path our Triton attention uses
(pipelined loads into shared memory), with no math beside them: the ceiling a decode attention on an SM
share can reach. On each --shares share, one CTA per SM reads its slice of a 2 GiB bf16 buffer in
[block_rows, 128] tiles, either in order or through a page table of 16-row pages shuffled at random (the KV
cache's access pattern), and sums them. Prints GB/s per SM and TB/s in all, as a table; --out writes it.

  PYTHONPATH=.:.carry python3 lab/sm_bandwidth.py --shares=16,33,48,66,132 --out=DIR/sm_bandwidth.md

On a CPU (Triton's interpreter) the tests run `read_sums` on small buffers against numpy.
"""
from __future__ import annotations

if __package__ in (None, ""):
  import _root  # noqa: F401  (the repository root on sys.path: lab/_root.py)

from absl import app, flags

from lab._report import report

try:
  import triton
  import triton.language as tl
except ImportError:
  triton = None

FLAGS = flags.FLAGS
flags.DEFINE_list("shares", ["16", "33", "48", "66", "132"], "SM shares (one CTA per SM).")
flags.DEFINE_list("stages", ["2", "4"], "Pipeline depths (tiles in flight per CTA).")
flags.DEFINE_list("block_rows", ["64", "128"], "Rows of 128 bf16 per tile (64 rows = 16 KiB).")
flags.DEFINE_integer("iters", 10, "Calls per timing sample.")
flags.DEFINE_string("out", None, "Write the table (markdown) here.")

WIDTH = 128       # a head_dim row
PAGE_ROWS = 16    # the KV cache's page size


if triton is not None:

  @triton.jit
  def _read_kernel(src_ptr, table_ptr, out_ptr, BLOCKS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                   WIDTH: tl.constexpr, PAGE_ROWS: tl.constexpr, PAGED: tl.constexpr, NUM_STAGES: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_ROWS)
    c = tl.arange(0, WIDTH)
    acc = tl.zeros([BLOCK_ROWS, WIDTH], tl.float32)
    for j in tl.range(0, BLOCKS, num_stages=NUM_STAGES):
      row = (pid * BLOCKS + j) * BLOCK_ROWS + r
      if PAGED:   # the row's page through the table, as the attention finds a key
        row = tl.load(table_ptr + row // PAGE_ROWS) * PAGE_ROWS + row % PAGE_ROWS
      acc += tl.load(src_ptr + row.to(tl.int64)[:, None] * WIDTH + c[None, :]).to(tl.float32)
    tl.store(out_ptr + pid * WIDTH + c, tl.sum(acc, 0))


def _meta(rows: int, programs: int, block_rows: int, paged: bool, stages: int) -> dict:
  per_program = rows // programs // block_rows
  if per_program < 1:
    raise ValueError(f"{rows} rows cannot give {programs} programs a tile of {block_rows} rows each")
  return dict(BLOCKS=per_program, BLOCK_ROWS=block_rows, WIDTH=WIDTH, PAGE_ROWS=PAGE_ROWS, PAGED=paged,
              NUM_STAGES=stages)


def read_sums(src, table, programs: int, *, block_rows: int, paged: bool, stages: int, num_warps: int = 4):
  """Per program, the column sums of the rows it read ([programs, WIDTH] float32). src: [rows, WIDTH];
  table: [rows // PAGE_ROWS] page ids (used when paged). On a GPU through jax-triton; on a CPU in
  Triton's interpreter (numpy in and out)."""
  import jax
  meta = _meta(src.shape[0], programs, block_rows, paged, stages)
  if jax.default_backend() != "gpu":
    import torch
    from pallas_kernels.triton_interpret import f32, i32, interpreted
    out = torch.zeros((programs, WIDTH), dtype=torch.float32)
    interpreted(_read_kernel)[(programs,)](f32(src), i32(table), out, **meta)
    return out.numpy()
  import jax.numpy as jnp
  import jax_triton as jt
  return jt.triton_call(src, table, kernel=_read_kernel, out_shape=jax.ShapeDtypeStruct((programs, WIDTH), jnp.float32),
                        grid=(programs,), num_warps=num_warps, num_stages=stages, name="sm_read", **meta)


def reference_sums(src, table, programs: int, *, block_rows: int, paged: bool):
  import numpy as np
  src = np.asarray(src, np.float32)
  rows = np.arange(programs * (src.shape[0] // programs // block_rows) * block_rows)
  if paged:
    rows = np.asarray(table)[rows // PAGE_ROWS] * PAGE_ROWS + rows % PAGE_ROWS
  return src[rows].reshape(programs, -1, WIDTH).sum(1)


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from nanoflow_jax.perf import median_seconds
  rows = (2 << 30) // (WIDTH * 2)    # 2 GiB of bf16
  src = jax.random.normal(jax.random.PRNGKey(0), (rows, WIDTH), jnp.bfloat16)
  table = jnp.asarray(np.random.default_rng(0).permutation(rows // PAGE_ROWS).astype(np.int32))
  small, small_table = src[:1 << 16], jnp.asarray(np.random.default_rng(1).permutation((1 << 16) // PAGE_ROWS)
                                                   .astype(np.int32))
  lines = ["| access | block rows | stages | SMs | GB/s per SM | TB/s | rel. error |", "|---|---|---|---|---|---|---|"]
  for paged in (False, True):
    for block_rows in map(int, FLAGS.block_rows):
      for stages in map(int, FLAGS.stages):
        for share in map(int, FLAGS.shares):
          kw = dict(block_rows=block_rows, paged=paged)
          got = np.asarray(read_sums(small, small_table, share, stages=stages, **kw))
          ref = reference_sums(small, small_table, share, **kw)
          err = float(np.abs(got - ref).max() / np.abs(ref).max())
          f = jax.jit(lambda s, t, share=share, stages=stages, kw=kw: read_sums(s, t, share, stages=stages, **kw))
          seconds = median_seconds(f, src, table, iters=FLAGS.iters)
          read = share * _meta(rows, share, block_rows, paged, stages)["BLOCKS"] * block_rows * WIDTH * 2
          lines.append(f"| {'paged' if paged else 'in order'} | {block_rows} | {stages} | {share} | "
                       f"{read / seconds / share / 1e9:.1f} | {read / seconds / 1e12:.2f} | {err:.1e} |")
          print(lines[-1], flush=True)
  table_md = "\n".join(lines)
  report(table_md, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
