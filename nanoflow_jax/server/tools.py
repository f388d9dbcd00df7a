"""Tool calling for chat completions: the request's tools and tool_choice, the output parsers of the families we
serve, and the streaming split of content from calls.

- `tools` reach the chat template as transformers' `apply_chat_template(tools=...)` passes them (not with
  tool_choice "none").
- tool_choice "auto" needs a parser (serve --tool_call_parser, as vLLM's --tool-call-parser): hermes
  (Qwen2.5 / Hermes `<tool_call>{...}</tool_call>`), llama3_json (LLaMA-3.1: a JSON object with "name" and
  "parameters", optionally after `<|python_tag|>`, several joined by ";"), mistral (`[TOOL_CALLS][{...}, ...]`).
- "required" and a named function are enforced through structured output: the model writes JSON that the
  schema admits (a list of {name, arguments} for "required"; the arguments object for a named function), so the
  call parses whatever the family.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

from nanoflow_jax.server.protocol import ApiError

PARSERS = ("hermes", "llama3_json", "mistral")


class ToolRequest:
  """The request's tools and what tool_choice asks of the output."""

  def __init__(self, tools: list[dict], choice: str, name: str | None, parser: str | None):
    self.tools, self.choice, self.name, self.parser = tools, choice, name, parser
    self.single = False   # parallel_tool_calls false: one call at most

  @property
  def template_tools(self) -> list[dict] | None:
    return self.tools if self.choice != "none" else None

  def structured_outputs(self) -> dict | None:
    """The constraint that enforces "required" or a named function; None for auto and none."""
    if self.choice == "named":
      params = next(t["function"].get("parameters") or {"type": "object"} for t in self.tools
                    if t["function"]["name"] == self.name)
      return {"json": params}
    if self.choice == "required":
      items = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                 "arguments": t["function"].get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for t in self.tools]
      return {"json": {"type": "array", "minItems": 1, **({"maxItems": 1} if self.single else {}),
                       "items": {"anyOf": items}}}
    return None

  def split_calls(self, text: str) -> tuple[str | None, list[dict]]:
    content, calls = self.split(text)
    return content, calls[:1] if self.single else calls

  def split(self, text: str) -> tuple[str | None, list[dict]]:
    """The finished output as (content, tool calls in OpenAI's form)."""
    if self.choice == "named":
      return None, [_call(self.name, _args(json.loads(text)))] if _is_json(text) else []
    if self.choice == "required":
      calls = json.loads(text) if _is_json(text) else []
      return None, [_call(c["name"], _args(c["arguments"])) for c in calls if isinstance(c, dict)]
    if self.choice == "auto" and self.parser:
      return parse(self.parser, text)
    return text, []

  def holds_back(self, text: str) -> int:
    """Streaming: how many characters at the start of `text` may go out as content now (the rest may be a call)."""
    if self.choice in ("named", "required"):
      return 0
    if self.choice != "auto" or not self.parser:
      return len(text)
    marker = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}.get(self.parser)
    if marker is None:   # llama3_json: a call is the whole output, from its first character
      stripped = text.lstrip()
      return 0 if not stripped or stripped[0] in "{<" else len(text)
    i = text.find(marker)
    if i >= 0:
      return i
    for k in range(min(len(marker) - 1, len(text)), 0, -1):   # a marker's start at the end: wait for more
      if text.endswith(marker[:k]):
        return len(text) - k
    return len(text)


def tool_request(body: dict[str, Any], parser: str | None) -> ToolRequest | None:
  """The request's tools, checked; None when it has none."""
  tools = body.get("tools")
  choice = body.get("tool_choice")
  if not tools:
    if choice not in (None, "none", "auto"):
      raise ApiError(400, "'tool_choice' needs 'tools'", param="tool_choice")
    return None
  if not isinstance(tools, list) or not all(
      isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
      and isinstance(t["function"].get("name"), str) and t["function"]["name"]
      and isinstance(t["function"].get("parameters", {}), dict) for t in tools):
    raise ApiError(400, "'tools' must be a list of {\"type\": \"function\", \"function\": {\"name\", \"parameters\"}}",
                   param="tools")
  names = [t["function"]["name"] for t in tools]
  name = None
  if choice is None:
    choice = "auto"
  if isinstance(choice, dict):
    fn = choice.get("function") if choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if name not in names:
      raise ApiError(400, f"'tool_choice' names no function of 'tools' ({', '.join(names)})", param="tool_choice")
    choice = "named"
  elif choice not in ("none", "auto", "required"):
    raise ApiError(400, "'tool_choice' must be none, auto, required or a named function", param="tool_choice")
  if choice == "auto" and parser is None:
    raise ApiError(400, "tool_choice 'auto' needs the server started with --tool_call_parser (hermes, llama3_json, "
                   "mistral); 'required' and a named function work without one", param="tool_choice")
  return ToolRequest(tools, choice, name, parser)


def _is_json(text: str) -> bool:
  try:
    json.loads(text)
    return True
  except ValueError:
    return False


def _args(a) -> str:
  return a if isinstance(a, str) else json.dumps(a, ensure_ascii=False)


def _call(name: str, arguments: str) -> dict:
  return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
          "function": {"name": name, "arguments": arguments}}


def _objects(text: str) -> list[Any]:
  """The JSON values written one after another in text (separated by whitespace, ";" or ",")."""
  dec, out, i = json.JSONDecoder(), [], 0
  while i < len(text):
    while i < len(text) and text[i] in " \t\r\n;,":
      i += 1
    if i >= len(text):
      break
    value, i = dec.raw_decode(text, i)
    out.append(value)
  return out


def parse(parser: str, text: str) -> tuple[str | None, list[dict]]:
  """(content, calls) of a finished output in `parser`'s format; text that is not a well-formed call stays
  content."""
  try:
    if parser == "hermes":
      bodies = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S)
      if not bodies:
        return text, []
      calls = [json.loads(b) for b in bodies]
      content = text[:text.find("<tool_call>")].strip() or None
      return content, [_call(c["name"], _args(c.get("arguments", {}))) for c in calls]
    if parser == "mistral":
      i = text.find("[TOOL_CALLS]")
      if i < 0:
        return text, []
      calls = [c for v in _objects(text[i + len("[TOOL_CALLS]"):]) for c in (v if isinstance(v, list) else [v])]
      return text[:i].strip() or None, [_call(c["name"], _args(c.get("arguments", {}))) for c in calls]
    if parser == "llama3_json":
      body = text.strip()
      body = body[len("<|python_tag|>"):] if body.startswith("<|python_tag|>") else body
      if not body.startswith("{"):
        return text, []
      calls = _objects(body)
      if not all(isinstance(c, dict) and "name" in c for c in calls):
        return text, []
      return None, [_call(c["name"], _args(c.get("parameters", c.get("arguments", {})))) for c in calls]
  except (ValueError, KeyError, TypeError):
    return text, []
  raise ValueError(f"unknown tool call parser {parser!r}; known: {PARSERS}")
