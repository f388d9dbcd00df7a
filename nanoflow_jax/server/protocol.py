"""OpenAI request parsing (with the errors OpenAI and vLLM users expect) and response bodies."""
from __future__ import annotations

import dataclasses
import math
import time
import uuid
from typing import Any

from nanoflow_jax.outputs import Logprob
from nanoflow_jax.sampling_params import INT32_MAX, MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingParams

FLOAT32_MAX = 3.4e38               # the sampler's parameters are float32 on the device
SEED_RANGE = (-2**63, 2**64 - 1)   # int64 or uint64, as OpenAI and vLLM clients send seeds


class ApiError(Exception):
  def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None, headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
    self.headers = headers or {}

  def body(self) -> dict[str, Any]:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code or str(self.status)}}


def _num(body, name, default, lo=None, hi=None, integer=False, nullable=True):
  v = body.get(name, default)
  if v is None:
    if nullable:
      return default
    raise ApiError(400, f"'{name}' must not be null", param=name)
  ok_types = (int,) if integer else (int, float)
  if isinstance(v, bool) or not isinstance(v, ok_types):
    raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {type(v).__name__}",
                   param=name)
  if integer and hi is None:
    hi = INT32_MAX   # every integer the engine keeps lives in an int32 array
  if isinstance(v, float) and not math.isfinite(v):   # (json reads 1e999 as inf)
    raise ApiError(400, f"'{name}' must be a finite number", param=name)
  if (lo is not None and v < lo) or (hi is not None and v > hi):
    rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
    raise ApiError(400, f"'{name}' must be in {rng}, got {v}", param=name)
  return v


def _bool(body, name, default=False):
  v = body.get(name, default)
  if v is None:
    return default
  if not isinstance(v, bool):
    raise ApiError(400, f"'{name}' must be a boolean", param=name)
  return v


def _stop(body):
  v = body.get("stop")
  if v is None:
    return []
  if isinstance(v, str):
    v = [v]
  if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v) or len(v) > 16:
    raise ApiError(400, "'stop' must be a non-empty string or a list of at most 16 of them", param="stop")
  return v


def _int_list(body, name):
  v = body.get(name)
  if v is None:
    return []
  if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT32_MAX
                                        for t in v):
    raise ApiError(400, f"'{name}' must be a list of token ids in [0, {INT32_MAX}]", param=name)
  return v


def sampling_params(body: dict[str, Any], chat: bool) -> SamplingParams:
  """Builds SamplingParams from an OpenAI/vLLM request body."""
  max_tokens = body.get("max_completion_tokens") if chat and body.get("max_completion_tokens") is not None \
      else body.get("max_tokens")
  name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
  max_tokens = _num({name: max_tokens}, name, None if chat else 16, lo=1, integer=True)
  if chat:
    want = _bool(body, "logprobs")
    top = _num(body, "top_logprobs", 0, lo=0, hi=MAX_LOGPROBS, integer=True)
    if top and not want:
      raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    logprobs = top if want else None
  else:
    logprobs = _num(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS, integer=True)
  temperature = _num(body, "temperature", 1.0, lo=0, hi=2)
  top_k = _num(body, "top_k", -1, lo=-1, integer=True)
  try:
    return SamplingParams(
        n=_num(body, "n", 1, lo=1, hi=64, integer=True),
        temperature=temperature,
        top_p=_num(body, "top_p", 1.0, lo=0, hi=1),
        top_k=top_k,
        min_p=_num(body, "min_p", 0.0, lo=0, hi=1),
        repetition_penalty=_num(body, "repetition_penalty", 1.0, lo=0, hi=FLOAT32_MAX),
        presence_penalty=_num(body, "presence_penalty", 0.0, lo=-2, hi=2),
        frequency_penalty=_num(body, "frequency_penalty", 0.0, lo=-2, hi=2),
        seed=_num(body, "seed", None, lo=SEED_RANGE[0], hi=SEED_RANGE[1], integer=True),
        max_tokens=max_tokens,
        min_tokens=_num(body, "min_tokens", 0, lo=0, integer=True),
        stop=_stop(body),
        stop_token_ids=_int_list(body, "stop_token_ids"),
        ignore_eos=_bool(body, "ignore_eos"),
        logprobs=logprobs,
        skip_special_tokens=_bool(body, "skip_special_tokens", True),
        include_stop_str_in_output=_bool(body, "include_stop_str_in_output"),
        structured_outputs=structured_outputs_of(body),
        logit_bias=_logit_bias(body),
        prompt_logprobs=_num(body, "prompt_logprobs", None, lo=0, hi=MAX_LOGPROBS, integer=True),
    )
  except ValueError as e:  # cross-field checks (e.g. min_tokens > max_tokens, top_p = 0)
    raise ApiError(400, str(e)) from None


