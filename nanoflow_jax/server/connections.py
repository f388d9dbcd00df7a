"""Limits on client connections that aiohttp does not set itself: a cap on open connections and a deadline for
a request's headers.

A client that opens a connection and sends nothing, or sends its headers a byte at a time, holds a file
descriptor for as long as the server lets it; about 20,000 of them exhausted the descriptors and took the
server down (issue 24). Here a connection over the cap is closed as soon as it is accepted, and one that has
no request in progress for `header_timeout` seconds (after it opened, or after its last response) is closed.
The body's deadline is the handler's (app._read_body).
"""
from __future__ import annotations

import asyncio
import logging
import resource
import time

from aiohttp import web

log = logging.getLogger(__name__)


def raise_fd_limit() -> int:
  """Raises the soft limit on open files to the hard one (what servers do); returns the soft limit."""
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  if hard == resource.RLIM_INFINITY or soft < hard:
    try:
      resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
      soft = hard
    except (ValueError, OSError):
      pass
  return soft


class ConnectionGuard:
  def __init__(self, server: web.Server, max_connections: int, header_timeout: float):
    self.server = server
    self.max_connections = max_connections
    self.header_timeout = header_timeout
    self.refused = 0
    self.timed_out = 0
    # (plain dicts: aiohttp's handlers take no weak references; reap() drops the closed ones)
    self._since: dict = {}   # handler -> idle since
    self._busy: dict = {}    # handler -> requests in progress
    self._last_warning = 0.0
    self._task: asyncio.Task | None = None
    made = server.connection_made

    def connection_made(handler, transport):
      made(handler, transport)
      self._since[handler] = time.monotonic()
      if len(server.connections) > self.max_connections:
        self.refused += 1
        self._warn(f"{len(server.connections)} open connections, over --max_connections={self.max_connections}: "
                   f"closing new ones ({self.refused} so far)")
        handler.force_close()
    server.connection_made = connection_made   # the instance's hook: aiohttp calls it for every connection

  def _warn(self, msg: str) -> None:
    now = time.monotonic()
    if now - self._last_warning > 10:   # a flood must not flood the log too
      self._last_warning = now
      log.warning(msg)

  # --- the middleware marks requests in progress ----------------------------------------------------
  def begin(self, handler) -> None:
    self._busy[handler] = self._busy.get(handler, 0) + 1

  def end(self, handler) -> None:
    n = self._busy.get(handler, 1) - 1
    if n <= 0:
      self._busy.pop(handler, None)
      self._since[handler] = time.monotonic()
    else:
      self._busy[handler] = n

  def reap(self) -> int:
    """Closes connections idle (no request in progress) past the header deadline; returns how many."""
    now, closed = time.monotonic(), 0
    open_now = self.server.connections
    live = set(open_now)
    for h in [h for h in self._since if h not in live]:
      del self._since[h]
    for h in open_now:
      if h in self._busy:
        continue
      since = self._since.setdefault(h, now)
      if now - since > self.header_timeout:
        h.force_close()
        closed += 1
    self.timed_out += closed
    return closed

  def start(self) -> None:
    async def loop():
      while True:
        await asyncio.sleep(min(1.0, self.header_timeout / 4))
        self.reap()
    self._task = asyncio.get_running_loop().create_task(loop())

  def stop(self) -> None:
    if self._task is not None:
      self._task.cancel()
