"""Model configuration: read from a Hugging Face `config.json` (transformers 4.x or 5.x) or a named shape."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# Architectures we implement, keyed by the HF `architectures[0]` / `model_type` names.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
}
MODEL_TYPES = set(ARCHITECTURES.values())
ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
  """A config.json we cannot serve, with the reason."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  theta: float = 10000.0
  type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class Quantization:
  """How the dense layers' weights and activations are quantized (nanoflow_jax/quantization.py).
  source: "dynamic" (our own, from bf16/fp16 weights at load or conversion), "compressed-tensors" or
  "fbgemm_fp8" (a published FP8 checkpoint: its e4m3 weights and scales used as they are)."""
  scheme: str = "fp8"
  source: str = "dynamic"
  weight_strategy: str = "channel"          # the checkpoint's: "tensor" or "channel" (run per channel either way)
  static_input_scales: bool = False         # the checkpoint brings per-tensor input scales
  activation_scale_ub: float | None = None  # fbgemm_fp8: the dynamic scale's upper bound


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int
  rms_norm_eps: float = 1e-5
  rope: RopeConfig = RopeConfig()
  qkv_bias: bool = False
  tie_word_embeddings: bool = False
  sliding_window: int | None = None
  num_experts: int = 0          # 0: dense MLP
  num_experts_per_tok: int = 0
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  name: str = ""
  quantization: Quantization | None = None

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  @property
  def q_per_kv(self) -> int:
    return self.num_heads // self.num_kv_heads

  def num_params(self) -> int:
    """Parameters touched per token (for MoE: only the routed experts), as in the paper's optimum."""
    h, i = self.hidden_size, self.intermediate_size
    attn = h * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim + self.num_heads * self.head_dim * h
    mlp = 3 * h * i * (self.num_experts_per_tok if self.is_moe else 1)
    router = h * self.num_experts if self.is_moe else 0
    head = h * self.vocab_size
    return self.num_layers * (attn + mlp + router + 2 * h) + head + h

  def kv_bytes_per_token(self, dtype_bytes: int) -> int:
    return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

  def to_hf_dict(self) -> dict[str, Any]:
    """A transformers-5-style config.json for this shape (used for named shapes and tests)."""
    arch = {v: k for k, v in ARCHITECTURES.items()}[self.model_type]
    rope = {"rope_type": self.rope.type, "rope_theta": self.rope.theta}
    if self.rope.type == "linear":
      rope["factor"] = self.rope.factor
    if self.rope.type == "llama3":
      rope.update(factor=self.rope.factor, low_freq_factor=self.rope.low_freq_factor,
                  high_freq_factor=self.rope.high_freq_factor,
                  original_max_position_embeddings=self.rope.original_max_position_embeddings)
    d = {
        "architectures": [arch], "model_type": self.model_type, "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
        "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
        "rope_parameters": rope, "tie_word_embeddings": self.tie_word_embeddings,
        "sliding_window": self.sliding_window, "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        "hidden_act": "silu",
    }
    if self.model_type == "qwen2":
      d["use_sliding_window"] = self.sliding_window is not None
    if self.is_moe:
      d.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok)
    return d


