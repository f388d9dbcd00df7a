"""Multi-host start-up on JAX's multi-controller runtime: every process runs the same program over all
hosts' devices, after `jax.distributed.initialize`. Call `initialize` before anything touches a device."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> bool:
  """Joins the job when a coordinator is given; False (single host) otherwise. Raises on bad flags."""
  if not coordinator_address:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise ValueError("--num_processes/--process_id need --coordinator_address")
    return False
  if num_processes is None or process_id is None:
    raise ValueError("--coordinator_address needs --num_processes and --process_id")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id must be in [0, {num_processes}), got {process_id}")
  host, _, port = coordinator_address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"--coordinator_address must be HOST:PORT, got {coordinator_address!r}")
  import jax
  try:  # cross-process collectives between CPU devices (tests, CPU-only clusters)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception:  # an option name this JAX does not know: GPUs use NCCL anyway
    pass
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  log.info("process %d of %d; %d devices in the job, %d here", jax.process_index(), jax.process_count(),
           jax.device_count(), jax.local_device_count())
  return True


def shared_seed() -> int | None:
  """A random seed that every process of a multi-host job gets the same (process 0's, broadcast); None
  (draw your own) in a single-process run."""
  import jax
  if jax.process_count() == 1:
    return None
  import random

  import numpy as np
  from jax.experimental import multihost_utils
  mine = np.asarray(random.SystemRandom().getrandbits(31), np.int32)
  return int(multihost_utils.broadcast_one_to_all(mine))
