"""The OpenAI-compatible server, live on 127.0.0.1 with the tiny model, driven by the `openai` client."""
import asyncio
import json
import re
import threading
import time

import openai
import pytest

from server_process import GREEDY, KEY, ServerProcess, get as _get, metric as _metric, post as _post, wait_idle


@pytest.fixture(scope="module")
def reference():
  """The same tiny model offline: the server's greedy output must equal it."""
  from nanoflow_jax.llm import LLM
  return LLM("tiny", dense_batch=64, num_pages=256, max_num_seqs=4)


def test_completion_equals_offline_greedy(client, reference):
  from nanoflow_jax.sampling_params import SamplingParams
  r = client.completions.create(model="tiny-test", prompt="Hello world", max_tokens=12, **GREEDY)
  ref = reference.generate("Hello world", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
  assert r.choices[0].text == ref.text
  assert r.choices[0].finish_reason == "length"
  assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(reference.tokenizer.encode("Hello world"))


def test_the_server_compiled_every_step_size_before_listening(server, client):
  """--warm_up (the default): requests of every size find their step compiled; no step compiles after the server
  began listening, nor the sampler's common kinds; start-up's objects are frozen out of full collections.
  (The server is shared with other test files, whose requests may come first: only this test's part of the log
  is asked about compiles after start-up.)"""
  server.log.flush()
  server.log.seek(0)
  before = len(server.log.read())
  requests = [dict(temperature=0), dict(temperature=0, logprobs=1), dict(temperature=0.7),
              dict(temperature=0.7, logprobs=1), dict(temperature=0.7, top_p=0.9), dict(temperature=0.7, extra_body={"top_k": 5})]
  for n, kw in zip((5, 40, 100, 5, 40, 100), requests):   # every step size, the sampler's common kinds
    client.completions.create(model="tiny-test", prompt=[7] * n, max_tokens=3, **kw)
  server.log.flush()
  server.log.seek(0)
  log = server.log.read()
  assert "warmed up in" in log and log.index("warmed up in") < log.index("serving ")
  assert re.search(r"engine built in [0-9.]+ s; process peak memory [0-9.]+ GB", log[:log.index("serving ")])
  assert "compiled the step" in log[:log.index("serving ")]
  assert "compiled the step" not in log[log.index("serving "):]
  assert "compiled the sampler" not in log[before:], log[before:]
  assert "start-up objects" in log[:log.index("serving ")]   # frozen: full collections skip them (gc_policy)


def test_a_repeated_prompt_reports_its_cached_tokens(server, client):
  """Prefix caching is on by default: the second time a long prompt comes, its full pages are cached, as
  usage.prompt_tokens_details.cached_tokens and the metrics say; the text is the same."""
  prompt = "The same long system prompt, word after word, " * 6
  first = client.completions.create(model="tiny-test", prompt=prompt, max_tokens=4, **GREEDY)
  second = client.completions.create(model="tiny-test", prompt=prompt, max_tokens=4, **GREEDY)
  assert second.choices[0].text == first.choices[0].text
  assert first.usage.prompt_tokens_details.cached_tokens == 0
  cached = second.usage.prompt_tokens_details.cached_tokens
  assert 0 < cached < second.usage.prompt_tokens and cached % 16 == 0
  chat = [{"role": "user", "content": prompt}]
  client.chat.completions.create(model="tiny-test", messages=chat, max_tokens=2, **GREEDY)
  stream = client.chat.completions.create(model="tiny-test", messages=chat, max_tokens=2, stream=True,
                                          stream_options={"include_usage": True}, **GREEDY)
  usage = [c.usage for c in stream if c.usage is not None][-1]
  assert usage.prompt_tokens_details.cached_tokens > 0
  _, text = _get(server, "/metrics")
  assert _metric(server, "nanoflow_prefix_cache_hit_tokens_total") >= cached
  for name in ("nanoflow_prefix_cache_pages", "nanoflow_prefix_cache_hit_rate", "nanoflow_prefix_cache_evictions_total",
               "nanoflow_prefix_cache_queried_tokens_total"):
    assert name in text, name


def test_reset_prefix_cache_makes_a_cached_prompt_compute_again(server, client):
  """vLLM's POST /reset_prefix_cache: after it, the prompt cached a moment ago reports no cached tokens (and the
  same text); it needs the API key like every other route that is not a health check."""
  prompt = "A prompt that the reset must forget, word after word, " * 6
  first, hit = (client.completions.create(model="tiny-test", prompt=prompt, max_tokens=4, **GREEDY) for _ in range(2))
  assert hit.usage.prompt_tokens_details.cached_tokens > 0
  assert _post(server, "/reset_prefix_cache", b"", key=None)[0] == 401
  for path, data in (("/reset_prefix_cache?device=gpu", b""), ("/reset_prefix_cache", b'{"device": "cpu"}')):
    status, body, _ = _post(server, path, data)   # a parameter we do not implement: refused, named, nothing reset
    assert status == 400 and "device" in body["error"]["message"] and body["error"]["param"] == "device"
  assert _post(server, "/reset_prefix_cache", b"[1]")[0] == 400
  assert client.completions.create(model="tiny-test", prompt=prompt, max_tokens=4,
                                   **GREEDY).usage.prompt_tokens_details.cached_tokens > 0
  status, body, _ = _post(server, "/reset_prefix_cache", b"")
  assert (status, body) == (200, {"status": "ok"})
  again = client.completions.create(model="tiny-test", prompt=prompt, max_tokens=4, **GREEDY)
  assert again.usage.prompt_tokens_details.cached_tokens == 0
  assert again.choices[0].text == hit.choices[0].text == first.choices[0].text


SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "sunny": {"type": "boolean"},
                                          "deg": {"type": "integer", "minimum": -20, "maximum": 40}},
          "required": ["city", "sunny", "deg"], "additionalProperties": False}


