"""Serving across hosts: every process's engine takes the same requests and runs the same steps.

In a multi-host job each step is one computation over every process's devices, so every process must run
the same step with the same inputs. The HTTP server runs on process 0 (the leader). Before each step it
publishes what changed since the last one (the requests it took and the aborts, in order) and whether it
steps, through the job's coordination store (host to host, nothing on the devices). The other processes
(followers) apply the same changes to their own engine and step with it. The engines' state then stays
identical, so each process builds the same inputs. That needs the same settings everywhere: when an engine is
built, `agree` checks them across the job (the server, the benchmark and the offline API alike).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging

from nanoflow_jax import gc_policy
from nanoflow_jax.engine import Engine
from nanoflow_jax.sampling_params import SamplingParams

log = logging.getLogger(__name__)

PREFIX = "nanoflow/steps/"
AGREE_PREFIX = "nanoflow/agree/"   # + n/: process 0's signature, each other process's answer, the verdict
AGREE_TIMEOUT_S = 600   # how long either side waits for the other to build its engine and answer
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
    value = _get(self.store, f"{PREFIX}{self.count}", timeout_ms)
    if value is None:
      return None
    self.count += 1
    return json.loads(value)


def _get(store, key: str, timeout_ms: int) -> str | None:
  """The store's value for `key`, waiting up to `timeout_ms`; None where none came."""
  try:
    return store.blocking_key_value_get(key, timeout_ms)
  except Exception as e:   # the store's timeout (an XLA runtime error); anything else is raised
    if "DEADLINE_EXCEEDED" in str(e) or "timed out" in str(e).lower():
      return None
    raise


class JobMismatch(ValueError):
  """The job's processes do not run the same thing (agree)."""


_agreements = itertools.count()   # every process builds its engines in the same order: the n-th agrees with the n-th


def agree(store, signature: dict, process_id: int, num_processes: int, timeout_s: float = AGREE_TIMEOUT_S,
          name: str | None = None) -> None:
  """Before an engine's first step, every process of a multi-host job checks that it runs what process 0 runs
  (job_signature: the same ops, model and engine settings). Without this a process started with other flags, or
  from other code, fails or diverges at some later step while the others wait on it in a collective: a hang.
  Process 0 publishes its signature; each other process compares and answers; process 0 then publishes its
  verdict. Every process raises JobMismatch, naming what differs, if any differed or did not answer: the whole
  job stops at start. `name`: this agreement's keys (default: a count of the agreements this process made)."""
  base = f"{AGREE_PREFIX}{next(_agreements) if name is None else name}/"
  timeout_ms = int(timeout_s * 1000)
  if process_id != 0:
    theirs = _get(store, base + "signature", timeout_ms)
    if theirs is None:
      raise JobMismatch(f"process 0 published no job signature within {timeout_s:.0f} s")
    differences = signature_differences(json.loads(theirs), signature)
    store.key_value_set(f"{base}hello/{process_id}", "; ".join(differences) or "ok")
    if differences:
      raise JobMismatch("this process does not run what process 0 runs (process 0's, then this one's): "
                        + "; ".join(differences))
    verdict = _get(store, base + "verdict", timeout_ms)
    if verdict != "ok":
      raise JobMismatch("process 0 stopped the job at start: " + (verdict or f"no verdict within {timeout_s:.0f} s"))
    return
  store.key_value_set(base + "signature", json.dumps(signature, sort_keys=True, default=str))
  problems = []
  for pid in range(1, num_processes):
    answer = _get(store, f"{base}hello/{pid}", timeout_ms)
    if answer is None:
      problems.append(f"process {pid} did not answer within {timeout_s:.0f} s")
    elif answer != "ok":
      problems.append(f"process {pid} differs (process 0's, then its): {answer}")
  store.key_value_set(base + "verdict", "; ".join(problems) or "ok")
  if problems:
    raise JobMismatch("the job's processes do not run the same thing: " + "; ".join(problems))


def _common_signature(model_config, engine_config) -> dict:
  """The ops this code knows, its version, the model's configuration and the engine's settings (less the
  process-local ones)."""
  from importlib import metadata
  settings = dataclasses.asdict(engine_config)
  for local in ("compilation_cache_dir", "overlap_dispatch"):   # where a process caches; how it dispatches
    settings.pop(local, None)
  try:
    version = metadata.version("nanoflow-jax")
  except metadata.PackageNotFoundError:   # run from a checkout that was not installed
    version = None
  return {"ops": list(KNOWN_OPS), "version": version, "model": dataclasses.asdict(model_config), "engine": settings}


def _as_stored(signature: dict) -> dict:
  return json.loads(json.dumps(signature, sort_keys=True, default=str))   # as it reads back from the store


def start_signature(model_config, engine_config, load: dict) -> dict:
  """What must be equal before any process loads its weights: a process loading another model, or the same
  one another way (`load`: dtype, random weights and their seed), would otherwise hang the job in the load's
  first collective, before job_signature is compared. The pipeline config is compared by its plan later (a
  file may lie at another path on each host)."""
  signature = _common_signature(model_config, engine_config)
  signature["engine"].pop("pipeline_config", None)
  signature["load"] = load
  return _as_stored(signature)


def job_signature(engine: Engine) -> dict:
  """What must be equal in every process of a job for their engines to decide alike: the ops this code
  knows, its version, the model's configuration and the engine's settings (less the process-local ones)."""
  signature = _common_signature(engine.model.config, engine.config)
  # the plan itself, not the path it came from (a file may lie at another path on each host)
  plan = getattr(engine.executor, "plan", None)
  signature["engine"]["pipeline_config"] = json.loads(plan.to_json()) if plan is not None else None
  signature.update(num_pages=engine.pool.num_pages, max_model_len=engine.max_model_len)
  return _as_stored(signature)


def signature_differences(leader: dict, mine: dict, path: str = "") -> list[str]:
  """Each field where two job signatures differ, as "path: leader's value != this one's"."""
  out = []
  for key in sorted(set(leader) | set(mine), key=str):
    a, b, where = leader.get(key), mine.get(key), f"{path}{key}"
    if isinstance(a, dict) and isinstance(b, dict):
      out += signature_differences(a, b, where + ".")
    elif a != b:
      out.append(f"{where}: {a!r} != {b!r}")
  return out


def add_op(request_id: str, prompt_ids: list[int], params: SamplingParams, prompt: str | None) -> tuple:
  return ("add", request_id, list(prompt_ids), dataclasses.asdict(params), prompt)


def _apply_add(engine: Engine, op: list) -> None:
  _, rid, prompt_ids, params, prompt = op
  engine.add_request(rid, prompt_ids, SamplingParams(**params), prompt=prompt)


# What a follower does for each op the leader publishes; its keys are the ops this code knows (job_signature).
_APPLY = {
    "add": _apply_add,
    "abort": lambda engine, op: engine.discard(op[1]),
    "reset_prefix_cache": lambda engine, op: engine.reset_prefix_cache(),
}
KNOWN_OPS = tuple(_APPLY)


def apply(engine: Engine, ops: list) -> None:
  """A follower applies the leader's ops, as the leader's engine thread did (async_engine._handle)."""
  for op in ops:
    if op[0] not in _APPLY:   # (agree() compared KNOWN_OPS when the engines were built: only a leader's bug)
      raise ValueError(f"unknown op {op[0]!r} from the leader")
    _APPLY[op[0]](engine, op)


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
