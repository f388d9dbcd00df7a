"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))` and `LLM.chat(messages)`."""
from __future__ import annotations

import itertools
import logging
from typing import Sequence, Union

import jax

from nanoflow_jax.engine import Engine, EngineConfig
from nanoflow_jax.model import load_model
from nanoflow_jax.outputs import RequestOutput
from nanoflow_jax.sampling_params import SamplingParams

log = logging.getLogger(__name__)

Prompt = Union[str, Sequence[int], dict]


def default_dtype() -> str:
  return "bfloat16" if jax.default_backend() == "gpu" else "float32"


def default_dense_batch() -> int:
  return 2048 if jax.default_backend() == "gpu" else 256


def build_engine(model: str = "tiny", dtype: str | None = None, random_weights: bool = False,
                 dense_batch: int | None = None, page_size: int = 16, num_pages: int | None = None,
                 kv_memory_fraction: float = 0.9, max_num_seqs: int = 64, max_model_len: int | None = None,
                 mode: str = "sequential", seed: int = 0, kernels: str = "auto", model_obj=None,
                 pipeline_config: str | None = None, tensor_parallel: int = 1,
                 kv_cache_dtype: str = "auto", gemm: str = "mosaic_fused", layer_unroll: int = 1,
                 layer_loop: str = "auto", prefill_attention: str = "auto", quantization: str | None = None,
                 enable_prefix_caching: bool = True, host_kv_cache_gb: float = 0.0, host_kv_copy: str = "thread",
                 small_step_attention: int = 0, fp8_gemm: str = "xla", overlap_dispatch: bool = False,
                 split_decode_keys: bool = True, small_gemm: bool = False) -> Engine:
  """`model_obj`: an already loaded Model to reuse (a benchmark comparing modes loads it once)."""
  from nanoflow_jax import compat
  compat.configure_host_memory(host_kv_cache_gb)   # the tier's pinned pool, where JAX's backend is not up yet
  if mode == "nanoflow":
    from nanoflow_jax.runtime import autosearch
    # The stream flags only where the plan splits the step (they slow a whole-batch step); they take
    # effect only if the GPU backend is not up yet.
    if autosearch.nanoflow_splits(model, dense_batch, tensor_parallel, pipeline_config,
                                  compat.gpu_name_before_backend(), quantization):
      compat.enable_concurrent_command_buffers(tensor_parallel)
  if num_pages is None and jax.process_count() > 1:
    # Each process would size the cache from its own free memory, and the cache is one array over all of
    # them: its shape must be the job's. (Agreeing on the smallest count across processes passed on CPU
    # devices but hung on two GPUs, session 13; not yet understood.)
    raise ValueError("a multi-host job needs num_pages (--num_pages): the KV cache is one array over every "
                     "process, so its size cannot come from each process's own free memory")
  cfg = EngineConfig(dense_batch=dense_batch or default_dense_batch(), page_size=page_size, num_pages=num_pages,
                     kv_memory_fraction=kv_memory_fraction, max_num_seqs=max_num_seqs,
                     max_model_len=max_model_len, mode=mode, kernels=kernels, pipeline_config=pipeline_config,
                     tensor_parallel=tensor_parallel, kv_cache_dtype=kv_cache_dtype, gemm=gemm,
                     layer_unroll=layer_unroll, layer_loop=layer_loop, prefill_attention=prefill_attention,
                     enable_prefix_caching=enable_prefix_caching, host_kv_cache_gb=host_kv_cache_gb,
                     host_kv_copy=host_kv_copy,
                     small_step_attention=small_step_attention, fp8_gemm=fp8_gemm,
                     overlap_dispatch=overlap_dispatch, split_decode_keys=split_decode_keys,
                     small_gemm=small_gemm)
  cfg.validate()   # before the model loads: a bad option costs nothing
  if jax.process_count() > 1:   # every process loads the same model the same way, or the load hangs the job
    from nanoflow_jax import model as model_lib, multihost
    failed = None
    try:
      model_config = model_obj.config if model_obj is not None else model_lib.resolve_config(model, quantization)
      load = {"dtype": dtype or default_dtype(), "random_weights": random_weights, "seed": seed,
              "given": model_obj is not None}
      signature = multihost.start_signature(model_config, cfg, load)
    except Exception as e:   # (a model that does not resolve) told to the others, not left for them to time out
      failed, signature = e, {"error": f"{type(e).__name__}: {e}"}
    multihost.agree(compat.coordination_store(), signature, jax.process_index(), jax.process_count())
    if failed is not None:   # every process failed alike
      raise failed
  sharding_fn = None
  if tensor_parallel > 1:
    from nanoflow_jax import checkpoint, parallel
    sharding_fn = parallel.sharding_fn(checkpoint.resolve_config(model), parallel.make_mesh(tensor_parallel))
  m = model_obj or load_model(model, dtype=dtype or default_dtype(), random_weights=random_weights, seed=seed,
                              sharding_fn=sharding_fn, quantization=quantization)
  engine = Engine(m, cfg)
  if jax.process_count() > 1:   # every process must run the same settings, or a later step hangs the job
    from nanoflow_jax import multihost
    try:
      multihost.agree(compat.coordination_store(), multihost.job_signature(engine), jax.process_index(),
                      jax.process_count())
    except multihost.JobMismatch:
      engine.shutdown()
      raise
  return engine


