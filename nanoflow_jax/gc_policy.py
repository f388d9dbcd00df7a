"""Python's cyclic garbage collector while an engine loop is busy.

A full (generation 2) collection walks every container the process holds: with thousands of requests in
flight that is every prompt's and output's token list, millions of elements, and the step that triggers it
stalls. On the GPU machine the 1024/512 and 1000/1000 runs showed isolated 0.4-0.6 s steps (about one per 500
steps in a 3000-request run, ~2% of its time; session 17); on the CPU one full collection with 3000 queued
1000-token prompts took 110-150 ms (docs/history/perf-notes.md, session 17).

So while a loop has work, automatic collection is off: the loop collects the young generations itself every
YOUNG_EVERY steps (the objects made since: a few ms), and the whole heap every FULL_EVERY busy steps (a bound
on cycles kept while a server never goes idle); when no loop is busy the collector is as it was. A step's
own garbage is freed by reference counting either way. Only loops that run until idle or stop in a `finally`
use this (Engine.run_until_done, which the benchmark drives too; the server's engine thread; multi-host
followers), so a caller stepping an engine by hand never leaves the process without its collector.

What a full collection walks is mostly what start-up made: modules, JAX's and the model's Python objects, the
compiled programs (~200k objects with the tiny model). The server's full collections took ~250 ms each on the
GPU machine (session 26: one every ~27 s at 5.4 ms steps, the TTFT and TPOT p99s of its online runs). So a
process that has started (model loaded, programs compiled) calls `freeze_startup_heap()`: the start-up's
garbage collected once, and everything alive then moved to the collector's permanent generation, which later
collections skip (gc.freeze; 112 ms -> under 1 ms on the CPU with the tiny model). Frozen objects that die later
are freed by reference counting as usual; only cycles among them stay.
"""
from __future__ import annotations

import gc
import logging
import threading
import time

log = logging.getLogger(__name__)

YOUNG_EVERY = 64       # steps between young collections while busy (generations 0 and 1)
FULL_EVERY = 5_000     # steps between full collections while busy (~4 min at 50 ms a step: one 0.5 s stall
                       # there costs ~0.2%, against ~2% left to Python; and cycles that outlive the young
                       # generations, a busy server's long requests among them, wait no longer than that)

_lock = threading.Lock()
_busy_loops = 0        # loops busy now, in any thread
_was_enabled = True    # the collector's state before the first of them


class BusyCollector:
  """One loop's view: `busy()` before each step that has work, `idle()` when the work is done and in a
  `finally` (the collector comes back when the last busy loop goes idle)."""

  def __init__(self, young_every: int = YOUNG_EVERY, full_every: int = FULL_EVERY):
    self.young_every, self.full_every = young_every, full_every
    self.active = False
    self.steps = 0
    self.full_seconds = 0.0   # spent in the full collections made while busy

  def busy(self) -> None:
    global _busy_loops, _was_enabled
    if not self.active:
      with _lock:
        if _busy_loops == 0:
          _was_enabled = gc.isenabled()
          gc.disable()
        _busy_loops += 1
      self.active = True
    self.steps += 1
    if self.steps % self.full_every == 0:
      t = time.perf_counter()
      gc.collect()
      self.full_seconds += time.perf_counter() - t
      log.info("full garbage collection while busy: %.0f ms", 1e3 * (time.perf_counter() - t))
    elif self.steps % self.young_every == 0:
      gc.collect(1)

  def idle(self) -> None:
    global _busy_loops
    if not self.active:
      return
    self.active = False
    with _lock:
      _busy_loops -= 1
      if _busy_loops == 0 and _was_enabled:
        gc.enable()


def freeze_startup_heap() -> int:
  """Collects start-up's garbage, then freezes every object alive now (the module docstring); returns how many are
  frozen. Called once a process has loaded its model and compiled its programs, before it serves."""
  gc.collect()
  gc.freeze()
  frozen = gc.get_freeze_count()
  log.info("froze %d start-up objects: full garbage collections skip them", frozen)
  return frozen
