"""The OpenAI-compatible HTTP server (aiohttp): routes, auth, errors, streaming, graceful shutdown."""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hmac
import json
import logging
import os
import signal
import time
import uuid
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nanoflow_jax.async_engine import AsyncEngine, EngineStoppedError, QueueFullError, RequestFailedError
from nanoflow_jax.engine import RequestError
from nanoflow_jax.server import protocol as P, tools as tools_lib
from nanoflow_jax.server.connections import ConnectionGuard, raise_fd_limit
from nanoflow_jax.server.metrics import Metrics
from nanoflow_jax.tokenizer import TokenizerError

log = logging.getLogger(__name__)
access_log = logging.getLogger("nanoflow_jax.access")   # one line per request
ACCESS = web.RequestKey("access", dict)   # what a generation reports to its access line

ENGINE = web.AppKey("engine", AsyncEngine)
STATE = web.AppKey("state", dict)
PUBLIC_PATHS = ("/health", "/metrics", "/ping", "/version")   # everything else needs the API key when one is set
# Inputs larger than this are parsed and tokenized on a worker thread: a 10 MB prompt tokenized on the event
# loop froze every connection for 19 s (issue 24).
OFF_LOOP_CHARS = 1 << 16
_WORKERS = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="nanoflow-tokenize")


async def off_loop(n: int, fn, *args):
  """fn(*args), on a worker thread where the input is large (n: its size in characters)."""
  if n < OFF_LOOP_CHARS:
    return fn(*args)
  return await asyncio.get_running_loop().run_in_executor(_WORKERS, fn, *args)


def _authorized(header: str | None, key: str) -> bool:
  """'Bearer KEY', the scheme in any case (RFC 7235), the key compared in constant time."""
  scheme, _, token = (header or "").strip().partition(" ")
  return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


@web.middleware
async def _errors_and_auth(request: web.Request, handler):
  state = request.app[STATE]
  route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unknown"
  status = 500
  t0 = time.monotonic()
  guard: ConnectionGuard | None = state.get("guard")
  if guard is not None:
    guard.begin(request.protocol)
  try:
    key = state["api_key"]
    if key and request.path not in PUBLIC_PATHS and not _authorized(request.headers.get("Authorization"), key):
      raise P.ApiError(401, "missing or invalid API key", type_="authentication_error", code="invalid_api_key")
    resp = await handler(request)
    status = resp.status
    return resp
  except P.ApiError as e:
    status = e.status
    return web.json_response(e.body(), status=e.status, headers=e.headers)
  except web.HTTPException as e:
    status = e.status
    return web.json_response(P.ApiError(e.status, e.reason).body(), status=e.status)
  except (asyncio.CancelledError, ConnectionResetError):
    status = 499  # the client went away: a normal abort
    log.info("client went away: %s %s", request.method, request.path)
    raise
  except Exception:  # never leak a traceback (or the exception's text) to the client
    ref = uuid.uuid4().hex[:12]
    log.exception("internal error on %s (ref %s)", request.path, ref)
    return web.json_response(P.ApiError(500, f"internal error while handling the request (ref {ref}); see the "
                                        "server log", type_="internal_error").body(), status=500)
  finally:
    if guard is not None:
      guard.end(request.protocol)
    state["metrics"].requests.labels(route, str(status)).inc()
    if request.path not in PUBLIC_PATHS:   # (health checks and scrapes would drown the rest)
      _access_line(request, status, time.monotonic() - t0)


def _access_line(request: web.Request, status: int, seconds: float) -> None:
  """One line per request: method, path, status, and for generations its id, tokens and time to first token."""
  gen = request.get(ACCESS, {})
  detail = ""
  if gen:
    ttft = gen.get("ttft")
    detail = (f" id={gen['id']} prompt_tokens={gen['prompt_tokens']} output_tokens={gen['output_tokens']} "
              f"ttft_ms={'-' if ttft is None else f'{1e3 * ttft:.0f}'}")
  access_log.info("%s %s %d%s total_ms=%.0f", request.method, request.path, status, detail, 1e3 * seconds)