class LLM:
  """Offline batch generation. Arguments as `build_engine`; `model` is a checkpoint directory (ours or
  Hugging Face's) or a named shape (`tiny`, `llama-3-8b`, ... with random_weights=True)."""

  # vLLM's keyword names -> ours. gpu_memory_utilization is vLLM's share of the whole GPU for weights and cache;
  # ours is the share of the memory left after the weights that the KV cache takes (the nearest knob).
  VLLM_NAMES = {"tensor_parallel_size": "tensor_parallel", "gpu_memory_utilization": "kv_memory_fraction",
                "max_num_batched_tokens": "dense_batch", "async_scheduling": "overlap_dispatch"}

  def __init__(self, model: str = "tiny", **engine_args):
    for theirs, ours in self.VLLM_NAMES.items():
      if theirs in engine_args and theirs != ours:
        if ours in engine_args:
          raise TypeError(f"{theirs} and {ours} name the same setting: give one")
        engine_args[ours] = engine_args.pop(theirs)
    self.engine = build_engine(model, **engine_args)
    if "seed" in engine_args:   # as in vLLM: requests without a seed of their own repeat from run to run
      self.engine.seed_unseeded(engine_args["seed"])
    self.tokenizer = self.engine.tokenizer
    self._ids = itertools.count()

  def reset_prefix_cache(self) -> None:
    """Forgets the cached prefixes (GPU and host tier): the next prompts compute everything, as on a fresh engine."""
    self.engine.reset_prefix_cache()

  def get_tokenizer(self):
    return self.tokenizer

  def _encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
    if isinstance(prompt, dict):   # vLLM's prompt forms: {"prompt": text} or {"prompt_token_ids": ids}
      extra = sorted(set(prompt) - {"prompt", "prompt_token_ids"})
      if extra or len(prompt) != 1:
        raise ValueError(f"a dict prompt holds exactly one of 'prompt' or 'prompt_token_ids'; got keys {sorted(prompt)}")
      return self._encode(prompt.get("prompt", prompt.get("prompt_token_ids")))
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ValueError("this model has no tokenizer: pass token ids")
      return prompt, self.tokenizer.encode(prompt)
    return None, [int(t) for t in prompt]

  def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams]
               | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
    if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
      prompts = [prompts]
    params = sampling_params or SamplingParams()
    params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(params) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    ids = []
    try:
      for prompt, p in zip(prompts, params):
        text, token_ids = self._encode(prompt)
        rid = f"offline-{next(self._ids)}"
        self.engine.add_request(rid, token_ids, p, prompt=text)
        ids.append(rid)
    except Exception:
      for rid in ids:  # a bad prompt rejects the call; the ones added before it go too
        self.engine.discard(rid)
      raise
    bar = None
    if use_tqdm:
      from tqdm import tqdm
      bar = tqdm(total=len(ids), desc="generating", unit="req")
    done: set[str] = set()

    def progress():
      if bar is not None:
        newly = [r for r in ids if r not in done and all(s.finished for s in self.engine.requests[r].seqs)]
        done.update(newly)
        bar.update(len(newly))
    self.engine.run_until_done(progress)
    if bar is not None:
      bar.close()
    return [self.engine.pop_output(rid) for rid in ids]

  def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
           add_generation_prompt: bool = True) -> list[RequestOutput]:
    """`messages` is one conversation (a list of {"role", "content"}) or a list of conversations."""
    convs = [messages] if messages and isinstance(messages[0], dict) else messages
    prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tokenize=True)
               for c in convs]
    return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
