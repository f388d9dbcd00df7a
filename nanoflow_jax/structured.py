"""Structured output through llguidance (a well-kept grammar engine; we write no grammar code ourselves).

A request's constraint (`SamplingParams.structured_outputs`, vLLM's StructuredOutputsParams as a dict: exactly
one of json, json_object, regex, choice, grammar) becomes an llguidance grammar; each constrained sequence gets
a matcher. The host fills the allowed-token bitmask of a sequence's next token before the step that samples it
is dispatched (a constrained sequence never has a token in flight then: the scheduler waits for it), and the
sampler masks the logits on the device. Unconstrained sequences in the same batch are not held up.
"""
from __future__ import annotations

import functools
import json
import re

import numpy as np

KINDS = ("json", "json_object", "regex", "choice", "grammar")


class StructuredOutputError(ValueError):
  """A constraint that cannot be compiled (the request's 400)."""


def check_spec(spec: dict) -> None:
  if not isinstance(spec, dict):
    raise StructuredOutputError(f"structured_outputs must be a dict with one of {KINDS}, got {type(spec).__name__}")
  given = [k for k in KINDS if spec.get(k) not in (None, False)]
  unknown = sorted(set(spec) - set(KINDS) - {"whitespace_flexible"})
  if unknown:
    raise StructuredOutputError(f"structured_outputs: unknown field(s) {unknown}; known: {KINDS}")
  if len(given) != 1:
    raise StructuredOutputError(f"structured_outputs takes exactly one of {KINDS}, got {given or 'none'}")
  if "choice" in given and (not isinstance(spec["choice"], list) or not spec["choice"]
                            or not all(isinstance(c, str) for c in spec["choice"])):
    raise StructuredOutputError("structured_outputs.choice must be a non-empty list of strings")


def grammar_for(spec: dict) -> str:
  """The llguidance grammar of a constraint. JSON is compact unless whitespace_flexible (a model with random
  weights could otherwise emit whitespace forever)."""
  import llguidance
  check_spec(spec)
  options = {"whitespace_flexible": bool(spec.get("whitespace_flexible", False))}
  try:
    if spec.get("json") is not None:
      schema = spec["json"]
      if isinstance(schema, str):
        schema = json.loads(schema)
      return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
    if spec.get("json_object"):
      return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=options)
    if spec.get("regex") is not None:
      return llguidance.LLMatcher.grammar_from_regex(spec["regex"])
    if spec.get("choice") is not None:
      return llguidance.LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in spec["choice"]))
    return llguidance.LLMatcher.grammar_from_lark(spec["grammar"])
  except (ValueError, TypeError) as e:
    raise StructuredOutputError(f"structured_outputs: {e}") from e


@functools.lru_cache(maxsize=8)
def _ll_tokenizer(tokenizer, vocab_size: int):
  """llguidance's view of our tokenizer: tokenizers' JSON where we have it, else each id's bytes."""
  import llguidance
  eos = list(tokenizer.eos_ids) or None
  raw = getattr(tokenizer, "_tok", None)
  if raw is not None and hasattr(raw, "to_str"):
    return llguidance.LLTokenizer(raw.to_str(), n_vocab=vocab_size, eos_token=eos)
  raise StructuredOutputError("structured output needs a tokenizer.json tokenizer (this model's is sentencepiece)")


class Matcher:
  """One sequence's grammar state."""

  def __init__(self, tokenizer, vocab_size: int, grammar: str):
    import llguidance
    self.vocab_size = vocab_size
    self.m = llguidance.LLMatcher(_ll_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
    if self.m.is_error():
      raise StructuredOutputError(f"structured_outputs: {self.m.get_error()}")

  @staticmethod
  def words(vocab_size: int) -> int:
    return -(-vocab_size // 32)

  def fill_bitmask(self, out: np.ndarray) -> None:
    """out int32 [words]: bit t of word t // 32 set where token t may come next."""
    mask = np.frombuffer(self.m.compute_bitmask(), dtype=np.int32)
    out[:] = 0
    out[:min(len(mask), len(out))] = mask[:len(out)]

  def consume(self, token: int) -> None:
    self.m.consume_token(token)

  @property
  def done(self) -> bool:
    """The grammar is complete and admits nothing more (the sequence ends here)."""
    return self.m.is_stopped()

  @property
  def error(self) -> str | None:
    return self.m.get_error() if self.m.is_error() else None


def apply_bitmask(logits, bitmask):
  """logits [S, V] with every token whose bit is clear in bitmask [S, ceil(V/32)] (int32) set to -inf."""
  import jax.numpy as jnp
  v = logits.shape[-1]
  ids = jnp.arange(v)
  bits = (bitmask[:, ids // 32] >> (ids % 32).astype(jnp.int32)) & 1
  return jnp.where(bits.astype(bool), logits, -jnp.inf)