def _rope_from_hf(d: dict[str, Any]) -> RopeConfig:
  # transformers 5.x: everything under `rope_parameters`; 4.x: `rope_theta` + optional `rope_scaling`.
  params = d.get("rope_parameters") or {}
  if not params:
    params = dict(d.get("rope_scaling") or {})
    params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default")) or "default"
  if rope_type not in ROPE_TYPES:
    raise ConfigError(f"unsupported RoPE type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
  return RopeConfig(
      theta=float(params.get("rope_theta", d.get("rope_theta", 10000.0))),
      type=rope_type,
      factor=float(params.get("factor", 1.0)),
      low_freq_factor=float(params.get("low_freq_factor", 1.0)),
      high_freq_factor=float(params.get("high_freq_factor", 4.0)),
      original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
  )


def _eos_ids(value) -> tuple[int, ...]:
  if value is None:
    return ()
  if isinstance(value, int):
    return (value,)
  return tuple(int(v) for v in value)


def from_hf_dict(d: dict[str, Any], name: str = "") -> ModelConfig:
  archs = d.get("architectures") or []
  model_type = d.get("model_type")
  if archs and archs[0] in ARCHITECTURES:
    model_type = ARCHITECTURES[archs[0]]
  elif model_type not in MODEL_TYPES:
    raise ConfigError(f"unknown architecture {archs[0] if archs else model_type!r}; supported: "
                      f"{', '.join(ARCHITECTURES)}")
  act = d.get("hidden_act", "silu")
  if act != "silu":
    raise ConfigError(f"unsupported hidden_act {act!r} (only silu)")
  try:
    hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    kv_heads = int(d.get("num_key_value_heads") or heads)
    head_dim = int(d.get("head_dim") or hidden // heads)
    sliding = d.get("sliding_window")
    if model_type == "qwen2" and not d.get("use_sliding_window", False):
      sliding = None
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        rope=_rope_from_hf(d),
        qkv_bias=model_type == "qwen2" or bool(d.get("attention_bias", False)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        sliding_window=int(sliding) if sliding else None,
        num_experts=int(d.get("num_local_experts", 0)) if model_type == "mixtral" else 0,
        num_experts_per_tok=int(d.get("num_experts_per_tok", 0)) if model_type == "mixtral" else 0,
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=_eos_ids(d.get("eos_token_id")),
        name=name,
    )
  except KeyError as e:
    raise ConfigError(f"config.json lacks {e.args[0]!r}") from None
  if d.get("quantization_config") is not None:
    cfg = dataclasses.replace(cfg, quantization=quantization_from_hf(d["quantization_config"], cfg))
  if cfg.num_heads % cfg.num_kv_heads:
    raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
  return cfg


# Modules a published checkpoint may leave unquantized: ours are the same (the LM head stays in bf16).
_UNQUANTIZED_OK = ("lm_head", "re:.*lm_head")


def quantization_from_hf(qc: Any, cfg: ModelConfig) -> Quantization:
  """The checkpoint's `quantization_config`, where we run it exactly; ConfigError naming the scheme
  otherwise (nothing is loaded then). Exact means: e4m3 weights with a scale per tensor or per output channel,
  activations per token (dynamic) or per tensor (static input scales), every dense layer quantized."""
  if not isinstance(qc, dict):
    raise ConfigError("quantization_config must be an object")
  method = qc.get("quant_method")
  if method == "fbgemm_fp8":
    extra = [m for m in qc.get("modules_to_not_convert") or [] if m not in _UNQUANTIZED_OK]
    if extra:
      raise ConfigError(f"fbgemm_fp8 checkpoint leaves {extra[0]!r} unquantized; mixed fp8/bf16 layers are not "
                        "supported")
    ub = qc.get("activation_scale_ub")
    return Quantization(source="fbgemm_fp8", weight_strategy="channel",
                        activation_scale_ub=float(ub) if ub is not None else None)
  if method == "compressed-tensors":
    fmt = qc.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
      raise ConfigError(f"compressed-tensors format {fmt!r} is not supported (only float-quantized fp8)")
    extra = [m for m in qc.get("ignore") or [] if m not in _UNQUANTIZED_OK]
    if extra:
      raise ConfigError(f"compressed-tensors checkpoint leaves {extra[0]!r} unquantized; mixed fp8/bf16 layers "
                        "are not supported")
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
      raise ConfigError(f"compressed-tensors with {len(groups)} config groups is not supported (only one)")
    g = groups[0]
    w, a = g.get("weights") or {}, g.get("input_activations")
    def fp8(t):
      return t.get("num_bits") == 8 and t.get("type") == "float" and t.get("symmetric", True)
    if not fp8(w) or w.get("strategy") not in ("tensor", "channel") or w.get("dynamic"):
      raise ConfigError(f"compressed-tensors weights {_describe(w)} are not supported (only fp8 e4m3, static, "
                        "per tensor or per channel; int4/int8 and block-wise schemes are not)")
    if a is None:
      raise ConfigError("compressed-tensors weight-only fp8 (no input_activations) is not supported: W8A8 only")
    if not fp8(a) or (a.get("dynamic") and a.get("strategy") != "token") or \
       (not a.get("dynamic") and a.get("strategy") != "tensor"):
      raise ConfigError(f"compressed-tensors input activations {_describe(a)} are not supported (fp8 per token "
                        "dynamic, or per tensor static)")
    return Quantization(source="compressed-tensors", weight_strategy=w["strategy"],
                        static_input_scales=not a.get("dynamic"))
  if method == "fp8" and qc.get("weight_block_size"):
    raise ConfigError(f"block-wise fp8 (weight_block_size {qc['weight_block_size']}) is not supported")
  raise ConfigError(f"quantization method {method!r} is not supported (supported: compressed-tensors "
                    "float-quantized fp8, fbgemm_fp8; or quantization='fp8' on a bf16/fp16 checkpoint)")


def _describe(t: dict) -> str:
  return "(" + ", ".join(f"{k}={t.get(k)}" for k in ("num_bits", "type", "strategy", "dynamic") if k in t) + ")"


def load_hf_config(path: str) -> ModelConfig:
  """Reads `config.json` from a model directory (HF or converted)."""
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  try:
    with open(file) as f:
      d = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"no config.json in {path}") from None
  except json.JSONDecodeError as e:
    raise ConfigError(f"{file} is not valid JSON: {e}") from None
  return from_hf_dict(d, name=os.path.basename(os.path.normpath(path)))


def _shape(model_type, vocab, hidden, inter, layers, heads, kv, max_len, theta, eps=1e-5, **kw):
  return ModelConfig(model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                     num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
                     max_position_embeddings=max_len, rms_norm_eps=eps, rope=kw.pop("rope", RopeConfig(theta)),
                     **kw)


_LLAMA3_ROPE = RopeConfig(theta=500000.0, type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192)

# Real model shapes for benchmarks with random weights (values from the models' config.json).
NAMED_SHAPES: dict[str, ModelConfig] = {
    "llama-2-7b": _shape("llama", 32000, 4096, 11008, 32, 32, 32, 4096, 10000.0, bos_token_id=1,
                         eos_token_ids=(2,), name="llama-2-7b"),
    "llama-2-70b": _shape("llama", 32000, 8192, 28672, 80, 64, 8, 4096, 10000.0, bos_token_id=1,
                          eos_token_ids=(2,), name="llama-2-70b"),
    "llama-3-8b": _shape("llama", 128256, 4096, 14336, 32, 32, 8, 8192, 500000.0, rope=_LLAMA3_ROPE,
                         bos_token_id=128000, eos_token_ids=(128001, 128009), name="llama-3-8b"),
    "llama-3-70b": _shape("llama", 128256, 8192, 28672, 80, 64, 8, 8192, 500000.0, rope=_LLAMA3_ROPE,
                          bos_token_id=128000, eos_token_ids=(128001, 128009), name="llama-3-70b"),
    "mixtral-8x7b": _shape("mixtral", 32000, 4096, 14336, 32, 32, 8, 32768, 1e6, num_experts=8,
                           num_experts_per_tok=2, bos_token_id=1, eos_token_ids=(2,), name="mixtral-8x7b"),
    "qwen2-72b": _shape("qwen2", 152064, 8192, 29568, 80, 64, 8, 32768, 1e6, eps=1e-6, qkv_bias=True,
                        bos_token_id=None, eos_token_ids=(151645, 151643), name="qwen2-72b"),
}


def tiny_config() -> ModelConfig:
  """The built-in CPU default: LLaMA-3-style (GQA, llama3 RoPE), byte-level tokenizer, max length 8192."""
  from nanoflow_jax import tokenizer  # the tiny model's vocabulary is the built-in tokenizer's
  return _shape("llama", tokenizer.TINY_VOCAB_SIZE, 128, 384, 4, 4, 2, 8192, 500000.0, rope=_LLAMA3_ROPE,
                bos_token_id=tokenizer.TINY_BOS_ID, eos_token_ids=(tokenizer.TINY_EOS_ID,), name="tiny")


def named_shape(name: str) -> ModelConfig | None:
  if name == "tiny":
    return tiny_config()
  return NAMED_SHAPES.get(name)


def known_names() -> list[str]:
  return ["tiny", *NAMED_SHAPES]
