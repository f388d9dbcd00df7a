"""Runs one engine step on the device: a forward pass compiled per token-count bucket, then the sampler.

A step takes the dense batch as flat token arrays (decodes and prefill chunks mixed), runs the model's
per-layer ops with the paged KV cache, samples one token for every sequence whose chunk reached its
end, and keeps the per-slot sampling state (last token, output counts, prompt mask) on the device, so
the next step can be dispatched before this one's tokens reach the host. KV and sampling state are
donated in and out: no copies.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from nanoflow_jax import compat, kv_cache, parallel, sampler
from nanoflow_jax.sampling_params import MAX_LOGPROBS
from nanoflow_jax.model import Model
from nanoflow_jax.models import layers
from nanoflow_jax.models.transformer import DecoderLayer
from nanoflow_jax.runtime.plan import PipelineConfig, check_beside_attention
from pallas_kernels import gemm as gemm_kernel
from pallas_kernels import gemm_fp8 as gemm_fp8_kernel
from pallas_kernels import rms_norm_quant_triton as rms_norm_quant_kernel
from pallas_kernels import silu_mul_quant_triton as silu_mul_quant_kernel
from pallas_kernels import small_gemm as small_gemm_kernel
from pallas_kernels import small_gemm_fp8 as small_gemm_fp8_kernel
from pallas_kernels import grouped_gemm as grouped_gemm_kernel
from pallas_kernels import hardware
from pallas_kernels import paged_attention as attention_kernels
from pallas_kernels import paged_attention_triton as pat_kernel
from pallas_kernels.paged_attention import append_kv, attention_call, paged_attention_reference

log = logging.getLogger(__name__)

MIN_BUCKET = 16
# pallas: Mosaic GPU GEMMs + the Pallas attention kernel; triton: the same GEMMs + the Triton attention
# kernel (jax-triton); auto: triton on a GPU where jax-triton imports, else pallas; reference: jnp
# everywhere (the CPU default); interpret: the Pallas kernels in interpret mode (CPU tests).
KERNEL_CHOICES = ("auto", "reference", "pallas", "triton", "interpret")
GEMM_CHOICES = ("mosaic", "mosaic_fused", "xla")
FP8_GEMM_CHOICES = ("xla", "xla_fused", "mosaic")
LAYER_LOOPS = ("auto", "scan", "unrolled", "hybrid")
XLA_GEMM_BELOW = 512   # with unrolled layers, GEMMs of fewer rows run on XLA's dot
# layer_loop "hybrid": steps of fewer tokens unroll their layers (launch-bound: XLA's command buffers take the
# whole step), larger ones scan (our GEMMs read the stacks in place; an unrolled step of Mosaic GEMMs compiles
# each one: 104-150 s for the 8B's 512-token step, session 30). The same bound as XLA's dot's.
UNROLL_BELOW = XLA_GEMM_BELOW
# fp8_gemm="xla_fused" and fused_rope_append: steps of fewer rows keep XLA's fusions. A jax-triton call is a
# custom call XLA's command buffers do not record, so in a small, launch-bound step each would split the graph.
FUSED_QUANT_FROM = 512
# Decode-only steps of at most this many tokens compile a variant of their bucket with no prefill attention call
# (StepInputs whose prefill blocks are empty). A step's attention is two calls, decodes then prefill chunks;
# in a decode-only step the second has no work, yet it is launched on every layer: on the GPU 32 of a batch-1
# fp8 step's 98 host launches, and it splits XLA's command buffers (lab/gpu_aot.py's census, perf-notes
# session 23). Larger steps are not launch-bound, and would pay a second compile of a large bucket.
DECODE_ONLY_UP_TO = 64
# split_decode_keys on the Pallas kernel (small_step_attention's steps): work items per SM the splits aim at. Its
# programs (2 per SM) loop over their items, so more items than programs only queue; at batch 1 (8 KV heads,
# a 16-token bucket) 8 splits per item, one key block each at context 1024.
SPLIT_ITEMS_PER_SM = 8
KIND_PAD, KIND_PROMPT, KIND_REFED_OUTPUT = 0, 1, 2  # how a fed token enters the penalty state


@dataclasses.dataclass
class StepInputs:
  """Host-built arrays for one step. [N] per token (N = bucket), [R] per slot."""
  tokens: np.ndarray         # int32 [N] (ignored where from_device)
  from_device: np.ndarray    # bool [N]: take the slot's last sampled token instead
  positions: np.ndarray      # int32 [N]
  slots: np.ndarray          # int32 [N]
  kv_pages: np.ndarray       # int32 [N] (num_pages for padding: the write is dropped)
  kv_offsets: np.ndarray     # int32 [N]
  kinds: np.ndarray          # int32 [N]: KIND_*
  page_table: np.ndarray     # int32 [R, max_pages]
  sample_rows: np.ndarray    # int32 [S]: the token rows whose logits are sampled, S = min(R, N) (0: padding)
  sample_slots: np.ndarray   # int32 [S]: their slots (R: padding, dropped by the sampler's writes)
  sample_mask: np.ndarray    # bool [R]: which slots sample this step
  reset_slots: np.ndarray    # int32 [S]: slots a new sequence took this step (R: padding, dropped)
  blocks: tuple              # per nano-batch: (decode blocks, prefill blocks), each (start, len, count [1])
                             # int32 with rows relative to the nano-batch (query_blocks)
  # prompt_logprobs: the rows whose next prompt token's log-prob is wanted, and that token ([P]; P = 0 in
  # steps without such requests, else the bucket: one more compile per bucket, only where asked for)
  lp_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
  lp_targets: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))


jax.tree_util.register_dataclass(StepInputs, data_fields=[f.name for f in dataclasses.fields(StepInputs)],
                                 meta_fields=[])


def _sequential_ops(num_nano_batches: int, tp: int = 1):
  from nanoflow_jax.runtime.plan import NanoOp, ops_for
  return [NanoOp(op, nb) for nb in range(num_nano_batches) for op in ops_for(tp)]


def _order_after(op, state: dict, outs: dict) -> dict:
  """The nano-batch's values, held back until the ops of other nano-batches that `op` depends on in the
  plan have produced their outputs. Those dependencies carry no data (attention@0 after attention@1),
  so without this XLA orders the ops as it likes. Measured: it put the long decode attention first on
  the attention stream, and the other nano-batch's GEMMs then waited behind it."""
  ties = [v for d in op.deps if not d.startswith("prev:") and not d.endswith(f"@{op.nano_batch}")
          for v in outs.get(d, ())]
  if not ties:
    return state
  held, _ = jax.lax.optimization_barrier((dict(state), ties))
  return held