def _valid(text):
  v = json.loads(text)
  assert set(v) == {"city", "sunny", "deg"} and v["city"] in ("Paris", "Rome", "Oslo")
  assert isinstance(v["sunny"], bool) and -20 <= v["deg"] <= 40
  return v


def test_structured_output_follows_the_schema_streamed_with_n_and_stop(client):
  """response_format json_schema (OpenAI) and guided_* (vLLM) on a random-weight model: every output parses and
  validates, streamed too, with n > 1; a stop string cuts the constrained text as it would any other."""
  rf = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}}
  chat = [{"role": "user", "content": "Weather?"}]
  r = client.chat.completions.create(model="tiny-test", messages=chat, max_tokens=80, n=3, temperature=1.0, seed=4,
                                     response_format=rf)
  assert len(r.choices) == 3 and all(c.finish_reason == "stop" for c in r.choices)
  for c in r.choices:
    _valid(c.message.content)
  stream = client.chat.completions.create(model="tiny-test", messages=chat, max_tokens=80, temperature=1.0, seed=5,
                                          response_format=rf, stream=True)
  _valid("".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices))
  r = client.completions.create(model="tiny-test", prompt="Pick:", max_tokens=10, temperature=1.0,
                                extra_body={"guided_choice": ["alpha", "beta"]})
  assert r.choices[0].text in ("alpha", "beta")
  r = client.completions.create(model="tiny-test", prompt="Code:", max_tokens=12, temperature=1.0,
                                extra_body={"guided_regex": "[0-9]{3}-[a-c]{2}"})
  assert re.fullmatch("[0-9]{3}-[a-c]{2}", r.choices[0].text)
  r = client.chat.completions.create(model="tiny-test", messages=chat, max_tokens=80, temperature=1.0, seed=4,
                                     response_format={"type": "json_object"})
  assert isinstance(json.loads(r.choices[0].message.content), dict)
  r = client.completions.create(model="tiny-test", prompt="W:", max_tokens=80, temperature=1.0, stop=[","],
                                extra_body={"guided_json": SCHEMA})
  assert r.choices[0].finish_reason == "stop" and r.choices[0].text.startswith('{"city":') and "," not in r.choices[0].text