def _logit_bias(body: dict[str, Any]) -> dict[int, float] | None:
  """OpenAI's logit_bias: {"token id": bias in [-100, 100]}, at most 300 entries."""
  v = body.get("logit_bias")
  if v is None or v == {}:
    return None
  bad = ApiError(400, "'logit_bias' must map token ids (strings of digits) to numbers in [-100, 100], at most "
                 f"{MAX_LOGIT_BIAS}", param="logit_bias")
  if not isinstance(v, dict) or len(v) > MAX_LOGIT_BIAS:
    raise bad
  out = {}
  for k, b in v.items():
    if not (isinstance(k, str) and k.isdigit() and len(k) <= 10) or isinstance(b, bool) \
        or not isinstance(b, (int, float)) or not -100 <= b <= 100:
      raise bad
    out[int(k)] = float(b)
  return out


GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs_of(body: dict[str, Any]) -> dict | None:
  """The request's output constraint: OpenAI's response_format (json_object, json_schema), vLLM's guided_*
  fields or its structured_outputs; at most one of them."""
  specs = []
  rf = body.get("response_format")
  if rf is not None:
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
      raise ApiError(400, "'response_format.type' must be text, json_object or json_schema", param="response_format")
    if kind == "json_object":
      specs.append(("response_format", {"json_object": True}))
    elif kind == "json_schema":
      js = rf.get("json_schema")
      if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
        raise ApiError(400, "'response_format.json_schema.schema' must be a JSON schema object", param="response_format")
      specs.append(("response_format", {"json": js["schema"]}))
  for field, kind in GUIDED.items():
    if body.get(field) is not None:
      specs.append((field, {kind: body[field]}))
  if body.get("structured_outputs") is not None:
    specs.append(("structured_outputs", body["structured_outputs"]))
  if len(specs) > 1:
    raise ApiError(400, f"one output constraint at most; got {', '.join(f for f, _ in specs)}", param=specs[1][0])
  return specs[0][1] if specs else None


# The request fields each route honors. Anything else is refused with a 400 that names it: a feature we do
# not implement must never be silently ignored (OpenAI answers unknown fields with a 400 too).
SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
                   "presence_penalty", "frequency_penalty", "seed", "user", "top_k", "min_p", "repetition_penalty",
                   "min_tokens", "stop_token_ids", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
                   "response_format", "structured_outputs", "prompt_logprobs", "return_token_ids", *GUIDED}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "logprobs", "echo", "best_of", "suffix", "logit_bias"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "best_of",
                                 "logit_bias", "response_format", "tools", "tool_choice", "parallel_tool_calls"}
# Known fields whose feature is not implemented: accepted only at their neutral value.
NEUTRAL = {
    "echo": lambda v: v in (None, False),
    "suffix": lambda v: v in (None, ""),
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),
}


