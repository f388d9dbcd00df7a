"""The decoder-only transformer family (LLaMA-2/3, Mistral, Qwen2, Mixtral) in Flax.

Each decoder layer exposes its operations one by one (attn_norm, qkv, rope, o, mlp_norm, gate_up,
act, down; router and experts for MoE) so the runtime can schedule them as nano-ops; attention itself
is not a layer method because it depends on how the KV state is kept (whole sequences here, pages in
the engine). `Transformer.__call__` is the plain forward pass over whole sequences: the reference.

Weight layouts (the converter produces them from Hugging Face's [out, in] tensors):
  qkv      [hidden, kv_heads, q_per_kv + 2, head_dim]  grouped by KV head, so that sharding the
                                                        kv_heads axis gives each device whole groups
  o        [heads, head_dim, hidden]
  gate_up  [hidden, 2, intermediate]                    sharding the last axis keeps gate/up pairs
  down     [intermediate, hidden]
  experts_gate_up [experts, hidden, 2, intermediate], experts_down [experts, intermediate, hidden]
  embedding [vocab, hidden]; lm_head [hidden, vocab] (absent when tied to the embedding)
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanoflow_jax import quantization
from nanoflow_jax.config import ModelConfig
from nanoflow_jax.models import layers

INIT_STD = 0.02  # transformers' initializer_range, for random weights


def _normal():
  return nn.initializers.normal(INIT_STD)


class DecoderLayer(nn.Module):
  cfg: ModelConfig
  dtype: Any = jnp.bfloat16

  def setup(self):
    c, p = self.cfg, self.dtype
    g = c.q_per_kv
    self.input_norm = self.param("input_norm", nn.initializers.ones, (c.hidden_size,), p)
    fp8 = {}
    self.qkv_w = self._dense("qkv", (c.hidden_size, c.num_kv_heads, g + 2, c.head_dim), fp8)
    if c.qkv_bias:
      self.qkv_b = self.param("qkv_bias", nn.initializers.zeros, (c.num_kv_heads, g + 2, c.head_dim), p)
    self.o_w = self._dense("o", (c.num_heads, c.head_dim, c.hidden_size), fp8)
    self.post_norm = self.param("post_attention_norm", nn.initializers.ones, (c.hidden_size,), p)
    if c.is_moe:
      self.router_w = self.param("router", _normal(), (c.hidden_size, c.num_experts), p)
      self.experts_gate_up_w = self.param(
          "experts_gate_up", _normal(), (c.num_experts, c.hidden_size, 2, c.intermediate_size), p)
      self.experts_down_w = self.param(
          "experts_down", _normal(), (c.num_experts, c.intermediate_size, c.hidden_size), p)
    else:
      self.gate_up_w = self._dense("gate_up", (c.hidden_size, 2, c.intermediate_size), fp8)
      self.down_w = self._dense("down", (c.intermediate_size, c.hidden_size), fp8)
    self.fp8 = fp8   # weight name -> layers.Fp8, for the weights held in fp8

  def _dense(self, name: str, shape: tuple, fp8: dict):
    """A dense weight: `name` in the model dtype, or with fp8 quantization `name_fp8` in e4m3 ([*out, K],
    quantization.py) with its scale (and the checkpoint's static input scale) recorded in `fp8`."""
    q = self.cfg.quantization
    if q is None:
      return self.param(name, _normal(), shape, self.dtype)
    w = self.param(quantization.fp8_name(name), _normal(), quantization.fp8_shape(name, shape), quantization.FP8)
    scale = self.param(quantization.scale_name(name), nn.initializers.ones, quantization.scale_shape(name, shape),
                       jnp.float32)
    inp = (self.param(quantization.input_scale_name(name), nn.initializers.ones, (), jnp.float32)
           if q.static_input_scales else None)
    fp8[name] = layers.Fp8(scale, inp, q.activation_scale_ub, row_parallel=name in ("o", "down"))
    return w

  # --- attention block -------------------------------------------------------------------------
  def attn_norm(self, x):
    """In fp8 possibly already quantized for qkv (layers.Fp8Rows), where the runtime fuses the two."""
    return layers.rms_norm_for(x, self.input_norm, self.cfg.rms_norm_eps, quantize_for=self.fp8.get("qkv"))

  def qkv(self, h):
    """[..., hidden] -> q [..., heads, hd], k, v [..., kv_heads, hd]."""
    c = self.cfg
    y = layers.linear(h, self.qkv_w, "...h,hkgd->...kgd", fp8=self.fp8.get("qkv"))
    if c.qkv_bias:
      y = y + self.qkv_b.astype(y.dtype)
    g = c.q_per_kv
    q = y[..., :g, :].reshape(*y.shape[:-3], c.num_heads, c.head_dim)
    return q, y[..., g, :], y[..., g + 1, :]

  def o(self, attn, residual=None):
    return layers.linear(attn, self.o_w, "...nd,ndh->...h", residual, fp8=self.fp8.get("o"))

  # --- MLP block --------------------------------------------------------------------------------
  def mlp_norm(self, x):
    """In fp8 (dense MLP) possibly already quantized for gate_up (layers.Fp8Rows); the experts' router reads
    the norm itself."""
    return layers.rms_norm_for(x, self.post_norm, self.cfg.rms_norm_eps,
                               quantize_for=None if self.cfg.is_moe else self.fp8.get("gate_up"))

  def gate_up_act(self, h):
    """silu(gate) * up [..., intermediate]: the gate_up GEMM and its activation (fused where the installed
    GEMM kernel fuses it; in fp8 possibly already quantized for `down`, as layers.Fp8Rows)."""
    return layers.linear_silu_mul(h, self.gate_up_w, "...h,hti->...ti", fp8=self.fp8.get("gate_up"),
                                  quantize_for=self.fp8.get("down"))

  def down(self, a, residual=None):
    return layers.linear(a, self.down_w, "...i,ih->...h", residual, fp8=self.fp8.get("down"))

  def router(self, h):
    """Top-k routing as Mixtral does it: softmax over all experts in fp32, top k, renormalize."""
    logits = layers.linear(h, self.router_w, "...h,he->...e").astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, ids = jax.lax.top_k(probs, self.cfg.num_experts_per_tok)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(h.dtype), ids.astype(jnp.int32)

  def experts(self, h, weights, ids):
    """Routed experts as two grouped GEMMs over the token copies sorted by expert (the first with the
    SiLU-and-multiply epilogue); layers.grouped_matmul runs the installed kernel or lax.ragged_dot."""
    c = self.cfg
    lead = h.shape[:-1]
    x = h.reshape(-1, c.hidden_size)
    k = c.num_experts_per_tok
    flat_ids = ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    token_of = order // k
    group_sizes = jnp.bincount(flat_ids, length=c.num_experts).astype(jnp.int32)
    xs = x[token_of]
    gu_w = self.experts_gate_up_w.reshape(c.num_experts, c.hidden_size, 2 * c.intermediate_size)
    a = layers.grouped_matmul(xs, gu_w, group_sizes, "silu_mul")
    y = layers.grouped_matmul(a, self.experts_down_w, group_sizes)
    y = y * weights.reshape(-1)[order][:, None]
    # Each token's k rows gathered back (the inverse of the sort) and summed: a scatter-add over token_of
    # would be an atomic read-modify-write per element on the GPU (a compare-and-swap loop in bf16).
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype), unique_indices=True)
    out = jnp.sum(y[rank].reshape(-1, k, c.hidden_size), axis=1, dtype=jnp.float32).astype(x.dtype)
    return out.reshape(*lead, c.hidden_size)

  def mlp(self, h, residual=None):
    if self.cfg.is_moe:
      out = self.experts(h, *self.router(h))
      return out if residual is None else out + residual
    return self.down(self.gate_up_act(h), residual)


