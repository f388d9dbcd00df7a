"""Serving across hosts: every process's engine takes the same requests and runs the same steps.

In a multi-host job each step is one computation over every process's devices, so every process must run
the same step with the same inputs. The HTTP server runs on process 0 (the leader). Before each step it
publishes what changed since the last one (the requests it took and the aborts, in order) and whether it
steps, through the job's coordination store (host to host, nothing on the devices). The other processes
(followers) apply the same changes to their own engine and step with it. The engines' state then stays
identical, so each process builds the same inputs.
"""
from __future__ import annotations

import dataclasses
import json
import logging

from nanoflow_jax import gc_policy
from nanoflow_jax.engine import Engine
from nanoflow_jax.sampling_params import SamplingParams

log = logging.getLogger(__name__)

PREFIX = "nanoflow/steps/"
# Messages kept in the store. A follower is never this far behind: every message but the last few comes
# with a step, and a step's collectives hold the leader to within a step or two of the slowest process.
HORIZON = 1000
POLL_MS = 1000   # a follower's wait for the next message before it checks again


class StepChannel:
  """The leader's changes, one message per engine iteration that changes anything or steps. `store` has
  the coordination service's key_value_set / blocking_key_value_get / key_value_delete."""

  def __init__(self, store):
    self.store = store
    self.count = 0

  def publish(self, ops: list, step: bool, stop: bool = False) -> None:
    """Leader: the ops applied since the last message (("add", request_id, prompt_ids, params, prompt) or
    ("abort", request_id)), then whether it steps; `stop`: the followers leave."""
    self.store.key_value_set(f"{PREFIX}{self.count}", json.dumps({"ops": ops, "step": step, "stop": stop}))
    if self.count >= HORIZON:
      self.store.key_value_delete(f"{PREFIX}{self.count - HORIZON}")
    self.count += 1

  def receive(self, timeout_ms: int = POLL_MS) -> dict | None:
    """Follower: the next message, or None where none came within `timeout_ms`."""
    try:
      value = self.store.blocking_key_value_get(f"{PREFIX}{self.count}", timeout_ms)
    except Exception as e:   # the store's timeout (an XLA runtime error); anything else is raised
      if "DEADLINE_EXCEEDED" in str(e) or "timed out" in str(e).lower():
        return None
      raise
    self.count += 1
    return json.loads(value)


def add_op(request_id: str, prompt_ids: list[int], params: SamplingParams, prompt: str | None) -> tuple:
  return ("add", request_id, list(prompt_ids), dataclasses.asdict(params), prompt)


def apply(engine: Engine, ops: list) -> None:
  """A follower applies the leader's ops, as the leader's engine thread did (async_engine._handle)."""
  for op in ops:
    if op[0] == "add":
      _, rid, prompt_ids, params, prompt = op
      engine.add_request(rid, prompt_ids, SamplingParams(**params), prompt=prompt)
    elif op[0] == "abort":
      engine.discard(op[1])
    elif op[0] == "reset_prefix_cache":
      engine.reset_prefix_cache()
    else:
      raise ValueError(f"unknown op {op[0]!r} from the leader")


def step_and_collect(engine: Engine) -> BaseException | None:
  """One step, and the finished requests dropped, on the leader and the followers alike: a failed step
  aborts what is in flight (its error returned) so that no request hangs or holds pages."""
  error = None
  try:
    engine.step()
  except Exception as e:
    log.exception("engine step failed; aborting the requests in flight")
    error = e
    engine.abort_all("error")
  for rid in [r for r, req in engine.requests.items() if all(s.finished for s in req.seqs)]:
    engine.pop_output(rid)
  return error


def follow(engine: Engine, channel: StepChannel) -> None:
  """A follower's loop: until the leader stops, apply its changes and step when it steps. Full garbage
  collections are held off while it steps, as on the leader: a follower's stall would stall every process."""
  log.info("following the leader's steps (process 0 serves)")
  collector = gc_policy.BusyCollector()
  try:
    while True:
      msg = channel.receive()
      if msg is None:
        continue
      if msg["stop"]:
        log.info("the leader stopped")
        return
      apply(engine, msg["ops"])
      if msg["step"]:
        if not engine.has_work():   # the states have diverged: stepping would hang the job's collectives
          raise RuntimeError("the leader steps but this process has no work: the engines' states differ")
        collector.busy()
        step_and_collect(engine)
      else:
        collector.idle()
  finally:
    collector.idle()