def _layer_slice(stack: jax.Array, i: jax.Array) -> jax.Array:
  """Layer i of a weight stack [L, ..., N], i a traced index: a static slice would make each layer's GEMM
  fusions distinct programs, which XLA autotunes one by one (the hybrid's small steps compiled in 35-43 s each
  on an H100, session 30); at a traced index the layers' fusions are the same programs (deviceless census of
  the 8B's batch-1 step: 5 distinct GEMM fusion programs instead of 97, no copies either way). A stack of 4 or more
  dimensions is indexed as [L, K, N] and shaped back: XLA (jaxlib 0.10.2's, deviceless) handed a slice of the
  4-D o stack [L, heads, head_dim, hidden] to cuBLASLt through a copy, outside the step's command buffers."""
  flat = stack if stack.ndim < 4 else stack.reshape(stack.shape[0], -1, stack.shape[-1])
  return jax.lax.dynamic_index_in_dim(flat, i, keepdims=False).reshape(stack.shape[1:])


def buckets_for(dense_batch: int, min_bucket: int = MIN_BUCKET) -> list[int]:
  out, b = [], min_bucket
  while b < dense_batch:
    out.append(b)
    b *= 2
  return out + [dense_batch]


# Fewest rows a nano-batch gets on the GPU: below this the GEMMs stream their weights rather than compute.
MIN_NANO_BATCH = 512


def kernel_sms(op, num_sms: int, annotate: bool) -> int:
  """The grid a nano-op's kernel gets. SM shares mean something only where kernels run concurrently
  (stream annotation); otherwise the whole GPU (measured: a plan's shares without streams only slowed its
  GEMMs; under TP 4, GEMMs that left NCCL's all-reduces their SMs made full steps slower too)."""
  if op is None or not annotate:
    return num_sms
  return op.sm_share or num_sms


