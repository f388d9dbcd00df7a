"""The experts' grouped GEMM (Mosaic GPU, interpret mode on the CPU) against its jnp reference (lax.ragged_dot),
with ragged group sizes, empty groups, rows past the groups, every tested SM count and both epilogues."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_utils import gpu_interpret
from nanoflow_jax.models import layers
from pallas_kernels import grouped_gemm as gg


def _random_case(rng, num_rows, num_groups, k, n):
  """Random rows sorted by group: random sizes (some empty) that leave a few rows past the last group."""
  cuts = np.sort(rng.integers(0, num_rows - 3, num_groups - 1))
  sizes = np.diff(np.concatenate([[0], cuts, [num_rows - rng.integers(0, 4)]])).astype(np.int32)
  sizes[rng.integers(num_groups)] = 0          # an expert no token chose
  key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
  lhs = jax.random.normal(key, (num_rows, k), jnp.bfloat16)
  rhs = jax.random.normal(jax.random.fold_in(key, 1), (num_groups, k, n), jnp.bfloat16) * 0.1
  return lhs, rhs, jnp.asarray(sizes)


def _close(out, ref):
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=3e-2)


@pytest.mark.parametrize("num_sms", [1, 2, 5])
@pytest.mark.parametrize("epilogue", [None, "silu_mul"])
def test_grouped_gemm_matches_reference(num_sms, epilogue):
  rng = np.random.default_rng()
  lhs, rhs, sizes = _random_case(rng, num_rows=int(rng.integers(130, 300)), num_groups=4, k=128, n=256)
  with gpu_interpret():
    out = gg.grouped_gemm(lhs, rhs, sizes, num_sms=num_sms, epilogue=epilogue)
  ref = gg.grouped_gemm_reference(lhs, rhs, sizes, epilogue)
  assert out.shape == ref.shape == (lhs.shape[0], 256 // (2 if epilogue else 1))
  _close(out, ref)
  assert not np.any(np.asarray(out[int(sizes.sum()):], np.float32))   # rows past the groups are zeros


def test_padding_puts_each_group_on_its_own_row_tiles():
  lhs = jnp.arange(150 * 64, dtype=jnp.float32).reshape(150, 64).astype(jnp.bfloat16)
  sizes = jnp.array([70, 0, 61, 5], jnp.int32)   # 136 rows in groups, 14 past them
  padded, tile_group, dest = gg.pad_groups(lhs, sizes, block_m=64)
  assert padded.shape == (gg.padded_rows(150, 4, 64), 64)
  assert tile_group.tolist() == [0, 0, 2, 3] + [-1] * (padded.shape[0] // 64 - 4)
  np.testing.assert_array_equal(np.asarray(dest[:70]), np.arange(70))
  np.testing.assert_array_equal(np.asarray(dest[70:131]), np.arange(128, 189))
  np.testing.assert_array_equal(np.asarray(dest[131:136]), np.arange(192, 197))
  np.testing.assert_array_equal(np.asarray(padded[dest[:136]]), np.asarray(lhs[:136]))
  assert not np.any(np.asarray(padded[70:128], np.float32))    # a group's tail rows are zeros
  unwritten = np.setdiff1d(np.arange(padded.shape[0]), np.asarray(dest[:136]))
  assert not np.any(np.asarray(padded[unwritten], np.float32))  # the 14 rows past the groups land nowhere


def test_a_wrong_tile_group_is_caught_by_the_comparison():
  """The check above can fail: one row tile multiplied by the wrong expert's weights shows."""
  lhs, rhs, sizes = _random_case(np.random.default_rng(0), 200, 3, 64, 128)
  sizes = jnp.array([100, 60, 37], jnp.int32)
  padded, tile_group, dest = gg.pad_groups(lhs, sizes)
  with gpu_interpret():
    out = gg.grouped_gemm_padded(padded, rhs, tile_group.at[0].set(2), num_sms=2)
  with pytest.raises(AssertionError):
    _close(out[dest][:197], gg.grouped_gemm_reference(lhs, rhs, sizes)[:197])