def test_logit_bias_is_honored(client):
  """Issue 29's check: greedy with {"65": 100} yields token 65 ("A" in the tiny byte tokenizer); -100 bans it."""
  r = client.completions.create(model="tiny-test", prompt="Hello", max_tokens=4, logit_bias={"65": 100}, **GREEDY)
  assert r.choices[0].text == "AAAA"
  r = client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                     logit_bias={"66": 100}, **GREEDY)
  assert r.choices[0].message.content == "BBB"
  r = client.completions.create(model="tiny-test", prompt="Hello", max_tokens=4, logit_bias={"65": -100, "67": 100},
                                **GREEDY)
  assert r.choices[0].text == "CCCC"


def test_prompt_logprobs(server):
  st, body, _ = _post(server, "/v1/completions", json.dumps({"prompt": "Hello there", "max_tokens": 2,
                                                             "prompt_logprobs": 2, "temperature": 0}).encode())
  assert st == 200, body
  plp = body["choices"][0]["prompt_logprobs"]
  assert plp[0] is None and len(plp) == body["usage"]["prompt_tokens"]
  assert all(2 <= len(e) <= 3 and all(v["logprob"] <= 0 for v in e.values()) for e in plp[1:])
  st, body, _ = _post(server, "/v1/completions", json.dumps({"prompt": "x", "prompt_logprobs": 2, "stream": True}).encode())
  assert st == 400 and body["error"]["param"] == "prompt_logprobs"


def test_prompt_forms(client):
  r = client.completions.create(model="tiny-test", prompt=["a", "bb"], max_tokens=3, n=2, **GREEDY)
  assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
  ids = client.completions.create(model="tiny-test", prompt=[256, 104, 105], max_tokens=3, **GREEDY)
  text = client.completions.create(model="tiny-test", prompt="hi", max_tokens=3, **GREEDY)
  assert ids.choices[0].text == text.choices[0].text  # [BOS, 'h', 'i'] is "hi" tokenized


def test_streaming_equals_non_streaming(client):
  full = client.completions.create(model="tiny-test", prompt="Stream me", max_tokens=20, **GREEDY)
  chunks = list(client.completions.create(model="tiny-test", prompt="Stream me", max_tokens=20, stream=True,
                                          stream_options={"include_usage": True}, **GREEDY))
  assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
  assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_and_chat_streaming(client):
  msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
  full = client.chat.completions.create(model="tiny-test", messages=msgs, max_completion_tokens=10, **GREEDY)
  assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens == 10
  chunks = list(client.chat.completions.create(model="tiny-test", messages=msgs, max_tokens=10, stream=True,
                                               **GREEDY))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content


def test_n_and_seed(client):
  kw = dict(model="tiny-test", prompt="seed", max_tokens=10, temperature=1.0, extra_body={"ignore_eos": True})
  a = client.completions.create(seed=7, n=3, **kw)
  b = client.completions.create(seed=7, n=3, **kw)
  c = client.completions.create(seed=8, n=3, **kw)
  texts = lambda r: [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]
  assert texts(a) == texts(b) and texts(a) != texts(c)
  assert len(set(texts(a))) == 3


def test_stop(client):
  full = client.completions.create(model="tiny-test", prompt="stop test", max_tokens=30, temperature=1.0, seed=3,
                                   extra_body={"ignore_eos": True}).choices[0].text
  stop = full[6:8]
  r = client.completions.create(model="tiny-test", prompt="stop test", max_tokens=30, temperature=1.0, seed=3,
                                stop=[stop], extra_body={"ignore_eos": True})
  assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
  s = client.completions.create(model="tiny-test", prompt="stop test", max_tokens=30, temperature=1.0, seed=3,
                                stop=[stop], stream=True, extra_body={"ignore_eos": True})
  assert "".join(c.choices[0].text for c in s) == full[:full.find(stop)]


