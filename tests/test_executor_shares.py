"""Which grid each nano-op's kernel gets, and when a step is split into nano-batches on the GPU."""
import types

from nanoflow_jax.runtime import plan as plan_lib
from nanoflow_jax.runtime.executor import MIN_NANO_BATCH, Executor, kernel_sms


def _op(cfg, op_id):
  return next(o for o in cfg.ops if o.id == op_id)


def test_kernel_sms_follows_the_plan_only_where_kernels_run_together():
  one = plan_lib.generic_default(2048, 132)
  gemm, attn = _op(one, "o@0"), _op(one, "attention@1")
  assert gemm.sm_share < 132 and attn.sm_share < 132
  assert kernel_sms(gemm, 132, annotate=True) == gemm.sm_share
  assert kernel_sms(attn, 132, annotate=True) == attn.sm_share
  assert kernel_sms(gemm, 132, annotate=False) == 132        # nothing runs beside it: the whole GPU
  assert kernel_sms(None, 132, annotate=True) == 132
  tp = plan_lib.generic_default(2048, 132, tp=4)             # under TP (no streams yet) likewise
  assert all(kernel_sms(op, 132, annotate=False) == 132 for op in tp.ops)


def test_small_steps_run_whole_on_the_gpu():
  cfg = plan_lib.decode_overlap(2048, 132, 512)    # [512, 1536]
  gpu = types.SimpleNamespace(plan=cfg, on_kernels=True)
  assert Executor.nano_sizes(gpu, 2048) == [512, 1536]
  assert Executor.nano_sizes(gpu, 1024) == [1024]          # [256, 768] would re-read the weights for 256 rows
  even = types.SimpleNamespace(plan=plan_lib.generic_default(2048, 132), on_kernels=True)
  assert Executor.nano_sizes(even, 1024) == [MIN_NANO_BATCH, 1024 - MIN_NANO_BATCH]
  assert Executor.nano_sizes(even, 896) == [896]
  cpu = types.SimpleNamespace(plan=plan_lib.generic_default(32, 132), on_kernels=False)
  assert Executor.nano_sizes(cpu, 32) == [16, 16]           # the CPU tests still split tiny batches
  assert Executor.nano_sizes(types.SimpleNamespace(plan=None, on_kernels=True), 2048) == [2048]


def test_beside_attention_changes_only_the_decode_config_on_a_share():
  decode, prefill = {"block_q": 1, "block_n": 128, "programs_per_sm": 2}, {"block_q": 32, "block_n": 64}
  ex = types.SimpleNamespace(attention_configs=(decode, prefill), num_sms=132, annotate=True,
                             beside_attention={"programs_per_sm": 4, "prefetch_pages": 1})
  assert Executor.attention_configs_for(ex, 33) == ({**decode, "programs_per_sm": 4, "prefetch_pages": 1}, prefill)
  assert Executor.attention_configs_for(ex, 132) == (decode, prefill)     # on the whole GPU: the engine's config
  ex.annotate = False                                                      # no streams: nothing runs beside it
  assert Executor.attention_configs_for(ex, 33) == (decode, prefill)


def test_beside_attention_cannot_change_the_blocks():
  import pytest
  from nanoflow_jax.model import load_model
  model = load_model("tiny", dtype="float32", random_weights=True)
  with pytest.raises(ValueError, match="block_n"):
    Executor(model, 16, 16, 2, 64, 32, beside_attention={"block_n": 64})


def test_executor_takes_the_plans_beside_attention_unless_given_its_own():
  from nanoflow_jax.model import load_model
  model = load_model("tiny", dtype="float32", random_weights=True)
  cfg = plan_lib.generic_default(32, 132)
  cfg.beside_attention = {"prefetch_pages": 1, "num_stages": 3}
  assert Executor(model, 16, 16, 2, 64, 32, plan=cfg).beside_attention == cfg.beside_attention
  assert Executor(model, 16, 16, 2, 64, 32, plan=cfg, beside_attention={}).beside_attention == {}
  assert Executor(model, 16, 16, 2, 64, 32).beside_attention == {}