ENGINE_ERRORS = (QueueFullError, EngineStoppedError, RequestError, RequestFailedError)


def _api_error(e: Exception) -> P.ApiError:
  """The API error a client gets for one of ENGINE_ERRORS that the engine thread raised."""
  if isinstance(e, QueueFullError):
    return P.ApiError(503, str(e), type_="server_overloaded", headers={"Retry-After": "1"})
  if isinstance(e, EngineStoppedError):
    return P.ApiError(503, str(e), type_="server_shutting_down", headers={"Retry-After": "5"})
  if isinstance(e, RequestError):
    return P.ApiError(400, str(e))
  return P.ApiError(500, str(e), type_="internal_error")


def _reject_constant(name: str):
  raise ValueError(f"{name} is not valid JSON")


def _parse_json(raw: bytes) -> Any:
  """JSON as RFC 8259 has it: UTF-8 (whatever charset the header names), no NaN/Infinity, and strings that
  are valid Unicode (a lone surrogate cannot be encoded, so nothing downstream could use it)."""
  try:
    body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    json.dumps(body, ensure_ascii=False).encode("utf-8")
  except UnicodeError as e:
    raise P.ApiError(400, f"the body is not valid UTF-8 text: {e.reason}") from None
  except RecursionError:
    raise P.ApiError(400, "malformed JSON body: nested too deeply") from None
  except ValueError as e:   # JSONDecodeError, NaN/Infinity, integers past Python's digit limit
    raise P.ApiError(400, f"malformed JSON body: {str(e)[:200]}") from None
  return body


async def _json_body(request: web.Request) -> dict[str, Any]:
  try:
    raw = await asyncio.wait_for(request.read(), request.app[STATE]["body_timeout"])
  except asyncio.TimeoutError:
    raise P.ApiError(408, "the request body did not arrive in time", type_="timeout") from None
  body = await off_loop(len(raw), _parse_json, raw)
  if not isinstance(body, dict):
    raise P.ApiError(400, "the JSON body must be an object")
  return body