class Transformer(nn.Module):
  cfg: ModelConfig
  dtype: Any = jnp.bfloat16

  def setup(self):
    c = self.cfg
    self.embedding = self.param("embedding", _normal(), (c.vocab_size, c.hidden_size), self.dtype)
    self.layers = [DecoderLayer(c, self.dtype, name=f"layers_{i}") for i in range(c.num_layers)]
    self.final_norm = self.param("final_norm", nn.initializers.ones, (c.hidden_size,), self.dtype)
    if not c.tie_word_embeddings:
      self.lm_head = self.param("lm_head", _normal(), (c.hidden_size, c.vocab_size), self.dtype)
    self.inv_freq = layers.rope_inv_freq(c.rope, c.head_dim)

  def embed(self, token_ids):
    return jnp.take(self.embedding, token_ids, axis=0)

  def rope(self, q, k, positions):
    return layers.apply_rope(q, positions, self.inv_freq), layers.apply_rope(k, positions, self.inv_freq)

  def logits(self, x):
    """Final norm and LM head; logits in fp32."""
    h = layers.rms_norm(x, self.final_norm, self.cfg.rms_norm_eps)
    if self.cfg.tie_word_embeddings:
      return jnp.einsum("...h,vh->...v", h, self.embedding, preferred_element_type=jnp.float32)
    return jnp.einsum("...h,hv->...v", h, self.lm_head, preferred_element_type=jnp.float32)

  def __call__(self, token_ids, lengths=None):
    """Plain forward over whole right-padded sequences [B, T] -> logits [B, T, vocab] (fp32)."""
    positions = jnp.broadcast_to(jnp.arange(token_ids.shape[1]), token_ids.shape)
    x = self.embed(token_ids)
    for layer in self.layers:
      q, k, v = layer.qkv(layer.attn_norm(x))
      q, k = self.rope(q, k, positions)
      attn = layers.causal_attention(q, k, v, self.cfg.sliding_window, lengths)
      x = x + layer.o(attn)
      x = x + layer.mlp(layer.mlp_norm(x))
    return self.logits(x)
