"""What callers get back: finished outputs (offline API) and streamed deltas (server)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Logprob:
  token_id: int
  logprob: float
  top: dict[int, float]          # top-N alternatives (N = SamplingParams.logprobs)


@dataclasses.dataclass
class CompletionOutput:
  index: int
  text: str
  token_ids: list[int]
  finish_reason: str | None      # "stop", "length", "abort" or None while running
  stop_reason: str | int | None = None
  logprobs: list[Logprob] | None = None

  @property
  def cumulative_logprob(self) -> float | None:
    """The sampled tokens' summed log-probability (as vLLM reports it: where logprobs were requested)."""
    return None if self.logprobs is None else float(sum(lp.logprob for lp in self.logprobs))


@dataclasses.dataclass
class RequestMetrics:
  arrival_time: float
  first_token_time: float | None
  finish_time: float | None
  num_preemptions: int = 0

  @property
  def ttft(self) -> float | None:
    return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclasses.dataclass
class RequestOutput:
  request_id: str
  prompt: str | None
  prompt_token_ids: list[int]
  outputs: list[CompletionOutput]
  finished: bool
  metrics: list[RequestMetrics]  # one per sample
  num_cached_tokens: int | None = None   # prompt tokens the prefix cache held (vLLM's name; the first sample's)
  prompt_logprobs: list | None = None    # with SamplingParams.prompt_logprobs: None, then a Logprob per prompt token


@dataclasses.dataclass
class Delta:
  """New output of one sample since the last delta (streaming)."""
  request_id: str
  index: int
  text: str
  token_ids: list[int]
  logprobs: list[Logprob] | None
  finish_reason: str | None
  stop_reason: str | int | None = None
  num_prompt_tokens: int = 0
  num_output_tokens: int = 0
  num_cached_tokens: int = 0     # of the prompt, found in the prefix cache
  prompt_logprobs: list | None = None   # on a request's first sample's last delta, where asked for
