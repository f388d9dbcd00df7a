"""The OpenAI-compatible HTTP server (aiohttp): routes, auth, errors, streaming, graceful shutdown."""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nanoflow_jax.async_engine import AsyncEngine, EngineStoppedError, QueueFullError
from nanoflow_jax.engine import RequestError
from nanoflow_jax.server import protocol as P
from nanoflow_jax.server.metrics import Metrics
from nanoflow_jax.tokenizer import TokenizerError

log = logging.getLogger(__name__)

ENGINE = web.AppKey("engine", AsyncEngine)
STATE = web.AppKey("state", dict)


@web.middleware
async def _errors_and_auth(request: web.Request, handler):
  state = request.app[STATE]
  route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unknown"
  status = 500
  try:
    key = state["api_key"]
    if key and request.path.startswith("/v1") and request.headers.get("Authorization") != f"Bearer {key}":
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
    status = 499  # the client went away
    raise
  except Exception as e:  # never leak a traceback as HTML
    log.exception("internal error on %s", request.path)
    return web.json_response(P.ApiError(500, f"internal error: {e}", type_="internal_error").body(), status=500)
  finally:
    state["metrics"].requests.labels(route, str(status)).inc()


async def _json_body(request: web.Request) -> dict[str, Any]:
  try:
    body = await request.json(loads=json.loads)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise P.ApiError(400, f"malformed JSON body: {e}") from None
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
    if model is not None and model != self.state["model_name"]:
      raise P.ApiError(404, f"the model '{model}' does not exist; this server serves '{self.state['model_name']}'",
                       type_="NotFoundError", param="model", code="model_not_found")

  def _encode(self, prompt) -> list[int]:
    ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    max_len = self.engine.engine.max_model_len
    if len(ids) >= max_len:
      raise P.ApiError(400, f"this model's maximum context length is {max_len} tokens; the prompt has "
                       f"{len(ids)} (at least one token must be left for the completion)", param="prompt",
                       code="context_length_exceeded")
    vocab = self.engine.engine.model.config.vocab_size
    if ids and (min(ids) < 0 or max(ids) >= vocab):
      raise P.ApiError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
    return ids

  # --- generation core ------------------------------------------------------------------------------
  async def _run(self, rid: str, ids: list[int], params, prompt: str | None, sink: asyncio.Queue, offset: int):
    """Feeds (choice index, delta) into `sink`; None when done. Observes latency metrics."""
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
        await sink.put((offset + d.index, d))
    except QueueFullError as e:
      raise P.ApiError(503, str(e), type_="server_overloaded", headers={"Retry-After": "1"}) from None
    except EngineStoppedError as e:
      raise P.ApiError(503, str(e), type_="server_shutting_down", headers={"Retry-After": "5"}) from None
    except RequestError as e:
      raise P.ApiError(400, str(e)) from None

  async def _generate(self, prompts_ids, params, prompts_text, base_id):
    """Starts one engine request per prompt; yields (choice index, delta) in arrival order."""
    sink: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(self._run(f"{base_id}-{i}", ids, params, txt, sink, i * params.n))
             for i, (ids, txt) in enumerate(zip(prompts_ids, prompts_text))]
    remaining = {i: params.n for i in range(len(tasks))}
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
      for t in tasks:  # client gone or error: closing the generators aborts the engine requests
        t.cancel()

  # --- routes ---------------------------------------------------------------------------------------
  async def _generation_request(self, request, chat: bool):
    """What completions and chat share: the body, the model check, sampling and streaming options."""
    body = await _json_body(request)
    self._check_model(body)
    return body, P.sampling_params(body, chat=chat), P._bool(body, "stream"), P.stream_options(body)

  async def completions(self, request):
    body, params, stream, include_usage = await self._generation_request(request, chat=False)
    prompts = P.prompts_of(body)
    if P._bool(body, "echo"):
      raise P.ApiError(400, "'echo' is not supported", param="echo")
    ids = [self._encode(p) for p in prompts]
    texts = [p if isinstance(p, str) else None for p in prompts]
    return await self._respond(request, ids, texts, params, stream, include_usage, chat=False)

  async def chat(self, request):
    body, params, stream, include_usage = await self._generation_request(request, chat=True)
    messages = P.messages_of(body)
    try:
      ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except TokenizerError as e:
      raise P.ApiError(400, str(e), param="messages") from None
    ids = self._encode(ids)
    return await self._respond(request, [ids], [None], params, stream, include_usage, chat=True)

  async def _respond(self, request, ids, texts, params, stream, include_usage, chat):
    base = P.new_id("chatcmpl" if chat else "cmpl")
    created, model = P.now(), self.state["model_name"]
    obj = "chat.completion" if chat else "text_completion"
    usage = P.Usage(prompt_tokens=sum(len(i) for i in ids) * params.n)
    n_choices = len(ids) * params.n
    gen = self._generate(ids, params, texts, base)
    if not stream:
      text = [""] * n_choices
      lps: list[list] = [[] for _ in range(n_choices)]
      finish = [None] * n_choices
      async for idx, d in gen:
        text[idx] += d.text
        lps[idx].extend(d.logprobs or [])
        if d.finish_reason is not None:
          finish[idx] = d.finish_reason
          usage.completion_tokens += d.num_output_tokens
      choices = []
      for i in range(n_choices):
        c: dict[str, Any] = {"index": i, "finish_reason": finish[i]}
        if chat:
          c["message"] = {"role": "assistant", "content": text[i]}
          c["logprobs"] = P.chat_logprobs(self.tokenizer, lps[i]) if params.logprobs is not None else None
        else:
          c["text"] = text[i]
          c["logprobs"] = P.completion_logprobs(self.tokenizer, lps[i]) if params.logprobs is not None else None
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

    async def emit(idx, d):
      if d.finish_reason is not None:
        usage.completion_tokens += d.num_output_tokens
      if not d.text and d.finish_reason is None and not d.logprobs:
        return
      c: dict[str, Any] = {"index": idx, "finish_reason": d.finish_reason}
      if chat:
        c["delta"] = {"content": d.text} if d.text else {}
        c["logprobs"] = P.chat_logprobs(self.tokenizer, d.logprobs) if d.logprobs else None
      else:
        c["text"] = d.text
        c["logprobs"] = P.completion_logprobs(self.tokenizer, d.logprobs, offsets[idx]) if d.logprobs else None
        offsets[idx] += len(d.text)
      await send(chunk([c]))

    await emit(*first)
    async for idx, d in gen:
      await emit(idx, d)
    if include_usage:
      await send(chunk([], usage=usage.body()))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp

  async def models(self, request):
    return web.json_response({"object": "list", "data": [{
        "id": self.state["model_name"], "object": "model", "created": self.state["created"],
        "owned_by": "nanoflow-jax", "max_model_len": self.engine.engine.max_model_len}]})

  async def health(self, request):
    if self.engine.error is not None or not self.engine._thread.is_alive():
      return web.json_response({"status": "unhealthy"}, status=503)
    return web.json_response({"status": "ok"})

  async def metrics(self, request):
    return web.Response(body=generate_latest(self.state["metrics"].registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})

  async def tokenize(self, request):
    body = await _json_body(request)
    self._check_model(body)
    if "messages" in body:
      try:
        ids = self.tokenizer.apply_chat_template(P.messages_of(body), add_generation_prompt=P._bool(
            body, "add_generation_prompt", True), tokenize=True)
      except TokenizerError as e:
        raise P.ApiError(400, str(e), param="messages") from None
    elif isinstance(body.get("prompt"), str):
      ids = self.tokenizer.encode(body["prompt"], add_special_tokens=P._bool(body, "add_special_tokens", True))
    else:
      raise P.ApiError(400, "'prompt' (a string) or 'messages' is required", param="prompt")
    return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": self.engine.engine.max_model_len})

  async def detokenize(self, request):
    body = await _json_body(request)
    self._check_model(body)
    toks = P._int_list(body, "tokens")
    if "tokens" not in body:
      raise P.ApiError(400, "'tokens' is required", param="tokens")
    vocab = self.engine.engine.model.config.vocab_size
    if toks and max(toks) >= vocab:
      raise P.ApiError(400, f"token ids must lie in [0, {vocab})", param="tokens")
    return web.json_response({"prompt": self.tokenizer.decode(toks)})


