"""The engine's steps dispatched on a thread of their own (EngineConfig.overlap_dispatch).

Dispatching a step is the host's longest part on a GPU: XLA launches the step's kernels one by one from the
calling thread (6-11 ms a step for the 8B model, sessions 10-17), and the engine's Python (reading the last
step, detokenizing, stop rules, scheduling and building the next) waited for it. XLA releases the GIL while it
launches, so on a thread of its own the launches run beside that Python: the host's time per step becomes the
longer of the two instead of their sum, and a step's tokens reach their clients before the next step's launches
end instead of after.

Only this thread calls the executor (its device state: weights, KV cache, sampler state) while steps are in
flight, in the order they were submitted, so every process of a multi-host job dispatches alike. The host's
decisions (schedule, pages, prefix cache) stay on the engine's thread, in the same order as without this
thread: the outputs are the same.

The dispatcher waits for the GIL after each launch returns; Python's default switch interval (5 ms) let the
engine's Python hold it that long: a dispatch of ~9 ms took 13 ms beside 12 ms of Python (median of 40 on the
CPU; docs/history/perf-notes.md, session 19), 10.4 ms at 0.5 ms. The interval is lowered to SWITCH_INTERVAL_S
while a dispatcher is open (until the last one is closed: Engine.shutdown).
"""
from __future__ import annotations

import logging
import queue
import sys
import threading
from concurrent.futures import Future, wait
from typing import Any, Callable

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005
_open = 0                      # dispatchers not yet closed
_saved_interval: float | None = None   # the interpreter's switch interval before the first of them lowered it
_lock = threading.Lock()


class SkippedAfterFailure(RuntimeError):
  """A step submitted after an earlier one failed: it is not run (the device state may be gone)."""


def completed(fn: Callable[[], Any]) -> Future:
  """`fn` called now, on this thread (the engine without a dispatcher); its exception raised here."""
  f: Future = Future()
  f.set_result(fn())
  return f


class Dispatcher:
  """One daemon thread running submitted calls in order. After a call fails, the calls behind it are not run
  (each raises SkippedAfterFailure) until `drain()`: a step must not run on state a failed one left behind."""

  def __init__(self, name: str = "nanoflow-dispatch"):
    self._jobs: queue.SimpleQueue = queue.SimpleQueue()
    self._failed = False
    self._closed = False
    self._last: Future | None = None
    global _open, _saved_interval
    with _lock:
      _open += 1
      if sys.getswitchinterval() > SWITCH_INTERVAL_S:
        log.info("dispatching steps on a thread of their own: the interpreter's switch interval lowered from %.1f "
                 "to %.1f ms", 1e3 * sys.getswitchinterval(), 1e3 * SWITCH_INTERVAL_S)
        _saved_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
    self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
    self._thread.start()

  def submit(self, fn: Callable[[], Any]) -> Future:
    """fn's result (or exception) as a Future, once the calls before it have run."""
    if self._closed:
      raise RuntimeError("the dispatcher is closed")
    f: Future = Future()
    self._last = f
    self._jobs.put((fn, f))
    return f

  @property
  def failed(self) -> bool:
    """Whether a call failed since the last drain (the calls behind it are skipped)."""
    return self._failed

  def wait_idle(self) -> None:
    """Waits until every submitted call has ended."""
    if self._last is not None:
      wait([self._last])

  def drain(self) -> None:
    """Waits until every submitted call has ended (their errors are for their callers) and runs calls again
    after a failure."""
    self.wait_idle()
    self._failed = False

  def close(self) -> None:
    """Drains, then ends the thread; the last dispatcher closed gives the switch interval back."""
    global _open, _saved_interval
    if self._closed:
      return
    self.drain()
    self._closed = True
    self._jobs.put(None)
    self._thread.join()
    with _lock:
      _open -= 1
      if _open == 0 and _saved_interval is not None:
        sys.setswitchinterval(_saved_interval)
        _saved_interval = None

  def _loop(self) -> None:
    while True:
      item = self._jobs.get()
      if item is None:
        return
      fn, f = item
      if self._failed:
        f.set_exception(SkippedAfterFailure("not run: an earlier step failed"))
        continue
      try:
        f.set_result(fn())
      except BaseException as e:   # handed to the caller; nothing is lost by this thread
        self._failed = True         # (before the caller can see the error)
        f.set_exception(e)