def check_fields(body: dict[str, Any], chat: bool) -> None:
  """400 for a field this route does not know, or a known one whose feature we do not implement."""
  known = CHAT_FIELDS if chat else COMPLETION_FIELDS
  unknown = sorted(k for k in body if k not in known)
  if unknown:
    raise ApiError(400, f"unknown or unsupported field {unknown[0]!r}" + (
        f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""), param=unknown[0])
  for name, neutral in NEUTRAL.items():
    if name in body and not neutral(body[name]):
      raise ApiError(400, f"'{name}' is not supported yet (only its default is accepted)", param=name)
  best_of = body.get("best_of")
  n = body.get("n") if isinstance(body.get("n"), int) else 1
  if best_of is not None and best_of != n:
    raise ApiError(400, "'best_of' other than n is not supported (each of the n samples is returned)",
                   param="best_of")


def prompts_of(body: dict[str, Any]) -> list[str | list[int]]:
  """`prompt` as a string, a list of strings, a list of token ids or a list of lists of ids."""
  p = body.get("prompt")
  is_ids = lambda x: isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
  if isinstance(p, str):
    return [p]
  if is_ids(p):
    return [p]
  if isinstance(p, list) and p and all(isinstance(x, str) or is_ids(x) for x in p):
    return p
  raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                 param="prompt")


def messages_of(body: dict[str, Any]) -> list[dict[str, Any]]:
  msgs = body.get("messages")
  if not isinstance(msgs, list) or not msgs:
    raise ApiError(400, "'messages' must be a non-empty list", param="messages")
  out = []
  for i, m in enumerate(msgs):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
      raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", param="messages")
    content = m.get("content")
    if isinstance(content, list):  # content parts: keep the text ones
      if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str) for c in content):
        raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
      content = "".join(c["text"] for c in content)
    if content is not None and not isinstance(content, str):
      raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
    out.append({**m, "content": content or ""})
  return out


def prompt_logprobs_body(tokenizer, plp: list | None) -> list | None:
  """vLLM's prompt_logprobs: None for the first token, then {token id: {"logprob", "decoded_token"}} with the
  prompt's token and the top-N at each position."""
  if plp is None:
    return None
  out = []
  for lp in plp:
    if lp is None:
      out.append(None)
      continue
    entries = {**lp.top, lp.token_id: lp.logprob}
    out.append({str(t): {"logprob": v, "decoded_token": tokenizer.decode([t], skip_special_tokens=False)}
                for t, v in entries.items()})
  return out


def stream_options(body) -> bool:
  so = body.get("stream_options")
  if so is None:
    return False
  if not isinstance(so, dict):
    raise ApiError(400, "'stream_options' must be an object", param="stream_options")
  return bool(so.get("include_usage", False))


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
  return int(time.time())


# --- logprobs formats -----------------------------------------------------------------------------
def completion_logprobs(tokenizer, lps: list[Logprob], text_offset: int = 0) -> dict[str, Any]:
  tokens, token_lps, tops, offsets = [], [], [], []
  off = text_offset
  for lp in lps:
    tok = tokenizer.decode([lp.token_id], skip_special_tokens=False)
    tokens.append(tok)
    token_lps.append(lp.logprob)
    tops.append({tokenizer.decode([i], skip_special_tokens=False): v for i, v in lp.top.items()} or None)
    offsets.append(off)
    off += len(tok)
  return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer, lps: list[Logprob]) -> dict[str, Any]:
  def entry(tid, v):
    tok = tokenizer.decode([tid], skip_special_tokens=False)
    return {"token": tok, "logprob": v, "bytes": list(tok.encode("utf-8"))}
  return {"content": [{**entry(lp.token_id, lp.logprob),
                       "top_logprobs": [entry(i, v) for i, v in lp.top.items()]} for lp in lps]}


@dataclasses.dataclass
class Usage:
  prompt_tokens: int = 0
  completion_tokens: int = 0
  cached_tokens: int = 0     # prompt tokens whose KV the prefix cache held

  def body(self):
    return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

  def add_final(self, index: int, n: int, delta) -> None:
    """A sample's last delta: its output tokens, and (once per prompt: its first sample's) the cached ones."""
    self.completion_tokens += delta.num_output_tokens
    if index % n == 0:
      self.cached_tokens += delta.num_cached_tokens
