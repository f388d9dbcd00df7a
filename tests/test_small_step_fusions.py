"""Below FUSED_QUANT_FROM rows the GPU path keeps XLA's fusions instead of the jax-triton kernels (each a custom
call that splits a small, launch-bound step's command buffer): the executor's three hooks decline such steps on
kernels="triton" (the caller then takes XLA's path), and serve them from 512 rows on."""
import types

import jax.numpy as jnp
import pytest

from nanoflow_jax.runtime import executor as ex


def _gpu_executor():
  # what the hooks read before choosing a kernel
  self = types.SimpleNamespace(kernels="triton")
  self._keeps_xla_fusions = lambda rows: ex.Executor._keeps_xla_fusions(self, rows)
  self._small_op = lambda *a, **kw: ex.Executor._small_op(self, *a, **kw)   # the small-step hooks' common path
  return self


@pytest.mark.parametrize("rows", [1, 16, ex.FUSED_QUANT_FROM - 1])
def test_small_steps_keep_xlas_fusions(rows):
  self = _gpu_executor()
  x = jnp.zeros((rows, 8), jnp.bfloat16)
  assert ex.Executor._rms_norm_quant(self, x, jnp.ones(8, jnp.bfloat16), 1e-6) is None
  assert ex.Executor._silu_mul_quant(self, jnp.zeros((rows, 16), jnp.bfloat16), jnp.ones((rows, 1)), jnp.ones(16),
                                     jnp.bfloat16) is None
  q, k = jnp.zeros((rows, 4, 8), jnp.bfloat16), jnp.zeros((rows, 2, 8), jnp.bfloat16)
  cache = jnp.zeros((1, 2, 4, 4, 8), jnp.bfloat16)
  assert ex.Executor._rope_append(self, q, k, k, jnp.zeros(rows, jnp.int32), jnp.ones(4), cache, cache, 0,
                                  jnp.zeros(rows, jnp.int32), jnp.zeros(rows, jnp.int32)) is None


def test_large_steps_reach_the_kernels(monkeypatch):
  """From FUSED_QUANT_FROM rows the hook goes on to the kernel (stood in for here: jax-triton needs a GPU)."""
  from pallas_kernels import rope_append_triton
  called = []
  monkeypatch.setattr(rope_append_triton, "rope_append", lambda *a, num_sms: called.append(num_sms) or "kernel")
  self = _gpu_executor()
  self._sms, self._on_stream = (lambda: 132), (lambda f: f)
  rows = ex.FUSED_QUANT_FROM
  q = jnp.zeros((rows, 4, 8), jnp.bfloat16)
  assert ex.Executor._rope_append(self, q, None, None, None, None, None, None, 0, None, None) == "kernel"
  assert called == [132]


@pytest.mark.parametrize("norm,residual", [(True, False), (False, True), (False, False)])
def test_small_fp8_gemm_hook_hands_the_kernel_what_the_op_has(monkeypatch, norm, residual):
  """On the GPU path the small-step hook passes the norm's scale and eps, the residual, and silu_mul to the
  kernel by keyword, the arrays through the stream-annotated call (stood in for here)."""
  from pallas_kernels import small_gemm_fp8
  got = {}
  monkeypatch.setattr(small_gemm_fp8, "small_gemm_fp8", lambda x, w8, ws, **kw: got.update(kw) or "kernel")
  self = _gpu_executor()
  self._on_stream, self.on_kernels = (lambda f: f), True
  x, w8, ws = jnp.zeros((4, 64), jnp.bfloat16), jnp.zeros((48, 64), jnp.float8_e4m3fn), jnp.ones(48)
  g, r = jnp.full((64,), 2.0, jnp.bfloat16), jnp.full((4, 48), 3.0, jnp.bfloat16)
  out = ex.Executor._small_fp8_gemm(self, x, w8, ws, (g, 1e-6) if norm else None, r if residual else None, False)
  assert out == "kernel" and got["silu_mul"] is False and got["eps"] == (1e-6 if norm else 1e-5)
  assert (got["block_n"], got["block_k"]) == (16, 64)      # the largest tiles that divide 48 columns and K 64
  assert ("norm_scale" in got) == norm and ("residual" in got) == residual
  if norm:
    assert got["norm_scale"] is g
  if residual:
    assert got["residual"] is r


@pytest.mark.parametrize("norm,residual,silu_mul", [(True, False, False), (False, True, False), (True, False, True)])
def test_small_gemm_hook_hands_the_unquantized_kernel_what_the_op_has(monkeypatch, norm, residual, silu_mul):
  """The same for bf16 weights ([K, N]; gate_up's N = 2I): the kernel gets the tiles that divide, and a weight
  in another dtype than the rows goes to the reference instead."""
  from pallas_kernels import small_gemm
  got = {}
  monkeypatch.setattr(small_gemm, "small_gemm", lambda x, w, **kw: got.update(kw) or "kernel")
  self = _gpu_executor()
  self._on_stream, self.on_kernels = (lambda f: f), True
  x, w = jnp.zeros((4, 64), jnp.bfloat16), jnp.zeros((64, 96), jnp.bfloat16)
  g, r = jnp.full((64,), 2.0, jnp.bfloat16), jnp.full((4, 96), 3.0, jnp.bfloat16)
  args = ((g, 1e-6) if norm else None, r if residual else None, silu_mul)
  assert ex.Executor._small_gemm(self, x, w, *args) == "kernel"
  assert got["silu_mul"] is silu_mul and got["eps"] == (1e-6 if norm else 1e-5)
  assert ("norm_scale" in got) == norm and ("residual" in got) == residual
  assert (got["block_n"], got["block_k"]) == ((16 if silu_mul else 32), 64)   # 48 or 96 columns, K 64
  got.clear()
  out = ex.Executor._small_gemm(self, x, w.astype(jnp.float32), *args)
  assert not got and out.shape == (4, 48 if silu_mul else 96)