def test_logprobs(client):
  r = client.completions.create(model="tiny-test", prompt="lp", max_tokens=4, logprobs=3, **GREEDY)
  lp = r.choices[0].logprobs
  assert len(lp.token_logprobs) == 4 and all(len(t) <= 3 and t for t in lp.top_logprobs)
  assert all(v <= 0 for v in lp.token_logprobs)
  c = client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                     logprobs=True, top_logprobs=2, **GREEDY)
  content = c.choices[0].logprobs.content
  assert len(content) == 3 and all(len(e.top_logprobs) == 2 for e in content)
  # greedy: the sampled token is the most likely one
  assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in content)


def test_models_tokenize_detokenize_metrics(server, client):
  assert [m.id for m in client.models.list().data] == ["tiny-test"]
  st, body, _ = _post(server, "/tokenize", json.dumps({"prompt": "hé"}).encode())
  assert st == 200 and body["tokens"] == [256, 104, 195, 169] and body["count"] == 4
  st, body, _ = _post(server, "/detokenize", json.dumps({"tokens": [104, 195, 169]}).encode())
  assert st == 200 and body["prompt"] == "hé"
  _, text = _get(server, "/metrics")
  for name in ("nanoflow_kv_pages_used", "nanoflow_kv_pages_free", "nanoflow_requests_running",
               "nanoflow_requests_waiting", "nanoflow_preemptions_total", "nanoflow_time_to_first_token_seconds_bucket",
               "nanoflow_time_per_output_token_seconds_bucket", "nanoflow_e2e_request_latency_seconds_bucket",
               "nanoflow_step_seconds_bucket", "nanoflow_requests_total", "nanoflow_prompt_tokens_total",
               "nanoflow_generation_tokens_total"):
    assert name in text, name


BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"prompt": "x", "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "x", "top_p": 2}).encode(), 400, "top_p"),
    (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "n": "two"}).encode(), 400, "n"),
    (json.dumps({"prompt": "x", "logprobs": 99}).encode(), 400, "logprobs"),
    (json.dumps({"prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "x", "stop": [""]}).encode(), 400, "stop"),
    (json.dumps({"prompt": "x", "model": "gpt-4"}).encode(), 404, "model"),
    (json.dumps({"prompt": "x" * 9000}).encode(), 400, "prompt"),
    (json.dumps({"prompt": [1, 2, 99999]}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "x", "min_tokens": 5, "max_tokens": 2}).encode(), 400, None),
    # issue 24: each of these gave a 500 (or stopped the engine)
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 5001 + b"}", 400, None),          # past Python's digit limit
    (b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, None),           # nested 100,000 deep
    (b'{"prompt": "a\\ud800b"}', 400, None),                                       # a lone surrogate
    (b'{"prompt": "x", "temperature": NaN}', 400, None),
    (b'{"prompt": "x", "temperature": 1e999}', 400, "temperature"),
    (json.dumps({"prompt": "x", "max_tokens": 10**12}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "max_tokens": 8191}).encode(), 400, "max_tokens"),   # past the context left
    (json.dumps({"prompt": "x", "top_k": 2**31}).encode(), 400, "top_k"),
    (json.dumps({"prompt": "x", "top_k": 100000}).encode(), 400, "top_k"),           # past the vocabulary
    (json.dumps({"prompt": "x", "stop_token_ids": [2**40], "min_tokens": 2}).encode(), 400, "stop_token_ids"),
    (json.dumps({"prompt": "x", "stop_token_ids": [5000]}).encode(), 400, "stop_token_ids"),
    (json.dumps({"prompt": "x", "seed": 2**64}).encode(), 400, "seed"),
    # features we do not implement are refused by name, never ignored
    (json.dumps({"prompt": "x", "no_such_field": 1}).encode(), 400, "no_such_field"),
    (json.dumps({"prompt": "x", "logit_bias": {"a": 1}}).encode(), 400, "logit_bias"),
    (json.dumps({"prompt": "x", "logit_bias": {"65": 101}}).encode(), 400, "logit_bias"),
    (json.dumps({"prompt": "x", "logit_bias": {"99999": 1}}).encode(), 400, None),   # past the vocabulary
    (json.dumps({"prompt": "x", "best_of": 3}).encode(), 400, "best_of"),
    (json.dumps({"prompt": "x", "suffix": "tail"}).encode(), 400, "suffix"),
    (json.dumps({"prompt": "x", "echo": True}).encode(), 400, "echo"),
    # constraints that cannot be compiled, or more than one of them
    (json.dumps({"prompt": "x", "guided_regex": "(unclosed"}).encode(), 400, None),
    (json.dumps({"prompt": "x", "guided_choice": []}).encode(), 400, None),
    (json.dumps({"prompt": "x", "guided_regex": "b", "guided_choice": ["a"]}).encode(), 400, "guided_choice"),
    (json.dumps({"prompt": "x", "response_format": {"type": "xml"}}).encode(), 400, "response_format"),
    (json.dumps({"prompt": "x", "structured_outputs": {"json": 5}}).encode(), 400, None),
]


