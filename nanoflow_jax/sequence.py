"""One generated sequence (a request with n > 1 has n of them) and its host-side state."""
from __future__ import annotations

import dataclasses
import enum
import time

from nanoflow_jax.sampling_params import SamplingParams


class Status(enum.Enum):
  WAITING = "waiting"
  RUNNING = "running"
  FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
  seq_id: int
  request_id: str
  index: int                       # which of the request's n samples
  prompt_ids: list[int]
  params: SamplingParams
  seed: int
  arrival_time: float = dataclasses.field(default_factory=time.monotonic)
  output_ids: list[int] = dataclasses.field(default_factory=list)
  output_logprobs: list = dataclasses.field(default_factory=list)  # per token: (logprob, {id: logprob})
  status: Status = Status.WAITING
  num_computed: int = 0            # tokens whose KV is written or scheduled to be written
  inflight: int = 0                # sampled tokens on their way back from the device
  pages: list[int] = dataclasses.field(default_factory=list)
  slot: int | None = None
  finish_reason: str | None = None
  stop_reason: str | int | None = None
  text: str = ""                   # detokenized output (cut at a stop string)
  new_text: str = ""               # what the last token added to `text`
  emitted: int = 0                 # characters of `text` already streamed
  first_token_time: float | None = None
  finish_time: float | None = None
  num_preemptions: int = 0
  detokenizer: object = None
  page_keys: list = dataclasses.field(default_factory=list)   # prefix-cache keys of its full pages (so far)
  num_registered: int = 0          # of its pages, how many are registered in the prefix cache
  num_cached_tokens: int | None = None   # prompt tokens found in the prefix cache at its first admission
  prompt_logprobs: list | None = None   # per prompt position: None (the first) or a Logprob (prompt_logprobs)
  from_host: int = 0               # of its cached tokens, those the host KV tier gave back
  host_pages: list = dataclasses.field(default_factory=list)   # the pages it took from the host tier (last admission)
  matcher: object = None           # structured output: its grammar's state (structured.Matcher)

  @property
  def num_tokens(self) -> int:
    """Known tokens (prompt + received outputs); the in-flight one is not counted."""
    return len(self.prompt_ids) + len(self.output_ids)

  @property
  def num_uncomputed(self) -> int:
    """Tokens still to feed, the in-flight one included (its KV is not written yet either)."""
    return self.num_tokens + self.inflight - self.num_computed

  @property
  def is_prefilling(self) -> bool:
    # One token left is a decode; more is a prompt (or a preempted sequence being recomputed).
    return self.num_uncomputed > 1

  def token_at(self, pos: int) -> int:
    p = len(self.prompt_ids)
    return self.prompt_ids[pos] if pos < p else self.output_ids[pos - p]

  @property
  def finished(self) -> bool:
    return self.status is Status.FINISHED