class Handlers:
  def __init__(self, app: web.Application):
    self.app = app

  @property
  def engine(self) -> AsyncEngine:
    return self.app[ENGINE]

  @property
  def state(self) -> dict:
    return self.app[STATE]

  @property
  def tokenizer(self):
    return self.engine.engine.tokenizer

  def _check_model(self, body):
    model = body.get("model")
    if model is not None and model not in self.state["model_names"]:
      raise self._no_model(model)

  def _no_model(self, model) -> P.ApiError:
    return P.ApiError(404, f"the model '{model}' does not exist; this server serves "
                      f"{', '.join(repr(n) for n in self.state['model_names'])}", type_="NotFoundError",
                      param="model", code="model_not_found")

  async def _encode(self, prompt, max_tokens: int | None = None) -> list[int]:
    ids = await off_loop(len(prompt), self.tokenizer.encode, prompt) if isinstance(prompt, str) else list(prompt)
    return self._check_ids(ids, max_tokens)

  def _check_ids(self, ids: list[int], max_tokens: int | None) -> list[int]:
    max_len = self.engine.engine.max_model_len
    if len(ids) >= max_len:
      raise P.ApiError(400, f"this model's maximum context length is {max_len} tokens; the prompt has "
                       f"{len(ids)} (at least one token must be left for the completion)", param="prompt",
                       code="context_length_exceeded")
    vocab = self.engine.engine.model.config.vocab_size
    if ids and (min(ids) < 0 or max(ids) >= vocab):
      raise P.ApiError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
    if max_tokens is not None and len(ids) + max_tokens > max_len:
      raise P.ApiError(400, f"this model's maximum context length is {max_len} tokens; the request asks for "
                       f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} to generate)",
                       param="max_tokens", code="context_length_exceeded")
    return ids

  def _check_params(self, params) -> None:
    """Limits that depend on the model (the rest are protocol.sampling_params')."""
    vocab = self.engine.engine.model.config.vocab_size
    if params.top_k > vocab:
      raise P.ApiError(400, f"'top_k' must be -1 (off) or in [1, {vocab}] (the vocabulary), got {params.top_k}",
                       param="top_k")
    bad = [t for t in params.stop_token_ids if t >= vocab]
    if bad:
      raise P.ApiError(400, f"'stop_token_ids' must lie in [0, {vocab}), got {bad[0]}", param="stop_token_ids")

  @staticmethod
  async def _access(request, base: str, usage, gen):
    """Passes the deltas through, noting what the access line reports (id, tokens, time to first token)."""
    t0 = time.monotonic()
    rec = request[ACCESS] = {"id": base, "prompt_tokens": usage.prompt_tokens, "output_tokens": 0, "ttft": None}
    async for idx, d in gen:
      if d.token_ids and rec["ttft"] is None:
        rec["ttft"] = time.monotonic() - t0
      if d.finish_reason is not None:
        rec["output_tokens"] += d.num_output_tokens
      yield idx, d

  # --- generation core ------------------------------------------------------------------------------
  async def _deltas(self, rid: str, ids: list[int], params, prompt: str | None, offset: int):
    """One engine request's (choice index, delta), its errors as API errors; observes latency metrics."""
    m = self.state["metrics"]
    t0 = time.monotonic()
    first: dict[int, float] = {}
    try:
      async for d in self.engine.generate(rid, ids, params, prompt):
        if d.token_ids and d.index not in first:
          first[d.index] = time.monotonic()
          m.ttft.observe(first[d.index] - t0)
        if d.finish_reason is not None:
          t = time.monotonic()
          m.e2e.observe(t - t0)
          if d.num_output_tokens > 1 and d.index in first:
            m.tpot.observe((t - first[d.index]) / (d.num_output_tokens - 1))
        yield offset + d.index, d
    except ENGINE_ERRORS as e:
      raise _api_error(e) from None

  async def _run(self, rid: str, ids: list[int], params, prompt: str | None, sink: asyncio.Queue, offset: int):
    """Feeds one engine request's (choice index, delta) into `sink` (several prompts in one request)."""
    async for item in self._deltas(rid, ids, params, prompt, offset):
      await sink.put(item)

  async def _generate(self, prompts_ids, params, prompts_text, base_id):
    """Starts one engine request per prompt; yields (choice index, delta) in arrival order. One prompt (the
    usual request) is passed straight through: the multiplexing below costs a task and a wait per token."""
    if len(prompts_ids) == 1:
      async for item in self._deltas(f"{base_id}-0", prompts_ids[0], params, prompts_text[0], 0):
        yield item
      return
    sink: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(self._run(f"{base_id}-{i}", ids, params, txt, sink, i * params.n))
             for i, (ids, txt) in enumerate(zip(prompts_ids, prompts_text))]
    remaining = {i: params.n for i in range(len(tasks))}
    get: asyncio.Future | None = None
    try:
      while any(remaining.values()):
        get = asyncio.ensure_future(sink.get())
        done, _ = await asyncio.wait([get, *[t for t in tasks if not t.done()]], return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
          if t.done() and t.exception() is not None:
            get.cancel()
            raise t.exception()
        if get in done:
          idx, d = get.result()
          if d.finish_reason is not None:
            remaining[idx // params.n] -= 1
          yield idx, d
        else:
          get.cancel()
    finally:
      if get is not None:
        get.cancel()   # (left pending it is logged as "Task was destroyed but it is pending!" at ERROR)
      for t in tasks:  # client gone or error: closing the generators aborts the engine requests
        t.cancel()

  # --- routes ---------------------------------------------------------------------------------------
  async def _generation_request(self, request, chat: bool):
    """What completions and chat share: the body, the model check, sampling and streaming options."""
    body = await _json_body(request)
    self._check_model(body)
    P.check_fields(body, chat)
    params = P.sampling_params(body, chat=chat)
    self._check_params(params)
    stream = P._bool(body, "stream")
    if stream and params.prompt_logprobs is not None:
      raise P.ApiError(400, "'prompt_logprobs' is not supported with stream (ask without streaming)",
                       param="prompt_logprobs")
    return body, params, stream, P.stream_options(body)

  async def completions(self, request):
    body, params, stream, include_usage = await self._generation_request(request, chat=False)
    prompts = P.prompts_of(body)
    ids = [await self._encode(p, params.max_tokens) for p in prompts]
    texts = [p if isinstance(p, str) else None for p in prompts]
    return await self._respond(request, ids, texts, params, stream, include_usage, chat=False,
                               want_ids=P._bool(body, "return_token_ids"))

  async def chat(self, request):
    body, params, stream, include_usage = await self._generation_request(request, chat=True)
    messages = P.messages_of(body)
    treq = tools_lib.tool_request(body, self.state["tool_call_parser"])
    if treq is not None:
      if body.get("parallel_tool_calls") is False:
        treq.single = True
      forced = treq.structured_outputs()
      if forced is not None:
        if params.structured_outputs is not None:
          raise P.ApiError(400, "tool_choice required or named cannot be combined with another output constraint",
                           param="tool_choice")
        params = dataclasses.replace(params, structured_outputs=forced)
    ids = self._check_ids(await self._chat_ids(messages, True, treq.template_tools if treq else None),
                          params.max_tokens)
    return await self._respond(request, [ids], [None], params, stream, include_usage, chat=True, tool_req=treq,
                               want_ids=P._bool(body, "return_token_ids"))

  async def _chat_ids(self, messages, add_generation_prompt: bool, tools: list | None = None) -> list[int]:
    size = sum(len(m["content"]) for m in messages) + len(json.dumps(tools) if tools else "")
    extra = {"tools": tools} if tools else {}
    try:
      return await off_loop(size, lambda: self.tokenizer.apply_chat_template(
          messages, add_generation_prompt=add_generation_prompt, tokenize=True, **extra))
    except TokenizerError as e:
      raise P.ApiError(400, str(e), param="messages") from None

  async def _respond(self, request, ids, texts, params, stream, include_usage, chat, tool_req=None,
                     want_ids=False):
    """want_ids: vLLM's return_token_ids: each choice carries its prompt's token ids and its own (a multi-round
    client builds the next prompt from them without a tokenizer round trip)."""
    base = P.new_id("chatcmpl" if chat else "cmpl")
    created, model = P.now(), self.state["model_name"]
    obj = "chat.completion" if chat else "text_completion"
    usage = P.Usage(prompt_tokens=sum(len(i) for i in ids))   # each prompt once, as OpenAI counts it
    n_choices = len(ids) * params.n
    gen = self._access(request, base, usage, self._generate(ids, params, texts, base))
    if not stream:
      text = [""] * n_choices
      lps: list[list] = [[] for _ in range(n_choices)]
      finish = [None] * n_choices
      prompt_lps: dict[int, list] = {}   # per prompt (prompt_logprobs)
      toks: list[list[int]] = [[] for _ in range(n_choices)]
      async for idx, d in gen:
        toks[idx].extend(d.token_ids)
        if d.prompt_logprobs is not None:
          prompt_lps[idx // params.n] = d.prompt_logprobs
        text[idx] += d.text
        lps[idx].extend(d.logprobs or [])
        if d.finish_reason is not None:
          finish[idx] = d.finish_reason
          usage.add_final(idx, params.n, d)
      if "error" in finish:
        raise P.ApiError(500, f"the engine failed while running request {base}; see the server log",
                         type_="internal_error")
      choices = []
      for i in range(n_choices):
        c: dict[str, Any] = {"index": i, "finish_reason": finish[i]}
        if chat:
          c["message"] = {"role": "assistant", "content": text[i]}
          if tool_req is not None:
            content, calls = tool_req.split_calls(text[i])
            c["message"] = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
            if calls:
              c["finish_reason"] = "tool_calls"
          c["logprobs"] = P.chat_logprobs(self.tokenizer, lps[i]) if params.logprobs is not None else None
        else:
          c["text"] = text[i]
          c["logprobs"] = P.completion_logprobs(self.tokenizer, lps[i]) if params.logprobs is not None else None
        if params.prompt_logprobs is not None:
          c["prompt_logprobs"] = P.prompt_logprobs_body(self.tokenizer, prompt_lps.get(i // params.n))
        if want_ids:
          c["prompt_token_ids"], c["token_ids"] = list(ids[i // params.n]), toks[i]
        choices.append(c)
      return web.json_response({"id": base, "object": obj, "created": created, "model": model,
                                "choices": choices, "usage": usage.body()})

    # Streaming: SSE, one chunk per delta, then (optionally) usage, then [DONE].
    # The first delta is awaited before the 200 goes out, so a rejected request still gets its 4xx/503.
    first = await gen.__anext__()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    chunk_obj = "chat.completion.chunk" if chat else "text_completion"
    offsets = [0] * n_choices

    async def send(payload):
      await resp.write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())

    def chunk(choices, **extra):
      return {"id": base, "object": chunk_obj, "created": created, "model": model, "choices": choices, **extra}

    if chat:
      await send(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None} for i in range(n_choices)]))
    held = [""] * n_choices   # tool calls: text not yet sent as content (it may be a call)
    ids_sent = [False] * n_choices   # return_token_ids: the prompt's ids go with a choice's first chunk

    def with_ids(idx, c, d):
      if want_ids:
        if not ids_sent[idx]:
          c["prompt_token_ids"], ids_sent[idx] = list(ids[idx // params.n]), True
        c["token_ids"] = list(d.token_ids)
      return c

    async def emit(idx, d):
      if tool_req is not None and d.finish_reason != "error":
        held[idx] += d.text
        go = tool_req.holds_back(held[idx])
        if d.finish_reason is None:
          d = dataclasses.replace(d, text=held[idx][:go])
          held[idx] = held[idx][go:]
        else:   # the end: what is held is a call, or content after all
          content, calls = tool_req.split_calls(held[idx])
          if calls:
            usage.add_final(idx, params.n, d)
            if content:
              await send(chunk([{"index": idx, "delta": {"content": content}, "logprobs": None, "finish_reason": None}]))
            await send(chunk([with_ids(idx, {"index": idx, "delta": {"tool_calls": [{"index": k, **c} for k, c in
                                                                              enumerate(calls)]},
                                              "logprobs": None, "finish_reason": "tool_calls"}, d)]))
            return
          d = dataclasses.replace(d, text=held[idx])
      await emit_plain(idx, d)

    async def emit_plain(idx, d):
      if d.finish_reason == "error":   # the 200 is out: the error goes in the stream, as vLLM sends it
        await send(P.ApiError(500, f"the engine failed while running request {base}; see the server log",
                              type_="internal_error").body())
        return
      if d.finish_reason is not None:
        usage.add_final(idx, params.n, d)
      if not d.text and d.finish_reason is None and not d.logprobs and not (want_ids and d.token_ids):
        return
      c: dict[str, Any] = {"index": idx, "finish_reason": d.finish_reason}
      if chat:
        c["delta"] = {"content": d.text} if d.text else {}
        c["logprobs"] = P.chat_logprobs(self.tokenizer, d.logprobs) if d.logprobs else None
      else:
        c["text"] = d.text
        c["logprobs"] = P.completion_logprobs(self.tokenizer, d.logprobs, offsets[idx]) if d.logprobs else None
        offsets[idx] += len(d.text)
      await send(chunk([with_ids(idx, c, d)]))

    await emit(*first)
    async for idx, d in gen:
      await emit(idx, d)
    if include_usage:
      await send(chunk([], usage=usage.body()))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp

  def _model_card(self, name: str) -> dict:
    return {"id": name, "object": "model", "created": self.state["created"], "owned_by": "nanoflow-jax",
            "root": self.state["model_names"][0], "max_model_len": self.engine.engine.max_model_len}

  async def models(self, request):
    return web.json_response({"object": "list", "data": [self._model_card(n) for n in self.state["served_names"]]})

  async def model(self, request):
    name = request.match_info["model"]
    if name not in self.state["model_names"]:
      raise self._no_model(name)
    return web.json_response(self._model_card(name))

  async def version(self, request):
    from importlib import metadata
    try:
      version = metadata.version("nanoflow-jax")
    except metadata.PackageNotFoundError:
      version = "unknown"
    return web.json_response({"version": version})

  async def ping(self, request):
    return await self.health(request)

  async def health(self, request):
    e = self.engine
    if not e.alive:
      return web.json_response({"status": "unhealthy", "error": "the engine has stopped"}, status=503)
    return web.json_response({"status": "ok", "step_failures": e.step_failures})

  async def reset_prefix_cache(self, request):
    """vLLM's POST /reset_prefix_cache (SGLang's /flush_cache): the cached prefixes no request holds are
    forgotten, on the GPU and the host tier (a benchmark's runs then start alike). It takes no parameters:
    any named (vLLM's `device`, say) is refused, not ignored."""
    given = sorted(request.query) + (sorted(await _json_body(request)) if request.content_length else [])
    if given:
      raise P.ApiError(400, f"/reset_prefix_cache takes no parameters; got {', '.join(given)}", param=given[0])
    try:
      await self.engine.reset_prefix_cache()
    except ENGINE_ERRORS as e:
      raise _api_error(e) from None
    return web.json_response({"status": "ok"})

  async def metrics(self, request):
    return web.Response(body=generate_latest(self.state["metrics"].registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})

  async def tokenize(self, request):
    body = await _json_body(request)
    self._check_model(body)
    if "messages" in body:
      ids = await self._chat_ids(P.messages_of(body), P._bool(body, "add_generation_prompt", True))
    elif isinstance(body.get("prompt"), str):
      ids = await off_loop(len(body["prompt"]), lambda: self.tokenizer.encode(
          body["prompt"], add_special_tokens=P._bool(body, "add_special_tokens", True)))
    else:
      raise P.ApiError(400, "'prompt' (a string) or 'messages' is required", param="prompt")
    reply = {"tokens": ids, "count": len(ids), "max_model_len": self.engine.engine.max_model_len}
    return web.Response(text=await off_loop(len(ids), json.dumps, reply), content_type="application/json")

  async def detokenize(self, request):
    body = await _json_body(request)
    self._check_model(body)
    toks = P._int_list(body, "tokens")
    if "tokens" not in body:
      raise P.ApiError(400, "'tokens' is required", param="tokens")
    vocab = self.engine.engine.model.config.vocab_size
    if toks and max(toks) >= vocab:
      raise P.ApiError(400, f"token ids must lie in [0, {vocab})", param="tokens")
    return web.json_response({"prompt": await off_loop(len(toks), self.tokenizer.decode, toks)})


def create_app(engine: AsyncEngine, model_name: str | list[str], api_key: str | None = None, body_timeout: float = 30.0,
               max_request_mb: float = 16.0, also_answers: tuple[str, ...] = (),
               tool_call_parser: str | None = None) -> web.Application:
  """model_name: the served name, or several (the first is the one responses carry); also_answers: further
  names a request may use (the model path given), not listed by /v1/models."""
  served = [model_name] if isinstance(model_name, str) else list(model_name)
  model_name = served[0]
  app = web.Application(middlewares=[_errors_and_auth], client_max_size=int(max_request_mb * 2**20))
  app[ENGINE] = engine
  metrics = Metrics(engine.engine)
  engine.on_step = metrics.step.observe
  app[STATE] = {"model_name": model_name, "served_names": served, "tool_call_parser": tool_call_parser,
                "model_names": list(dict.fromkeys([*served, *also_answers])), "api_key": api_key, "metrics": metrics, "created": P.now(),
                "body_timeout": body_timeout}
  h = Handlers(app)
  app.router.add_post("/v1/completions", h.completions)
  app.router.add_post("/v1/chat/completions", h.chat)
  app.router.add_get("/v1/models", h.models)
  app.router.add_get("/v1/models/{model:.+}", h.model)
  app.router.add_get("/version", h.version)
  app.router.add_get("/ping", h.ping)
  app.router.add_post("/ping", h.ping)
  app.router.add_get("/health", h.health)
  app.router.add_get("/metrics", h.metrics)
  app.router.add_post("/tokenize", h.tokenize)
  app.router.add_post("/detokenize", h.detokenize)
  app.router.add_post("/reset_prefix_cache", h.reset_prefix_cache)
  return app


@dataclasses.dataclass
class ServerLimits:
  """What a client may hold: connections, and how long its headers and body may take."""
  max_connections: int = 1024
  header_timeout: float = 10.0      # seconds with no request in progress (after connecting, or after a response)
  body_timeout: float = 30.0        # seconds to read a request's body
  max_request_mb: float = 16.0
  shutdown_timeout: float = 60.0    # the drain's bound; a second signal exits at once


async def serve(engine: AsyncEngine, model_name: str | list[str], host: str, port: int, api_key: str | None = None,
                ready: asyncio.Event | None = None, limits: ServerLimits | None = None,
                also_answers: tuple[str, ...] = (), tool_call_parser: str | None = None) -> int:
  """Serves until SIGTERM/SIGINT; then stops accepting, drains the requests in flight (at most
  limits.shutdown_timeout seconds) and returns 0. Returns 1 at once if the engine dies (a supervisor restarts
  the process). A second signal during the drain exits the process at once."""
  limits = limits or ServerLimits()
  fd_limit = raise_fd_limit()
  app = create_app(engine, model_name, api_key, limits.body_timeout, limits.max_request_mb, also_answers,
                   tool_call_parser)
  model_name = app[STATE]["model_name"]
  runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                         keepalive_timeout=limits.header_timeout, shutdown_timeout=5.0)
  await runner.setup()
  max_conn = min(limits.max_connections, max(16, fd_limit - 256))   # leave descriptors for files and the engine
  guard = ConnectionGuard(runner.server, max_conn, limits.header_timeout)
  app[STATE]["guard"] = guard
  guard.start()
  site = web.TCPSite(runner, host, port)
  await site.start()
  log.info("serving %s on http://%s:%d (at most %d connections)", model_name, host, port, max_conn)
  stop = asyncio.Event()
  loop = asyncio.get_running_loop()
  signals = []

  def on_signal(sig):
    signals.append(sig)
    if len(signals) > 1:
      log.warning("second signal (%s): exiting now, without waiting for the requests in flight", sig.name)
      logging.shutdown()
      os._exit(1)
    stop.set()

  for sig in (signal.SIGTERM, signal.SIGINT):
    loop.add_signal_handler(sig, on_signal, sig)

  async def watch_engine():
    while engine.alive:
      await asyncio.sleep(0.5)
    log.error("the engine has stopped (%r); exiting so that a supervisor can restart the server", engine.fatal)
    stop.set()

  watcher = loop.create_task(watch_engine())
  if ready is not None:
    ready.set()
  await stop.wait()
  code = 0 if engine.alive else 1
  log.info("shutting down: no new requests; draining the ones in flight (at most %.0f s)", limits.shutdown_timeout)
  watcher.cancel()
  engine.stop_accepting()
  await site.stop()
  if code == 0:
    await engine.drain(timeout=limits.shutdown_timeout)
  guard.stop()
  await runner.cleanup()
  engine.shutdown()
  log.info("stopped")
  return code
