"""The warp-specialized paged prefill kernel's entry (pallas_kernels/prefill_attention_mgpu.py) on the CPU.

The kernel body runs on the GPU only (tests/gpu/test_kernels_gpu.py: against the reference, and against
blocks_reference, the jnp statement of what it computes): jax 0.10.2's Mosaic GPU interpret mode has no
run_state, no transposed shared-memory refs and no register layouts, which the body needs. Here the body is
lowered for CUDA (Mosaic GPU's lowering runs without a GPU: it catches what the GPU compiler would refuse
before PTX), and the kernel is replaced by blocks_reference to check what the entry does around it: the
per-block table (page-table rows, positions, key ends, rows; most work first), and rows outside every block
(decode rows) left as they were."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_utils import page_layout
from pallas_kernels import prefill_attention_mgpu as pam
from pallas_kernels.paged_attention import paged_attention_reference, query_blocks


def _batch(rng, ctx, chunk, hkv=2, g=2, d=64, ps=16, pages=96):
  table, slots, positions = page_layout(rng, ctx, chunk, ps, pages, (len(ctx), 24))
  key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
  kc = jax.random.normal(key, (2, hkv, pages, ps, d), jnp.bfloat16)
  vc = jax.random.normal(jax.random.fold_in(key, 1), (2, hkv, pages, ps, d), jnp.bfloat16)
  q = jax.random.normal(jax.random.fold_in(key, 2), (len(slots), hkv * g, d), jnp.bfloat16)
  return q, kc, vc, table, slots, positions


@pytest.fixture
def kernel_as_reference(monkeypatch):
  monkeypatch.setattr(pam, "_call", pam.blocks_reference)


def test_entry_matches_the_reference_on_ragged_chunks(kernel_as_reference):
  """Chunks after cached prefixes, of 1, 44, 128 and 300 rows (blocks that end mid-tile, a chunk of exactly
  one tile), pages filled partly."""
  rng = np.random.default_rng()
  ctx, chunk = (1, 77, 300, 200), (1, 44, 300, 128)
  q, kc, vc, table, slots, positions = _batch(rng, ctx, chunk)
  start, length, nb = query_blocks(list(chunk), len(slots), pam.BLOCK_Q)
  out = pam.prefill_attention(q, kc, vc, 1, table, slots, positions, start, length, jnp.int32(nb),
                              max_blocks=pam.max_query_blocks(len(slots), len(chunk)))
  ref = paged_attention_reference(q, kc, vc, 1, table, slots, positions)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)


def test_entry_leaves_rows_outside_its_blocks(kernel_as_reference):
  """As the engine calls it: decode rows (another kernel's) before and after the prefill chunks' blocks."""
  rng = np.random.default_rng()
  ctx, chunk = (30, 9, 150, 60, 12), (1, 1, 150, 20, 1)
  q, kc, vc, table, slots, positions = _batch(rng, ctx, chunk)
  start, length, nb = query_blocks(list(chunk[2:4]), len(slots), pam.BLOCK_Q)
  start[:nb] += 2
  marked = jnp.full_like(q, 7)
  out = pam.prefill_attention(q, kc, vc, 0, table, slots, positions, start, length, jnp.int32(nb),
                              max_blocks=pam.max_query_blocks(170, 2), out=marked)
  ref = paged_attention_reference(q, kc, vc, 0, table, slots, positions)
  for rows in (slice(0, 2), slice(172, 173)):
    assert float(jnp.max(jnp.abs(out[rows].astype(jnp.float32) - 7))) == 0
  np.testing.assert_allclose(np.asarray(out[2:172], np.float32), np.asarray(ref[2:172], np.float32), atol=2e-2)


def test_refuses_what_the_kernel_cannot_take():
  q = jnp.zeros((4, 4, 64), jnp.bfloat16)
  fp8 = jnp.zeros((1, 2, 8, 16, 64), jnp.float8_e4m3fn)
  with pytest.raises(ValueError, match="not a shape"):
    pam.prefill_attention(q, fp8, fp8, 0, np.zeros((1, 8), np.int32), np.zeros(4, np.int32), np.arange(4),
                          np.zeros(4, np.int32), np.array([4, 0, 0, 0], np.int32), jnp.int32(1), max_blocks=1)
  bf = jnp.zeros((1, 4, 8, 16, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="shared memory"):          # 3 stages of 128 keys do not fit
    pam.prefill_attention(jnp.zeros((4, 4, 128), jnp.bfloat16), bf, bf, 0, np.zeros((1, 8), np.int32),
                          np.zeros(4, np.int32), np.arange(4), np.zeros(4, np.int32), np.array([4, 0, 0, 0], np.int32),
                          jnp.int32(1), max_blocks=1, max_concurrent_steps=3)
  assert not pam.supported(jnp.bfloat16, jnp.bfloat16, 96, 16)       # head_dim not a multiple of 64
  assert pam.supported(jnp.bfloat16, jnp.bfloat16, 128, 16)
  assert pam.max_query_blocks(300, 1) == 3 and pam.max_query_blocks(300, 4) == 6


@pytest.mark.parametrize("on_host", [True, False])
def test_block_info_orders_blocks_by_work(on_host):
  """Most work first (rows x keys they attend to), empty blocks last; each row of the table is its block's;
  the same from numpy (the host) as from jnp."""
  rng = np.random.default_rng()
  ctx, chunk = (1, 350, 300, 20), (1, 260, 300, 20)
  _, _, _, _, slots, positions = _batch(rng, ctx, chunk)
  start, length, nb = query_blocks(list(chunk), len(slots), pam.BLOCK_Q)
  mb = pam.max_query_blocks(len(slots), len(chunk))
  args = (slots, positions, start, length, nb) if on_host else tuple(map(jnp.asarray, (slots, positions, start,
                                                                                        length, nb)))
  info = pam.block_info(*args, mb)
  assert isinstance(info, np.ndarray) == on_host
  info = np.asarray(info)
  work = info[:, pam.ROWS] * (2 * info[:, pam.POS0] + info[:, pam.ROWS] + 1)
  assert (np.diff(work) <= 0).all() and (info[nb:, pam.ROWS] == 0).all()
  assert sorted(info[:nb, pam.ROW0].tolist()) == start[:nb].tolist()
  for seq, pos0, kv_end, row0, rows in info[:nb]:
    assert rows > 0 and slots[row0] == seq and positions[row0] == pos0 and kv_end == pos0 + rows
    assert (positions[row0:row0 + rows] == pos0 + np.arange(rows)).all()


@pytest.mark.parametrize("d,chunk,cfg", [(128, (1, 47, 320), {}),                        # 368 rows: tiled copies too
                                         (128, (1, 47, 320), {"num_sms": 5}),            # persistent
                                         (64, (1, 44, 300), {"block_kv": 64, "max_concurrent_steps": 3})])
def test_kernel_lowers_for_cuda(d, chunk, cfg):
  """Mosaic GPU lowers the body (TMA at any row offset, stores in pieces, the output aliased in place)."""
  rng = np.random.default_rng()
  q, kc, vc, table, slots, positions = _batch(rng, (1, 77, 330), chunk, d=d)
  start, length, nb = query_blocks(list(chunk), len(slots), pam.BLOCK_Q)
  f = jax.jit(lambda q, kc, vc: pam.prefill_attention_call(
      q, kc, vc, 1, table, slots, positions, start, length, nb, max_blocks=pam.max_query_blocks(len(slots), 3),
      **cfg))
  text = f.trace(q, kc, vc).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text and "output_operand_alias" in text


def test_kernel_lowers_under_stream_annotation():
  """As the nanoflow executor calls it: inside compute_on (a stream), where the output's aliasing must not
  need a mutable ref (those have no discharge rule there)."""
  from nanoflow_jax import compat
  rng = np.random.default_rng()
  q, kc, vc, table, slots, positions = _batch(rng, (1, 77, 330), (1, 47, 320), d=128)
  start, length, nb = query_blocks([1, 47, 320], len(slots), pam.BLOCK_Q)
  call = lambda q, kc, vc, out: pam.prefill_attention_call(q, kc, vc, 1, table, slots, positions, start, length, nb,
                                                           max_blocks=pam.max_query_blocks(len(slots), 3), num_sms=8,
                                                           out=out)
  f = jax.jit(lambda q, kc, vc: compat.compute_on(call, "gpu_stream:1")(q, kc, vc, q * 2))
  text = f.trace(q, kc, vc).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text and "output_operand_alias" in text


def _nested_jits(jaxpr) -> list[str]:
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("pjit", "jit"):
      found.append(eqn.params.get("name"))
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", None)
      if inner is not None and eqn.primitive.name != "mpmd_map":
        found += _nested_jits(getattr(inner, "jaxpr", inner))
  return found


def test_entry_nests_no_jit():
  """With the blocks traced, as the engine passes them: no jitted jnp function inside the entry (a jit nested
  in a stream annotation's computation fails on the GPU at run time: jnp.where and jnp.argsort did)."""
  rng = np.random.default_rng()
  q, kc, vc, table, slots, positions = _batch(rng, (1, 77, 330), (1, 47, 320))
  start, length, nb = query_blocks([1, 47, 320], len(slots), pam.BLOCK_Q)
  f = lambda q, slots, positions, start, length, nb: pam.prefill_attention_call(
      q, kc, vc, 1, table, slots, positions, start, length, nb, max_blocks=len(slots), num_sms=8, out=q)
  jaxpr = jax.make_jaxpr(f)(q, slots, positions, start, length, np.array([nb], np.int32))
  assert _nested_jits(jaxpr.jaxpr) == []


SHARD_MAP_SCRIPT = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from kernel_utils import page_layout
from nanoflow_jax import compat
from pallas_kernels import prefill_attention_mgpu as pam
from pallas_kernels.paged_attention import query_blocks
table, slots, positions = page_layout(np.random.default_rng(0), (1, 77, 330), (1, 47, 320), 16, 96, (3, 24))
start, length, nb = query_blocks([1, 47, 320], len(slots), pam.BLOCK_Q)
mesh = jax.make_mesh((2,), ("tp",))
heads = NamedSharding(mesh, P(None, "tp"))
q = jax.device_put(jnp.zeros((len(slots), 8, 128), jnp.bfloat16), heads)
kc = jax.device_put(jnp.zeros((2, 4, 96, 16, 128), jnp.bfloat16), heads)
def local(q, kc, slots, positions, start, length, nb):   # each device's heads, on a stream, as the executor
  call = lambda q, kc: pam.prefill_attention_call(q, kc, kc, 1, table, slots, positions, start, length, nb,
                                                  max_blocks=len(slots), num_sms=8, out=q)
  return compat.compute_on(call, "gpu_stream:1")(q, kc)
f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(None, "tp"), P(None, "tp"), P(), P(), P(), P(), P()),
                          out_specs=P(None, "tp"), check_vma=False))
text = f.trace(q, kc, slots, positions, start, length, np.array([nb], np.int32)).lower(
    lowering_platforms=("cuda",)).as_text()
print("lowered", "mosaic_gpu" in text and "output_operand_alias" in text)
"""


def test_kernel_lowers_per_device_under_tensor_parallelism():
  """As the TP executor calls it: inside shard_map (each device's query and KV heads), on a stream, with the
  blocks traced. A fresh process, for its two CPU devices."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, "-c", SHARD_MAP_SCRIPT, root], capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip().splitlines()[-1] == "lowered True"