def test_bad_inputs_are_refused():
  lhs, rhs = jnp.ones((64, 96), jnp.bfloat16), jnp.ones((2, 96, 256), jnp.bfloat16)
  tiles = jnp.zeros((1,), jnp.int32)
  with pytest.raises(ValueError, match="multiples"):
    gg.grouped_gemm_padded(lhs, rhs, tiles, num_sms=2)            # K = 96
  with pytest.raises(ValueError, match="epilogue"):
    gg.grouped_gemm_padded(lhs[:, :64], rhs[:, :64], tiles, num_sms=2, epilogue="gelu")
  with pytest.raises(ValueError, match="tile_group"):
    gg.grouped_gemm_padded(lhs[:, :64], rhs[:, :64], jnp.zeros((3,), jnp.int32), num_sms=2)
  assert gg.supported(128, 128) and not gg.supported(96, 128) and not gg.supported(128, 64)


def test_moe_layer_runs_the_kernel_through_the_executor():
  """A tiny Mixtral-style layer: its experts through the executor's grouped-GEMM hook (interpret mode, both
  GEMMs taken by the kernel) equal lax.ragged_dot's."""
  from nanoflow_jax.checkpoint import random_params
  from nanoflow_jax.config import tiny_config
  from nanoflow_jax.model import Model
  from nanoflow_jax.models.transformer import DecoderLayer
  from nanoflow_jax.runtime.executor import Executor
  cfg = dataclasses.replace(tiny_config(), model_type="mixtral", num_experts=4, num_experts_per_tok=2,
                            name="tiny-moe")
  model = Model(cfg, random_params(cfg, jnp.bfloat16, seed=int(np.random.default_rng().integers(1 << 20))),
                dtype=jnp.bfloat16)
  ex = Executor(model, 16, 16, 2, 64, 128, kernels="interpret")
  calls = []

  def hook(x, w, sizes, epilogue):
    out = ex._grouped_gemm(x, w, sizes, epilogue)
    calls.append((epilogue, out is not None))
    return out
  layer = DecoderLayer(cfg, jnp.bfloat16).bind({"params": jax.tree.map(lambda a: a[0], ex.params["layers"])})
  h = jax.random.normal(jax.random.PRNGKey(3), (40, cfg.hidden_size), jnp.bfloat16)
  with layers.use_grouped_gemm(hook):
    out = layer.mlp(h)
  assert calls == [("silu_mul", True), (None, True)]
  _close(out, layer.mlp(h))


BENCH = r"""
import os, sys
sys.path.insert(0, "tests")
from absl import flags
from lab import kernel_bench
from kernel_utils import gpu_interpret, one_call
flags.FLAGS(["kernel_bench"])
kernel_bench.timeit = one_call   # the code path and the errors, not timings: one interpreted call each
with gpu_interpret():
  rows = kernel_bench.bench_grouped_gemm([2], peak=1.0, iters=1, rows_=256, experts=3, hidden=128, inter=128)
print(rows)
"""


def test_kernel_bench_grouped_gemm_runs_and_checks_the_kernel():
  """lab/kernel_bench.py --grouped_gemm's code path, on tiny shapes in interpret mode: every row measured,
  none failed, the kernel's error against the reference printed and small."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, "-c", BENCH], capture_output=True, text=True, timeout=600, cwd=root,
                     env={**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-3000:]
  rows = eval(r.stdout.strip().splitlines()[-1])
  assert len(rows) == 6 and not any("FAILED" in row[2] for row in rows), rows
  errors = [float(row[0].split("rel. error ")[1].rstrip(")")) for row in rows if "rel. error" in row[0]]
  assert len(errors) == 2 and max(errors) < 2e-2, rows
