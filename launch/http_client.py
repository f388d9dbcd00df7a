"""benchmark.py's HTTP client for the online runs against a server (`--url`): a streamed /v1/completions
request counted chunk by chunk, on a session that lets idle connections go before any server would.
No flags here: tests import it in-process."""
from __future__ import annotations

import json


# Servers close a keep-alive connection left idle for a few seconds (uvicorn and vLLM after 5 s, ours after
# --header_timeout, 10 s). aiohttp's client keeps idle ones 15 s, so it can send a request on a connection the
# server is closing that moment: "Connection reset by peer" ended both of session 25's H200 online multi-round
# runs. Kept 4 s, ours close first; and a request whose connection fails before any response comes is sent once
# more (the server never began it).
CLIENT_KEEPALIVE_S = 4.0


def new_session():
  """The online runs' HTTP client. No cap on connections: aiohttp's default (100) would queue the requests past
  100 in flight inside the client, and their wait would be counted as the server's latency."""
  import aiohttp
  return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                               connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=CLIENT_KEEPALIVE_S))


async def post_once_more_on_reset(session, url: str, body: dict, headers: dict):
  """session.post's response (headers read), sent a second time if the connection failed before any of them."""
  import aiohttp
  try:
    return await session.post(url, json=body, headers=headers)
  except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
    return await session.post(url, json=body, headers=headers)


async def stream_completion(session, url: str, prompt, out_len: int, api_key: str | None = None,
                            ids_out: list | None = None, usage_out: dict | None = None):
  """Yields the number of tokens in each streamed chunk of one /v1/completions request (greedy, ignore_eos).
  ids_out: the generated token ids are appended to it (return_token_ids); usage_out: filled with the final
  usage."""
  body = {"prompt": prompt, "max_tokens": out_len, "ignore_eos": True, "temperature": 0.0, "stream": True,
          "logprobs": 0}
  if ids_out is not None:
    body["return_token_ids"] = True
  if usage_out is not None:
    body["stream_options"] = {"include_usage": True}
  headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
  async with await post_once_more_on_reset(session, url + "/v1/completions", body, headers) as resp:
    if resp.status != 200:
      raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
    async for line in resp.content:
      line = line.strip()
      if not line.startswith(b"data: ") or line == b"data: [DONE]":
        continue
      msg = json.loads(line[6:])
      if msg.get("usage") and usage_out is not None:
        usage_out.update(msg["usage"])
      if not msg.get("choices"):
        continue
      choice = msg["choices"][0]
      if ids_out is not None:
        ids_out.extend(choice.get("token_ids") or [])
      n = len((choice.get("logprobs") or {}).get("tokens") or [])
      if n:
        yield n