@pytest.mark.parametrize("data,status,param", BAD)
def test_bad_input_gets_openai_error(server, data, status, param):
  st, body, _ = _post(server, "/v1/completions", data)
  assert st == status, body
  assert set(body["error"]) >= {"message", "type", "code"} and body["error"]["message"]
  if param:
    assert body["error"]["param"] == param


def test_bad_chat_input(server):
  for bad in ({"messages": []}, {"messages": [{"content": "no role"}]}, {"messages": "hi"},
              {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
              {"messages": [{"role": "user", "content": "a\ud800"}]},
              {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
              {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function",
                                                                          "function": {"name": "f"}}]},
              {"messages": [{"role": "user", "content": "x"}], "prompt": "y"}):
    st, body, _ = _post(server, "/v1/chat/completions", json.dumps(bad).encode())
    assert st == 400 and "error" in body


def test_unknown_charset_and_lowercase_bearer(server):
  st, body, _ = _post(server, "/v1/completions", b'{"prompt": "x", "max_tokens": 2}',
                      headers={"Content-Type": "application/json; charset=no-such-charset"})
  assert st == 200, body    # JSON is UTF-8 whatever the header says
  st, body, _ = _post(server, "/v1/completions", "{\"prompt\": \"\u00e9\"}".encode("latin-1"))
  assert st == 400 and "UTF-8" in body["error"]["message"]
  st, _, _ = _post(server, "/v1/completions", b'{"prompt": "x", "max_tokens": 2}', key=None,
                   headers={"Authorization": f"bearer {KEY}"})
  assert st == 200


def test_tokenize_and_detokenize_need_the_key(server):
  for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [104]})):
    assert _post(server, path, json.dumps(body).encode(), key=None)[0] == 401
    assert _post(server, path, json.dumps(body).encode())[0] == 200


def test_auth(server, client):
  for key in (None, "wrong"):
    st, body, _ = _post(server, "/v1/completions", json.dumps({"prompt": "x"}).encode(), key=key)
    assert st == 401 and body["error"]["type"] == "authentication_error"
  bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
  with pytest.raises(openai.AuthenticationError):
    bad.models.list()
  assert _get(server, "/health")[0] == 200  # /health needs no key


def test_bad_requests_do_not_disturb_requests_in_flight(server, client):
  expected = client.completions.create(model="tiny-test", prompt="steady", max_tokens=40, **GREEDY).choices[0].text
  got = []
  stream = client.completions.create(model="tiny-test", prompt="steady", max_tokens=40, stream=True, **GREEDY)
  for i, chunk in enumerate(stream):
    got.append(chunk.choices[0].text)
    if i % 5 == 0:
      for data, _, _ in BAD[:6]:
        _post(server, "/v1/completions", data)
  assert "".join(got) == expected


