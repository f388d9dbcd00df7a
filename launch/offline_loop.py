"""The offline driving loop the benchmark and the lab's measurements share: step the engine until it has no
work, multi-round conversations' next rounds added as their predecessors finish, and Python's full garbage
collections held off meanwhile (nanoflow_jax/gc_policy.py)."""
from __future__ import annotations

from typing import Callable

from nanoflow_jax import gc_policy


def run(engine, conversations=None, before_step: Callable[[int], None] | None = None,
        after_step: Callable[[int], None] | None = None) -> int:
  """Steps `engine` until it has no work; `conversations` (launch.conversations.Conversations, already started)
  advanced after every step; the hooks get the step's index. Returns the number of steps."""
  collector = gc_policy.BusyCollector()
  step = 0
  try:
    while engine.has_work():
      if before_step is not None:
        before_step(step)
      collector.busy()
      engine.step()
      if conversations is not None:
        conversations.advance(engine)
      step += 1
      if after_step is not None:
        after_step(step)
  finally:
    collector.idle()
  return step