def create_app(engine: AsyncEngine, model_name: str, api_key: str | None = None) -> web.Application:
  app = web.Application(middlewares=[_errors_and_auth], client_max_size=64 * 1024 * 1024)
  app[ENGINE] = engine
  metrics = Metrics(engine.engine)
  engine.on_step = metrics.step.observe
  app[STATE] = {"model_name": model_name, "api_key": api_key, "metrics": metrics, "created": P.now()}
  h = Handlers(app)
  app.router.add_post("/v1/completions", h.completions)
  app.router.add_post("/v1/chat/completions", h.chat)
  app.router.add_get("/v1/models", h.models)
  app.router.add_get("/health", h.health)
  app.router.add_get("/metrics", h.metrics)
  app.router.add_post("/tokenize", h.tokenize)
  app.router.add_post("/detokenize", h.detokenize)
  return app


async def serve(engine: AsyncEngine, model_name: str, host: str, port: int, api_key: str | None = None,
                ready: asyncio.Event | None = None, drain_timeout: float = 600.0) -> None:
  """Serves until SIGTERM/SIGINT; then stops accepting, drains the requests in flight, and returns."""
  app = create_app(engine, model_name, api_key)
  runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
  await runner.setup()
  site = web.TCPSite(runner, host, port)
  await site.start()
  log.info("serving %s on http://%s:%d", model_name, host, port)
  stop = asyncio.Event()
  loop = asyncio.get_running_loop()
  for sig in (signal.SIGTERM, signal.SIGINT):
    loop.add_signal_handler(sig, stop.set)
  if ready is not None:
    ready.set()
  await stop.wait()
  log.info("shutting down: no new requests; draining the ones in flight")
  engine.stop_accepting()
  await site.stop()
  await engine.drain(timeout=drain_timeout)
  await runner.cleanup()
  engine.shutdown()
  log.info("stopped")
