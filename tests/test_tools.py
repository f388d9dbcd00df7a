"""Tool calling: the parsers of the families we serve, the streaming hold-back, and (live server, official client)
named and required tool choices enforced through structured output, in full responses and streamed."""
import json

import pytest

from nanoflow_jax.server import tools
from nanoflow_jax.server.protocol import ApiError
from server_process import GREEDY

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer",
                                                                                             "minimum": 1, "maximum": 7}},
                                                "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"], "additionalProperties": False}}}


@pytest.mark.parametrize("parser,text,content,calls", [
    ("hermes", 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'
     '<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>', "Let me look.",
     [("get_weather", {"city": "Oslo", "days": 2}), ("get_time", {"tz": "UTC"})]),
    ("hermes", "No call here.", "No call here.", []),
    ("hermes", "<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    ("mistral", '[TOOL_CALLS][{"name": "get_time", "arguments": {"tz": "CET"}}]', None, [("get_time", {"tz": "CET"})]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 1}}; '
     '{"name": "get_time", "parameters": {"tz": "UTC"}}', None,
     [("get_weather", {"city": "Paris", "days": 1}), ("get_time", {"tz": "UTC"})]),
    ("llama3_json", "It is sunny.", "It is sunny.", []),
])
def test_parsers(parser, text, content, calls):
  got_content, got = tools.parse(parser, text)
  assert got_content == content
  assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
  assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got)


def test_streaming_holds_back_only_what_may_be_a_call():
  req = tools.ToolRequest([WEATHER], "auto", None, "hermes")
  assert req.holds_back("Hello") == 5
  assert req.holds_back("Hello <tool") == 6            # a marker may be starting
  assert req.holds_back("Hello <tool_call>{") == 6
  assert tools.ToolRequest([WEATHER], "auto", None, "llama3_json").holds_back(' {"name"') == 0
  assert tools.ToolRequest([WEATHER], "required", None, None).holds_back("[") == 0


def test_bad_tool_requests():
  for body in ({"tools": [{"type": "function"}]}, {"tools": [WEATHER], "tool_choice": "always"},
               {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
               {"tool_choice": "required"}, {"tools": [WEATHER], "tool_choice": "auto"}):
    with pytest.raises(ApiError):
      tools.tool_request(body, None)
  assert tools.tool_request({"tools": [WEATHER], "tool_choice": "none"}, None).template_tools is None


def _weather(args):
  a = json.loads(args)
  assert a["city"] in ("Paris", "Oslo") and 1 <= a["days"] <= 7


def test_named_and_required_tool_choice_through_the_official_client(client):
  chat = [{"role": "user", "content": "Weather in Oslo?"}]
  named = {"type": "function", "function": {"name": "get_weather"}}
  r = client.chat.completions.create(model="tiny-test", messages=chat, tools=[WEATHER, TIME], tool_choice=named,
                                     max_tokens=60, temperature=1.0, seed=2)
  c = r.choices[0]
  assert c.finish_reason == "tool_calls" and c.message.content is None
  assert [t.function.name for t in c.message.tool_calls] == ["get_weather"]
  _weather(c.message.tool_calls[0].function.arguments)
  r = client.chat.completions.create(model="tiny-test", messages=chat, tools=[WEATHER, TIME], tool_choice="required",
                                     parallel_tool_calls=False, max_tokens=80, temperature=1.0, seed=3)
  calls = r.choices[0].message.tool_calls
  assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
  assert calls[0].function.name in ("get_weather", "get_time")
  stream = client.chat.completions.create(model="tiny-test", messages=chat, tools=[WEATHER], tool_choice=named,
                                          max_tokens=60, temperature=1.0, seed=2, stream=True)
  deltas = [ch.choices[0] for ch in stream if ch.choices]
  streamed = [t for d in deltas for t in (d.delta.tool_calls or [])]
  assert len(streamed) == 1 and streamed[0].function.name == "get_weather" and deltas[-1].finish_reason == "tool_calls"
  _weather(streamed[0].function.arguments)
  assert not any(d.delta.content for d in deltas)
  r = client.chat.completions.create(model="tiny-test", messages=chat, tools=[WEATHER], tool_choice="none",
                                     max_tokens=4, **GREEDY)
  assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"