class Executor:
  def __init__(self, model: Model, num_pages: int | None, page_size: int, max_num_seqs: int, max_model_len: int,
               dense_batch: int, kv_dtype=None, kernels: str = "auto", num_sms: int | None = None,
               kv_memory_fraction: float = 0.9, plan: PipelineConfig | None = None, mesh=None,
               fused_rope_append: bool = False, gemm: str = "mosaic_fused", beside_attention: dict | None = None,
               layer_unroll: int = 1, mosaic_prefill: bool = True, layer_loop: str = "auto",
               small_step_attention: int = 0, fp8_gemm: str = "xla", split_decode_keys: bool = True,
               small_gemm: bool = False):
    """num_pages None: as many as fit in kv_memory_fraction of the memory left after the weights.
    fused_rope_append: RoPE and the KV append as one kernel (the Triton one with kernels="triton", its
    jnp reference elsewhere); off by default until measured on the GPU (docs/history/perf-notes.md).
    plan: run each layer as this PipelineConfig's nano-ops (mode nanoflow); None: sequential.
    mesh: a tensor-parallel mesh (nanoflow_jax.parallel) the model's weights are sharded over.
    gemm: "mosaic_fused" (our SM-share GEMM kernel on the kernel paths, gate_up with the SiLU-and-multiply
    in its epilogue: gemm.gemm_silu_mul), "mosaic" (the same GEMM, the activation left to XLA) or "xla"
    (XLA's dot). Measured on an H200, ours is faster in the sequential step too: XLA's dot needs each
    layer's weight slice copied out of the stacked weights, ours reads it in place; the fused gate_up
    takes the 8B mix step from 66.0 to 64.7 ms (docs/history/perf-notes.md, session 11).
    beside_attention: changes to the decode attention's configuration where it runs on an SM share beside
    other kernels (stream annotation), e.g. {"programs_per_sm": 4}: there a CTA gets an SM of its own, and
    what is fastest alone on the whole GPU need not be (docs/history/perf-notes.md, sessions 7-8). None: the
    plan's own (PipelineConfig.beside_attention).
    layer_unroll: decoder layers per iteration of the layer scan (lax.scan's unroll). Each iteration ends
    with every nano-batch done; with 2, one layer's tail (under TP its last all-reduce) and the next
    layer's head for another nano-batch are in one computation, so XLA may overlap them across the
    layer boundary, at about twice the compile time.
    layer_loop: "scan" (one lax.scan over the stacked layer weights: compiled once, not once per layer),
    "unrolled" (every layer in the step, each with weight arrays of its own: no slice of a stack reaches XLA's
    dot as a copy, and XLA's command buffers can take the whole step; longer compiles), "hybrid" (steps below
    UNROLL_BELOW tokens unrolled over slices of the stacks, larger ones scanned) or "auto": for fp8
    weights on a GPU's kernel path unrolled where XLA's fp8 dot reads them (fp8_gemm "xla"/"xla_fused": in a
    scan their copies cost 4.3 ms of a 51 ms 8B step, docs/history/perf-notes.md, session 15), hybrid with
    our fp8 GEMM (compiled once a large step size); scan otherwise. (bf16 scans until hybrid is measured: its
    small steps compiled in 35-43 s each on an H100, cold, where per-layer arrays took 5-9 s, while the
    slices were static; see _layer_slice.)
    small_step_attention: steps of at most this many tokens (buckets) run their attention, decode and prefill
    blocks alike, as the Pallas kernel instead of the Triton one (kernels "triton" only; 0: never). Pallas's
    Triton lowering is compiled by XLA into its own kernels, which its command buffers record; jax-triton's
    calls are custom calls they record only when told to, so each splits a small step's graph and is launched
    on its own (issue 27: a batch-1 fp8 step spends ~6 ms of host time launching; the attention's speed
    hardly matters at that size).
    fp8_gemm: the fp8 weights' GEMMs on the kernel paths: "xla" (XLA's fp8 dot, cuBLASLt, with the scales in a
    pass of their own), "xla_fused" (XLA's fp8 dot, each activation quantization fused into its producer as
    a Triton kernel in steps of FUSED_QUANT_FROM rows or more: gate_up's scales, SiLU-and-multiply and down's
    quantization in pallas_kernels/silu_mul_quant_triton.py, the RMSNorms before qkv and gate_up in
    rms_norm_quant_triton.py; their jnp references on the other kernel paths) or "mosaic"
    (pallas_kernels/gemm_fp8.py: the scales, the residual and gate_up's SiLU-and-multiply in its epilogue);
    XLA's until another is measured faster on the GPU.
    small_gemm: steps of at most 16 rows run each GEMM's whole op (the RMSNorm before qkv and gate_up, with fp8
    weights the per-token quantization and the scales, the GEMM, the residual or SiLU-and-multiply) as one kernel
    (on the GPU Pallas kernels, recorded in the step's command buffer: pallas_kernels/small_gemm_fp8.py, unlike
    its jax-triton sibling small_gemm_fp8_triton.py, and small_gemm.py for bf16/f16 weights; their references,
    the unfused ops' math, elsewhere); dense models only; off: measured slower than XLA's GEMMs in the step on an
    H100 (docs/history/perf-notes.md, session 23).
    split_decode_keys: each decode's keys shared out over several programs and merged (flash-decoding: the
    attention kernels' key_splits), as many as fill the decode kernel's programs for the step's bucket
    (key_splits_for: 1 for large steps); on the Triton kernel and on the Pallas one of small_step_attention's
    steps (there as many as fill SPLIT_ITEMS_PER_SM work items per SM). A batch-1 decode otherwise walks its
    1024 keys in 16 dependent blocks on 8 programs (0.044 ms a layer for 2 MB; session 21's trace). Measured on
    an H100: -10% / -14% / -4% a step at batch 1 / 8 / 32 (session 23); on by default since its GPU test passed
    (session 24).
    mosaic_prefill: prefill attention on the Mosaic GPU kernel where it takes the cache (bf16/f16; 1.8x the
    Triton kernel, docs/history/perf-notes.md, session 12); False: the Triton kernel (benches compare the two)."""
    cfg = model.config
    self.model = model
    self.page_size = page_size
    self.max_num_seqs = max_num_seqs
    self.max_pages_per_seq = -(-max_model_len // page_size)
    if kernels not in KERNEL_CHOICES:
      raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    on_gpu = jax.default_backend() == "gpu"
    self.kernels = (attention_kernels.default_backend() if on_gpu else "reference") if kernels == "auto" else kernels
    if self.kernels == "triton" and not attention_kernels.paged_attention_triton_available():
      raise ValueError("kernels='triton' needs a GPU and jax-triton (pip install jax-triton); use 'pallas'")
    self.mesh = mesh
    # Tensor parallelism. Dense models whose heads and MLP divide by the TP degree run each layer under
    # shard_map: every kernel sees its device's heads and MLP columns (our kernels are custom calls the
    # SPMD partitioner cannot split), and the row-parallel o and down end in an explicit psum. Otherwise
    # XLA's SPMD partitioner splits the jnp reference ops.
    self.tp = mesh.shape[parallel.AXIS] if mesh is not None else 1
    self.manual_tp = self.tp > 1 and parallel.manual_tp_supported(cfg, self.tp)
    self.layer_config = parallel.local_config(cfg, self.tp) if self.manual_tp else cfg
    if self.tp > 1 and not self.manual_tp and self.kernels != "reference":
      log.warning("tensor parallelism over %d devices: %s cannot be split per device (MoE, or heads/MLP not "
                  "divisible); the jnp reference kernels run under XLA's partitioner", self.tp, cfg.name)
      self.kernels = "reference"
    if gemm not in GEMM_CHOICES:
      raise ValueError(f"gemm must be one of {GEMM_CHOICES}, got {gemm!r}")
    if fp8_gemm not in FP8_GEMM_CHOICES:
      raise ValueError(f"fp8_gemm must be one of {FP8_GEMM_CHOICES}, got {fp8_gemm!r}")
    gemm, mosaic_prefill, why = hardware.mosaic_kernel_choices(gemm, mosaic_prefill, on_gpu)
    if why:
      log.warning(why)
      if fp8_gemm == "mosaic":
        fp8_gemm = "xla"   # no wgmma here either
    self.fp8_gemm = fp8_gemm
    self.num_sms = num_sms or (jax.devices()[0].core_count if on_gpu else 4)
    # The GEMM kernel takes M in multiples of 128: on the kernel path buckets are multiples of 128.
    self.on_kernels = self.kernels in ("pallas", "triton")   # compiled kernels (not jnp, not interpret)
    self.buckets = buckets_for(dense_batch, 128 if self.on_kernels and dense_batch >= 128 else MIN_BUCKET)
    self.xla_gemm_below = 0   # GEMMs of fewer rows go to XLA's dot
    # Attention kernel configurations (decode blocks, prefill blocks): the host builds query blocks of their
    # block_q.
    self.attention_backend = "triton" if self.kernels == "triton" else "pallas"
    self.mosaic_prefill = mosaic_prefill
    self.kv_dtype = jnp.dtype(kv_dtype or model.dtype)
    self.attention_configs = attention_kernels.configs(
        self.attention_backend, self.kv_dtype, head_dim=cfg.head_dim if mosaic_prefill else None, page_size=page_size,
        sliding_window=cfg.sliding_window, q_dtype=model.dtype)
    if small_step_attention < 0:
      raise ValueError(f"small_step_attention must be >= 0 tokens, got {small_step_attention}")
    self.small_step_attention = small_step_attention if self.kernels == "triton" else 0
    self.small_attention_configs = attention_kernels.configs("pallas", self.kv_dtype)
    self.split_decode_keys = split_decode_keys and self.kernels != "reference"
    # (not for MoE: the experts' grouped GEMM takes the MLP norm's output as an array)
    self.small_gemm = small_gemm and not cfg.is_moe
    if beside_attention is None:   # the plan's variant, unless the caller (a bench) gives its own
      beside_attention = plan.beside_attention if plan is not None else {}
    self.beside_attention = dict(beside_attention)
    check_beside_attention(self.beside_attention)
    # Page-table columns: whole key blocks of the attention kernel, so it never pads the table per call.
    per_block = max(c.get("block_n", page_size) for c in self.attention_configs) // page_size
    self.page_table_cols = -(-self.max_pages_per_seq // max(per_block, 1)) * max(per_block, 1)
    log.info("step kernels: %s (%d SMs)", self.kernels, self.num_sms)
    if plan is not None and plan.tp != self.tp:
      raise ValueError(f"pipeline config {plan.name!r} is for tensor parallelism {plan.tp}, the engine runs {self.tp}")
    self.plan = plan
    # Stream annotation needs the kernels (SM-limited grids) and a GPU; elsewhere the same split and order.
    self.annotate = plan is not None and self.on_kernels and len(plan.nano_batches) > 1
    if self.annotate and self.tp > 1:   # streams inside shard_map are not wired yet (collectives as nano-ops)
      log.warning("tensor parallelism: nano-batches run in order without stream annotation for now")
      self.annotate = False
    self.gemm = gemm
    if self.annotate and cfg.quantization is not None and self.fp8_gemm == "xla":
      log.warning("mode nanoflow with fp8 weights: XLA's fp8 dot takes the whole GPU whatever a nano-op's SM share; "
                  "fp8_gemm='mosaic' (--fp8_gemm=mosaic) runs the fp8 GEMMs on their shares")
    # Our GEMM kernels in the layer scan take the whole weight stack and the layer index: a slice reaches a
    # stream-annotated custom call as a copy (7-9 ms an 8B step, session 2), and outside annotation jaxlib
    # 0.10.2's XLA copies it too (deviceless census, session 30; the device's XLA measured no different either
    # way). Interpret mode does the same, so the CPU tests run that path.
    self.stacked_gemm = self.kernels in ("pallas", "triton", "interpret") and not self.manual_tp
    self._op = None  # the nano-op being traced: its stream and SM share reach the kernel calls
    self.fused_rope_append = fused_rope_append
    if layer_unroll < 1:
      raise ValueError(f"layer_unroll must be >= 1, got {layer_unroll}")
    self.layer_unroll = layer_unroll
    if layer_loop not in LAYER_LOOPS:
      raise ValueError(f"layer_loop must be one of {LAYER_LOOPS}, got {layer_loop!r}")
    if layer_loop == "auto":   # bf16 scans until the hybrid's cold compiles and small steps are measured
      layer_loop = ("scan" if not self.on_kernels or cfg.quantization is None else
                    "hybrid" if self.fp8_gemm == "mosaic" else "unrolled")
    self.layer_loop = layer_loop
    # The weights take the loop's form before the KV cache is sized (the model keeps one copy of them), so
    # the cache takes the rest.
    if layer_loop in ("unrolled", "hybrid"):
      # In unrolled steps XLA's dot reads the weights in place, so steps below our GEMM's 128 rows get buckets of
      # their own, and the GEMMs of small buckets go to XLA's dot (cuBLAS streams weights at small M faster than
      # our kernel's tiles, tuned at 2048 rows: 4.4 against 9.1 ms at 128 rows, perf-notes session 5)
      self.buckets = buckets_for(dense_batch)
      self.xla_gemm_below = XLA_GEMM_BELOW
    if layer_loop == "unrolled":
      top, stacked = model.layer_list()
      self.stacked_gemm = False   # each layer's weights are arrays of their own: nothing to slice
    else:
      top, stacked = model.stacked_params()
    # The all-gather form of o (plan.AG_OPS) multiplies the whole heads by each device's slice of o's
    # output columns: o's stack once more, split by its last axis (1/TP of o per device).
    self.allgather_o = plan is not None and any(op.op == "attn_allgather" for op in plan.ops)
    if self.allgather_o and not self.manual_tp:
      raise ValueError(f"pipeline config {plan.name!r} all-gathers o's input, which needs the per-device TP path")
    if self.allgather_o:
      from jax.sharding import NamedSharding, PartitionSpec as P
      if cfg.hidden_size % self.tp:
        raise ValueError(f"the all-gather form of o splits hidden {cfg.hidden_size} over {self.tp} devices")
      if layer_loop == "unrolled":
        by_column = NamedSharding(mesh, P(None, None, parallel.AXIS))
        stacked = [{**p, "o_col": jax.device_put(p["o"], by_column)} for p in stacked]
      else:
        by_column = NamedSharding(mesh, P(None, None, None, parallel.AXIS))
        stacked = {**stacked, "o_col": jax.device_put(stacked["o"], by_column)}
    self.params = {"top": top, "layers": stacked}
    kv_sharding = parallel.kv_sharding(cfg, mesh) if mesh is not None else None
    if num_pages:   # asked for: exactly that many, or an error
      self.num_pages, self.kv = num_pages, kv_cache.allocate_kv(cfg, num_pages, page_size, self.kv_dtype, kv_sharding)
    else:           # sized from free memory: shrunk until it fits
      shards = parallel.kv_shards(cfg, mesh)
      self.num_pages, self.kv = kv_cache.allocate_kv_fitting(
          cfg, kv_cache.pages_from_memory(cfg, page_size, self.kv_dtype, kv_memory_fraction, shards), page_size,
          self.kv_dtype, kv_sharding, shards)
    r, v = max_num_seqs, cfg.vocab_size
    self.last_tokens = jnp.zeros((r,), jnp.int32)
    self.counts = jnp.zeros((r, v), jnp.int32)
    self.prompt_mask = jnp.zeros((r, v), jnp.bool_)
    if mesh is not None:  # sampling state lives replicated on the mesh, beside the sharded weights
      self.last_tokens, self.counts, self.prompt_mask = jax.device_put(
          (self.last_tokens, self.counts, self.prompt_mask), parallel.replicated(mesh))
    self._compiled: dict = {}   # per bucket (and (bucket, "prompt_logprobs"))
    self.prompt_logprobs = ()   # the last step's, where it had prompt_logprobs rows (device arrays)
    self.compile_seconds: dict = {}     # per bucket, and per sampler Modes
    # Two computations per step: the forward pass (one per bucket) and the sampler (one per Modes, the
    # same for every bucket). The sampler's branches are chosen on the host, so neither holds a device
    # conditional and a step's dispatch never waits for the device.
    self._jitted = jax.jit(self._forward_step, donate_argnums=(1, 3, 4))
    self._samplers: dict[sampler.Modes, object] = {}
    self._sampler_inputs: dict[int, tuple] = {}   # rows -> (logits, sample_slots) shapes of a compiled sampler

  def bucket(self, num_tokens: int) -> int:
    for b in self.buckets:
      if num_tokens <= b:
        return b
    raise ValueError(f"{num_tokens} tokens exceed the dense batch {self.buckets[-1]}")

  # --- the step itself (traced once per bucket) ---------------------------------------------------
  def nano_sizes(self, num_tokens: int) -> list[int]:
    if self.plan is None:
      return [num_tokens]
    sizes = self.plan.sizes_for(num_tokens, 128 if self.on_kernels else 8)
    # Every nano-batch reads all the weights once more: below MIN_NANO_BATCH rows a GEMM is bound by those
    # reads, so a small step runs whole (measured at TP 4: splitting added ~13 ms of fixed cost per step).
    if self.on_kernels and min(sizes) < MIN_NANO_BATCH:
      return [num_tokens]
    return sizes

  @contextlib.contextmanager
  def _nano_op(self, op):
    prev, self._op = self._op, op
    try:
      yield
    finally:
      self._op = prev

  def _sms(self) -> int:
    return kernel_sms(self._op, self.num_sms, self.annotate)

  def _on_stream(self, f):
    if self.annotate and self._op is not None and self._op.stream:
      return compat.compute_on(f, f"gpu_stream:{self._op.stream}")
    return f

  def attention_for(self, num_tokens: int) -> tuple[str, tuple[dict, dict]]:
    """(backend, (decode, prefill) configurations) of a step of `num_tokens` (its bucket): the Pallas kernel for
    small steps where small_step_attention says so, else the engine's. The host builds the query blocks of
    the same configurations (engine._attention_blocks)."""
    if num_tokens <= self.small_step_attention:
      return "pallas", self.small_attention_configs
    return self.attention_backend, self.attention_configs

  def decode_only_variant(self, num_tokens: int) -> bool:
    """Whether a decode-only step of `num_tokens` (its bucket) runs the bucket's decode-only variant: no
    prefill attention call (DECODE_ONLY_UP_TO). Where the attention is the kernels' (not the jnp reference,
    which takes no blocks) and the step runs whole."""
    return (self.kernels != "reference" and num_tokens <= DECODE_ONLY_UP_TO and
            len(self.nano_sizes(num_tokens)) == 1)

  @staticmethod
  def step_key(inp: StepInputs):
    """The compiled step `inp` runs: its bucket, or (bucket, "prompt_logprobs") where it has such rows, or
    (bucket, "decode") for a decode-only variant (its prefill blocks empty)."""
    n = len(inp.tokens)
    if len(inp.lp_rows):
      return n, "prompt_logprobs"
    if all(len(b[1][0]) == 0 for b in inp.blocks):
      return n, "decode"
    return n

  def compile(self, inp: StepInputs) -> None:
    """Compiles the step `inp` would run, without running it (warm-up of the decode-only variants)."""
    self._compiled_for(self.step_key(inp), inp)

  def attention_configs_for(self, num_sms: int) -> tuple[dict, dict]:
    """(decode, prefill) attention configurations for a kernel on `num_sms`: beside_attention's changes
    to the decode one where it shares the GPU with other streams."""
    decode, prefill = self.attention_configs
    if self.annotate and num_sms < self.num_sms:
      decode = {**decode, **self.beside_attention}
    return decode, prefill

  def _attention(self, q, k_cache, v_cache, layer, inp: StepInputs, rows: slice, blocks):
    window = self.model.config.sliding_window
    slots, positions = inp.slots[rows], inp.positions[rows]
    if self.kernels == "reference":
      return paged_attention_reference(q, k_cache, v_cache, layer, inp.page_table, slots, positions, window)
    num_sms, interpret = self._sms(), self.kernels == "interpret"
    if inp.tokens.shape[0] <= self.small_step_attention:   # the same choice as attention_for (the host's blocks)
      backend, configs = self.attention_for(inp.tokens.shape[0])
    else:
      backend, configs = self.attention_backend, self.attention_configs_for(num_sms)
    if self.split_decode_keys:
      decode = configs[0]
      # the Triton kernel's programs each take one work item; the Pallas kernel's loop over theirs
      per_sm = decode.get("programs_per_sm", 1) if backend == "triton" else SPLIT_ITEMS_PER_SM
      splits = pat_kernel.key_splits_for(inp.tokens.shape[0], k_cache.shape[1], num_sms * per_sm)
      configs = ({**decode, "key_splits": splits}, configs[1])

    def kernels(q, k_cache, v_cache, layer, page_table, slots, positions, blocks):
      # Two calls into one output: prefill chunks (blocks of 32), then decodes (blocks of one token); none for a
      # kind the step's blocks leave empty (a decode-only step's variant: decode_only_variant). The decode call
      # goes last so that its key splits' merge (XLA fusions) joins the command buffer after it; between the two
      # jax-triton calls it was launched alone (lab/gpu_aot.py: 66 more host launches at 100 decodes).
      out = None
      for bl, cfg in reversed(list(zip(blocks, configs))):
        if bl[0].shape[0] == 0:
          continue
        out = attention_call(backend, q, k_cache, v_cache, layer, page_table, slots, positions, *bl,
                             num_sms=num_sms, config=cfg, sliding_window=window, interpret=interpret, out=out)
      return out
    return self._on_stream(kernels)(q, k_cache, v_cache, layer, inp.page_table, slots, positions, blocks)

  def _keeps_xla_fusions(self, rows: int) -> bool:
    """A GPU step of fewer than FUSED_QUANT_FROM rows keeps XLA's fusions where a jax-triton kernel could stand."""
    return self.kernels == "triton" and rows < FUSED_QUANT_FROM

  def _rope_append(self, *args):
    """fused_rope_append: RoPE and the KV append as one Triton kernel on the nano-op's stream (GPU, steps of
    FUSED_QUANT_FROM rows or more; None below: XLA's fusions), its reference on the other kernel paths."""
    from pallas_kernels import rope_append_triton
    if self._keeps_xla_fusions(args[0].shape[0]):
      return None
    if self.kernels == "triton":
      num_sms = self._sms()
      return self._on_stream(lambda *a: rope_append_triton.rope_append(*a, num_sms=num_sms))(*args)
    return rope_append_triton.rope_append_reference(*args)

  def _gemm(self, a, b, residual, stacked, epilogue=None):
    m, k = a.shape
    n = b.shape[1]
    if self.gemm == "xla" or (epilogue is not None and self.gemm != "mosaic_fused"):
      return None
    supported = gemm_kernel.silu_mul_supported if epilogue == "silu_mul" else gemm_kernel.supported
    if m < self.xla_gemm_below:
      return None
    if a.dtype != b.dtype or a.dtype not in (jnp.bfloat16, jnp.float16) or not supported(m, n, k):
      return None
    num_sms = self._sms()
    layer = None
    if stacked is not None and self.stacked_gemm:   # the whole stack and the layer index, not the slice
      stack, layer = stacked
      b = stack.reshape(stack.shape[0], k, n)       # a bitcast: the layer's [..] dims flattened as in b
    if epilogue == "silu_mul":
      return self._run_kernel(functools.partial(gemm_kernel.gemm_silu_mul, num_sms=num_sms, layer=layer), a, b)
    call = functools.partial(gemm_kernel.gemm, num_sms=num_sms, layer=layer)
    if residual is None:
      return self._run_kernel(lambda a, b: call(a, b, None), a, b)
    return self._run_kernel(call, a, b, residual)

  def _fp8_gemm(self, a8, a_scale, w8, w_scale, residual, stacked, epilogue=None):
    """The fp8 GEMMs on pallas_kernels/gemm_fp8.py where fp8_gemm says so and it takes the shape; None (XLA's
    fp8 dot) otherwise."""
    if self.fp8_gemm != "mosaic" or self.model.dtype not in (jnp.bfloat16, jnp.float16):
      return None
    m, k = a8.shape
    n = w8.shape[0]
    silu_mul = epilogue == "silu_mul"
    if m < self.xla_gemm_below or not gemm_fp8_kernel.supported(m, n, k, silu_mul=silu_mul):
      return None
    layer = None
    if stacked is not None and self.stacked_gemm:   # the stacks and the layer index, not the slices
      (w_stack, layer), (s_stack, _) = stacked
      w8, w_scale = w_stack.reshape(w_stack.shape[0], n, k), s_stack.reshape(s_stack.shape[0], n)
    kernel = gemm_fp8_kernel.gemm_fp8_silu_mul if silu_mul else gemm_fp8_kernel.gemm_fp8
    call = functools.partial(kernel, num_sms=self._sms(), layer=layer, out_dtype=self.model.dtype)
    if residual is None:
      return self._run_kernel(lambda a, s, w, ws: call(a, w, s, ws), a8, a_scale, w8, w_scale)
    return self._run_kernel(lambda a, s, w, ws, r: call(a, w, s, ws, r), a8, a_scale, w8, w_scale, residual)

  def _silu_mul_quant(self, acc, a_scale, w_scale, out_dtype):
    """fp8_gemm="xla_fused": the MLP's middle as one Triton kernel on the nano-op's stream (jax-triton: GPU
    only); the interpret and reference paths run its jnp reference, which is the unfused ops' math."""
    if self._keeps_xla_fusions(acc.shape[0]):
      return None
    if self.kernels != "triton" or jnp.dtype(out_dtype) not in (jnp.bfloat16, jnp.float16):
      return silu_mul_quant_kernel.silu_mul_quant_reference(acc, a_scale, w_scale, out_dtype)
    return self._on_stream(functools.partial(silu_mul_quant_kernel.silu_mul_quant, out_dtype=out_dtype,
                                             num_sms=self._sms()))(acc, a_scale, w_scale)

  def _rms_norm_quant(self, x, scale, eps):
    """fp8_gemm="xla_fused": RMSNorm and the next GEMM's activation quantization as one Triton kernel on the
    nano-op's stream (GPU); the interpret and reference paths run its jnp reference, the unfused ops' math."""
    if self._keeps_xla_fusions(x.shape[0]):
      return None
    if self.kernels != "triton" or x.dtype not in (jnp.bfloat16, jnp.float16):
      return rms_norm_quant_kernel.rms_norm_quant_reference(x, scale, eps)
    return self._on_stream(functools.partial(rms_norm_quant_kernel.rms_norm_quant, eps=eps,
                                             num_sms=self._sms()))(x, scale)

  def _small_fp8_gemm(self, x, w8, w_scale, norm, residual, silu_mul):
    """small_gemm with fp8 weights: a small step's whole fp8 GEMM op as one Pallas kernel (small_gemm_fp8.py, which
    XLA compiles itself and so keeps in the step's command buffer); see _small_op."""
    k = small_gemm_fp8_kernel
    return self._small_op(k.small_gemm_fp8, k.small_gemm_fp8_reference, k, x, (w8, w_scale), w8.shape[0], norm,
                          residual, silu_mul)

  def _small_gemm(self, x, w, norm, residual, silu_mul):
    """small_gemm with unquantized weights: the norm, the GEMM, the residual or SiLU-and-multiply as one Pallas
    kernel (small_gemm.py; a weight in another dtype than the rows goes to the reference); see _small_op."""
    k = small_gemm_kernel
    return self._small_op(k.small_gemm, k.small_gemm_reference, k, x, (w,), w.shape[1], norm, residual, silu_mul,
                          takes=w.dtype == x.dtype)

  def _small_op(self, kernel, reference, module, x, weights, n, norm, residual, silu_mul, takes=True):
    """Both small-step hooks: `kernel` on the nano-op's stream on the GPU's kernel paths, at the largest tiles up to
    `module`'s defaults that divide its n weight columns (gate_up: halves) and K; `reference` (the unfused ops'
    math) elsewhere, and for shapes no tile divides, rows in neither bf16 nor f16, or where not `takes`."""
    eps = 1e-5 if norm is None else norm[1]
    # the optional arrays, by keyword, that are there (the stream-annotated call takes arrays as arguments)
    extras = {k: v for k, v in (("norm_scale", None if norm is None else norm[0]), ("residual", residual))
              if v is not None}
    tiles = small_gemm_kernel.tiles_for(n // 2 if silu_mul else n, x.shape[1], module.BLOCK_N, module.BLOCK_K)
    if not self.on_kernels or x.dtype not in (jnp.bfloat16, jnp.float16) or not takes or tiles is None:
      return reference(x, *weights, norm_scale=extras.get("norm_scale"), eps=eps, residual=residual,
                       silu_mul=silu_mul)

    def call(x, *arrays):
      return kernel(x, *arrays[:len(weights)], eps=eps, silu_mul=silu_mul, block_n=tiles[0], block_k=tiles[1],
                    **dict(zip(extras, arrays[len(weights):])))
    return self._on_stream(call)(x, *weights, *extras.values())

  def _run_kernel(self, fn, *arrays):
    """A Mosaic GPU kernel call: in interpret mode on the CPU, else on the nano-op's stream."""
    if self.kernels == "interpret":
      with compat.gpu_interpret_mode():
        return fn(*arrays)
    return self._on_stream(fn)(*arrays)

  def _grouped_gemm(self, x, w, group_sizes, epilogue):
    """The experts' grouped GEMMs on the kernel paths (pallas_kernels.grouped_gemm on the op's SM share);
    None (lax.ragged_dot) for shapes it does not take."""
    n_out = w.shape[2] // 2 if epilogue == "silu_mul" else w.shape[2]
    if (self.gemm == "xla" or x.dtype != w.dtype or x.dtype not in (jnp.bfloat16, jnp.float16)
        or not grouped_gemm_kernel.supported(x.shape[1], n_out)):
      return None
    call = functools.partial(grouped_gemm_kernel.grouped_gemm, num_sms=self._sms(), epilogue=epilogue)
    return self._run_kernel(call, x, w, group_sizes)

  def _forward(self, params, kv, tokens, inp: StepInputs):
    cfg = self.model.config
    m = self.model.module.bind({"params": params["top"]})
    x = m.embed(tokens)

    sizes = self.nano_sizes(tokens.shape[0])
    bounds = np.cumsum([0] + sizes)
    rows = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    ops = (self.plan.ops if self.plan is not None and len(sizes) > 1 else
           _sequential_ops(len(sizes), self.tp if self.manual_tp else 1))

    layer_cfg, manual = self.layer_config, self.manual_tp
    # Under manual TP the collectives after o and down are nano-ops of their own where the plan has them
    # (o_allreduce or attn_allgather + o_allgather, down_allreduce), so one nano-batch's collective can sit
    # beside another's compute.
    explicit_allreduce = manual and any(op.op == "down_allreduce" for op in ops)
    gathered = {op.nano_batch for op in ops if op.op == "attn_allgather"}   # nano-batches in AG form

    unrolled = self.unrolls(tokens.shape[0])
    per_layer = isinstance(params["layers"], list)   # weights of their own per layer (else stacks)

    def row_parallel(partial, residual):
      # o and down: on one device the residual is fused into the GEMM; under manual TP each device holds a
      # partial product, summed across devices before the residual joins.
      return residual + jax.lax.psum(partial, parallel.AXIS)

    def layer_step(carry, xs, inp):
      x, k_cache, v_cache = carry
      i, layer_params = xs
      layer_params = dict(layer_params)
      o_col = layer_params.pop("o_col", None)   # [heads, head_dim, hidden / TP]: the all-gather form's o
      layer = DecoderLayer(layer_cfg, self.model.dtype).bind({"params": layer_params})
      st = [{"x": x[r]} for r in rows]   # per nano-batch values
      # The GEMMs take their weight as (whole stack, layer index) where stacked_gemm says so.
      stacked = ({id(w): (params["layers"][name], i) for name, w in layer_params.items()}
                 if self.stacked_gemm else {})
      # under manual TP the row-parallel GEMMs' fp8 activation scales are taken over the whole row (pmax)
      with layers.use_stacked_weights(stacked), layers.use_tp_axis(parallel.AXIS if manual else None):
        return run_ops(layer, o_col, st, i, k_cache, v_cache, inp)

    def run_ops(layer, o_col, st, i, k_cache, v_cache, inp):
      outs: dict[str, list] = {}   # what each nano-op of this layer wrote, for the ops ordered after it
      for op in ops:
        s, r = st[op.nano_batch], rows[op.nano_batch]
        s.update(_order_after(op, s, outs))
        before = dict(s)
        # The named scope reaches the kernels' op names in a profiler trace (trace_overlap.nano_op_of).
        with self._nano_op(op), jax.named_scope(f"nano_{op.op}_{op.nano_batch}"):
          if op.op == "qkv":
            s["q"], s["k"], s["v"] = layer.qkv(layer.attn_norm(s["x"]))
          elif op.op == "rope_append":
            fused = (self._rope_append(s["q"], s["k"], s["v"], inp.positions[r], m.inv_freq, k_cache, v_cache, i,
                                       inp.kv_pages[r], inp.kv_offsets[r]) if self.fused_rope_append else None)
            if fused is not None:
              s["q"], k_cache, v_cache = fused
            else:   # XLA's fusions: the rotation, then the append's scatter
              s["q"], k = m.rope(s["q"], s["k"], inp.positions[r])
              k_cache, v_cache = append_kv(k_cache, v_cache, i, k, s["v"], inp.kv_pages[r], inp.kv_offsets[r])
          elif op.op == "attention":
            s["attn"] = self._attention(s["q"], k_cache, v_cache, i, inp, r, inp.blocks[op.nano_batch])
            if unrolled:
              # The next layer's KV append may write the cache in place only once this attention has read it;
              # the barrier makes that order a data dependency rather than leaving it to copy insertion. (The
              # GPU compile warns of 214-267 GiB "memory use" with or without it; the temporaries it
              # allocates are 0.3-0.7 GB, logged at compile.)
              s["attn"], k_cache, v_cache = jax.lax.optimization_barrier((s["attn"], k_cache, v_cache))
          elif op.op == "attn_allgather":   # this device's heads -> all heads, in the global head order
            s["attn"] = jax.lax.all_gather(s["attn"], parallel.AXIS, axis=1, tiled=True)
          elif op.op == "o" and op.nano_batch in gathered:   # all heads x this device's output columns
            s["o_cols"] = layers.linear(s["attn"], o_col, "...nd,ndh->...h")
          elif op.op == "o_allgather":
            s["x"] = s["x"] + jax.lax.all_gather(s.pop("o_cols"), parallel.AXIS, axis=1, tiled=True)
          elif op.op == "o":
            if explicit_allreduce:
              s["o_partial"] = layer.o(s["attn"])
            else:
              s["x"] = row_parallel(layer.o(s["attn"]), s["x"]) if manual else layer.o(s["attn"], residual=s["x"])
          elif op.op in ("o_allreduce", "down_allreduce"):
            if explicit_allreduce:   # (under XLA's partitioner the all-reduces are its own)
              s["x"] = row_parallel(s.pop(op.op.replace("allreduce", "partial")), s["x"])
          elif op.op == "gate_up":
            h = layer.mlp_norm(s["x"])
            s["mlp"] = layer.mlp(h, residual=s["x"]) if cfg.is_moe else layer.gate_up_act(h)
          elif op.op == "down":
            if cfg.is_moe:
              s["x"] = s["mlp"]
            elif explicit_allreduce:
              s["down_partial"] = layer.down(s["mlp"])
            elif manual:
              s["x"] = row_parallel(layer.down(s["mlp"]), s["x"])
            else:
              s["x"] = layer.down(s["mlp"], residual=s["x"])
        outs[op.id] = [v for k, v in s.items() if before.get(k) is not v]
      x = st[0]["x"] if len(st) == 1 else jnp.concatenate([s["x"] for s in st])
      return x, k_cache, v_cache

    if manual:
      from jax.sharding import PartitionSpec as P
      shapes = ({n: w.shape for n, w in params["layers"][0].items()} if per_layer else
                {n: w.shape[1:] for n, w in params["layers"].items()})
      layer_specs = {name: parallel.param_spec(cfg, (name,), shape, self.tp) for name, shape in shapes.items()}
      kv_spec = parallel.kv_sharding(cfg, self.mesh).spec
      carry_specs = (P(), kv_spec, kv_spec)
      step_local = jax.shard_map(layer_step, mesh=self.mesh, check_vma=False,
                                 in_specs=(carry_specs, (P(), layer_specs), jax.tree.map(lambda _: P(), inp)),
                                 out_specs=carry_specs)
      body = lambda carry, xs: (step_local(carry, xs, inp), None)
    else:
      body = lambda carry, xs: (layer_step(carry, xs, inp), None)
    if unrolled:   # every layer in the computation: its own weight arrays, or slices of the stacks
      carry = (x, *kv)
      # the layer indices as values XLA cannot fold into constants (see _layer_slice)
      index = jax.lax.optimization_barrier(jnp.arange(cfg.num_layers, dtype=jnp.int32))
      for i in range(cfg.num_layers):
        layer_params = params["layers"][i] if per_layer else {
            name: _layer_slice(stack, index[i]) for name, stack in params["layers"].items()}
        carry, _ = body(carry, (jnp.int32(i), layer_params))
      x, k_cache, v_cache = carry
      return self._head(m, x, inp), (k_cache, v_cache)
    # Our GEMMs would get their layer's weight slice as a copy (7-9 ms per 8B step); with stacked_gemm they
    # read the scanned stack at the layer index instead (docs/history/perf-notes.md, sessions 2 and 30).
    (x, k_cache, v_cache), _ = jax.lax.scan(body, (x, *kv),
                                            (jnp.arange(cfg.num_layers, dtype=jnp.int32), params["layers"]),
                                            unroll=self.layer_unroll)
    # The head and the sampler run on the sampled rows only: S = min(R, N), not all R slots (at 2048 slots
    # the head over every slot cost 2.3 ms a step even when two sequences sampled; perf-notes, session 9).
    return self._head(m, x, inp), (k_cache, v_cache)

  def unrolls(self, n: int) -> bool:
    """Whether the step for bucket `n` unrolls its layers (layer_loop "unrolled", or "hybrid" below UNROLL_BELOW)."""
    return self.layer_loop == "unrolled" or (self.layer_loop == "hybrid" and n < UNROLL_BELOW)

  @staticmethod
  def _head(m, x, inp: StepInputs):
    """The logits of the sampled rows, and for prompt_logprobs (lp_rows) each row's log-prob of its next prompt
    token and the top MAX_LOGPROBS (empty where no request asks)."""
    logits = m.logits(x[inp.sample_rows])
    if inp.lp_rows.shape[0] == 0:
      return logits, ()
    lp = jax.nn.log_softmax(m.logits(x[inp.lp_rows]).astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(lp, inp.lp_targets[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(lp, min(MAX_LOGPROBS, lp.shape[-1]))
    return logits, (target, top_lp, top_ids)

  def _forward_step(self, params, kv, last_tokens, counts, prompt_mask, inp: StepInputs):
    tokens = jnp.where(inp.from_device, last_tokens[inp.slots], inp.tokens)
    (logits, prompt_lp), new_kv = self._forward(params, kv, tokens, inp)
    # Only the new sequences' rows are cleared: a select over all [R, V] rows cost 0.63 ms a step at 2048
    # slots (perf-notes, session 9); the scatter writes in place into the donated buffers.
    counts = counts.at[inp.reset_slots].set(0, mode="drop")
    prompt_mask = prompt_mask.at[inp.reset_slots].set(False, mode="drop")
    prompt_mask = prompt_mask.at[inp.slots, tokens].max(inp.kinds == KIND_PROMPT)
    counts = counts.at[inp.slots, tokens].add((inp.kinds == KIND_REFED_OUTPUT).astype(jnp.int32))
    return new_kv, counts, prompt_mask, logits, prompt_lp

  @staticmethod
  def _sample_step(logits, last_tokens, counts, prompt_mask, sample_slots, sp: sampler.SamplingArrays, extras: dict,
                   modes: sampler.Modes):
    """logits [S, V] of the slots `sample_slots` [S] (R for padding) -> per sampled row (tokens, logprob,
    top logprobs, top ids) [S]; each sampled slot's last token and output counts updated."""
    r = last_tokens.shape[0]
    rows = jnp.minimum(sample_slots, r - 1)      # padding reads some slot's state; its writes are dropped
    if modes.biased:       # logit_bias: [S, K] ids (-1: none) and values per sampled row
      ids = extras["bias_ids"]
      logits = logits.at[jnp.arange(ids.shape[0])[:, None], jnp.maximum(ids, 0)].add(
          jnp.where(ids >= 0, extras["bias_values"], 0.0))
    if modes.structured:   # the grammars' allowed tokens, per sampled row (structured.py)
      from nanoflow_jax.structured import apply_bitmask
      logits = apply_bitmask(logits, extras["bitmask"])
    tok, lp, top_lp, top_ids = sampler.sample(logits, counts[rows], prompt_mask[rows],
                                              jax.tree.map(lambda a: a[rows], sp), modes)
    last_tokens = last_tokens.at[sample_slots].set(tok, mode="drop")
    counts = counts.at[sample_slots, tok].add(1, mode="drop")
    return last_tokens, counts, (tok, lp, top_lp, top_ids)

  # --- host side --------------------------------------------------------------------------------
  def _compiled_for(self, n, inp: StepInputs):
    if n not in self._compiled:
      t = time.perf_counter()
      with layers.use_gemm(None if self.kernels == "reference" else self._gemm), \
           layers.use_fp8_gemm(None if self.kernels == "reference" else self._fp8_gemm), \
           layers.use_silu_mul_quant(self._silu_mul_quant if self.fp8_gemm == "xla_fused" else None), \
           layers.use_rms_norm_quant(self._rms_norm_quant if self.fp8_gemm == "xla_fused" else None), \
           layers.use_small_fp8_gemm(self._small_fp8_gemm if self.small_gemm else None,
                                     small_gemm_fp8_kernel.MAX_ROWS), \
           layers.use_small_gemm(self._small_gemm if self.small_gemm else None, small_gemm_kernel.MAX_ROWS), \
           layers.use_grouped_gemm(None if self.kernels == "reference" else self._grouped_gemm):
        lowered = self._jitted.lower(self.params, self.kv, self.last_tokens, self.counts, self.prompt_mask, inp)
      options = dict(compat.STREAM_ANNOTATION_OPTIONS if self.annotate else {})
      if self.plan is not None and self.manual_tp:
        options.update(compat.SEPARATE_COLLECTIVES_OPTIONS)
      self._compiled[n] = lowered.compile(options or None)
      self.compile_seconds[n] = time.perf_counter() - t
      mem = self._compiled[n].memory_analysis()
      log.info("compiled the step for %s tokens in %.1f s (%s temporaries: %.2f GB)", n, self.compile_seconds[n],
               "unrolled" if self.unrolls(inp.tokens.shape[0]) else "scan",
               getattr(mem, "temp_size_in_bytes", 0) / 1e9 if mem is not None else float("nan"))
    return self._compiled[n]

  def _sampler_for(self, modes: sampler.Modes, logits, sample_slots, sp: sampler.SamplingArrays, extras: dict):
    key = (modes, logits.shape[0], tuple((k, v.shape) for k, v in sorted(extras.items())))
    if key not in self._samplers:
      self._sampler_inputs.setdefault(logits.shape[0], tuple(
          jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)) for x in (logits, sample_slots)))
      t = time.perf_counter()
      fn = jax.jit(functools.partial(self._sample_step, modes=modes), donate_argnums=(1, 2))
      self._samplers[key] = fn.lower(logits, self.last_tokens, self.counts, self.prompt_mask, sample_slots,
                                     sp, extras).compile()
      self.compile_seconds[key] = time.perf_counter() - t
      log.info("compiled the sampler for %s, %d rows in %.1f s", modes, logits.shape[0], self.compile_seconds[key])
    return self._samplers[key]

  def compile_samplers(self, modes: list[sampler.Modes], sp: sampler.SamplingArrays) -> None:
    """The sampler of each of `modes` compiled, not run, for every row count a sampler was compiled for so far
    (Engine.warm_up: requests that sample or ask log-probabilities then find theirs ready)."""
    for logits, sample_slots in list(self._sampler_inputs.values()):
      for m in modes:
        self._sampler_for(m, logits, sample_slots, sp, {})

  def run(self, inp: StepInputs, sp: sampler.SamplingArrays, extras: dict | None = None):
    """Dispatches the step; returns device arrays (tokens, logprob, top logprobs, top ids) not yet read, one
    row per entry of inp.sample_slots. extras, per sampled row where some row needs them: "bitmask" (int32
    [rows, ceil(V / 32)]: the tokens a grammar allows), "bias_ids" / "bias_values" ([rows, K]: logit_bias)."""
    fn = self._compiled_for(self.step_key(inp), inp)
    self.kv, self.counts, self.prompt_mask, logits, self.prompt_logprobs = fn(
        self.params, self.kv, self.last_tokens, self.counts, self.prompt_mask, inp)
    extras = extras or {}
    modes = sampler.modes_for(sp, inp.sample_mask)._replace(structured="bitmask" in extras,
                                                              biased="bias_ids" in extras)
    self.last_tokens, self.counts, out = self._sampler_for(modes, logits, inp.sample_slots, sp, extras)(
        logits, self.last_tokens, self.counts, self.prompt_mask, inp.sample_slots, sp, extras)
    return out