def test_64_streaming_clients_with_disconnects(server):
  """A quarter of the clients leave after 3 chunks of a request for 8000 tokens: the engine must abort them
  (with abort a no-op they would run on, holding pages and generating ~128k tokens)."""
  generated0 = _metric(server, "nanoflow_generation_tokens_total")

  async def run():
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

    async def one(i):
      stream = await aclient.completions.create(model="tiny-test", prompt=f"client {i}",
                                                max_tokens=8000 if i % 4 == 0 else 48,
                                                stream=True, temperature=1.0, seed=i,
                                                extra_body={"ignore_eos": True})
      n = 0
      async for chunk in stream:
        n += 1
        if i % 4 == 0 and n == 3:
          await stream.close()  # a quarter leave mid-stream
          return "left"
      return "done"
    results = await asyncio.gather(*[one(i) for i in range(64)])
    await aclient.close()
    return results
  results = asyncio.run(run())
  assert results.count("left") == 16 and results.count("done") == 48
  wait_idle(server, timeout=10)
  assert _metric(server, "nanoflow_kv_pages_used") == 0
  assert _metric(server, "nanoflow_requests_running") == 0
  assert _metric(server, "nanoflow_generation_tokens_total") - generated0 < 48 * 48 + 16 * 500
  assert _get(server, "/health")[0] == 200


def test_full_queue_503_and_sigterm_drains():
  s = ServerProcess("--max_num_seqs=1", "--max_waiting=1", "--dense_batch=64", "--num_pages=256")
  try:
    body = json.dumps({"prompt": "busy", "max_tokens": 200, "ignore_eos": True}).encode()
    results = []
    threads = [threading.Thread(target=lambda: results.append(_post(s, "/v1/completions", body, key=None)))
               for _ in range(6)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    statuses = sorted(r[0] for r in results)
    assert 200 in statuses and 503 in statuses, statuses
    busy = [r for r in results if r[0] == 503][0]
    assert busy[2].get("Retry-After") and busy[1]["error"]["type"] == "server_overloaded"
    # SIGTERM while a request is in flight: it completes, then the process exits 0.
    done = []
    t = threading.Thread(target=lambda: done.append(_post(s, "/v1/completions", body, key=None)))
    t.start()
    time.sleep(1.0)
    code = s.stop()
    t.join()
    assert code == 0, s.output()
    assert done and done[0][0] == 200 and done[0][1]["usage"]["completion_tokens"] == 200
  finally:
    s.stop()


def test_return_token_ids(client):
  """vLLM's return_token_ids: the prompt's ids and the generated ones, whole and streamed alike (a multi-round
  client builds its next prompt from them)."""
  body = dict(return_token_ids=True, ignore_eos=True)
  full = client.completions.create(model="tiny-test", prompt=[256, 104, 105], max_tokens=12, temperature=0,
                                   extra_body=body).model_dump()
  c = full["choices"][0]
  assert c["prompt_token_ids"] == [256, 104, 105] and len(c["token_ids"]) == full["usage"]["completion_tokens"] == 12
  chunks = [ch.model_dump() for ch in client.completions.create(
      model="tiny-test", prompt=[256, 104, 105], max_tokens=12, temperature=0, stream=True, extra_body=body)]
  assert chunks[0]["choices"][0]["prompt_token_ids"] == [256, 104, 105]
  assert all("prompt_token_ids" not in ch["choices"][0] for ch in chunks[1:] if ch["choices"])
  assert [t for ch in chunks for t in ch["choices"][0]["token_ids"]] == c["token_ids"]
  chat = client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=5, temperature=0, extra_body=body).model_dump()
  assert len(chat["choices"][0]["token_ids"]) == 5 and chat["choices"][0]["prompt_token_ids"]
  plain = client.completions.create(model="tiny-test", prompt="x", max_tokens=2, **GREEDY).model_dump()
  assert "token_ids" not in plain["choices"][0]
