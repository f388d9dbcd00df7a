"""Per-request sampling parameters, validated the way vLLM users expect (clear ValueError messages)."""
from __future__ import annotations

import dataclasses
import math

MAX_LOGPROBS = 20      # top-N logprobs are computed on the device for every sampled row
MAX_LOGIT_BIAS = 300   # OpenAI's bound
MAX_BANNED_IDS = 32    # EOS + stop_token_ids that min_tokens must suppress
INT32_MAX = 2**31 - 1  # token ids, top_k and lengths live in int32 arrays on the host and the device


@dataclasses.dataclass
class SamplingParams:
  n: int = 1
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = -1               # -1 or 0: off
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  seed: int | None = None
  max_tokens: int | None = 16   # None: up to max_model_len
  min_tokens: int = 0
  stop: list[str] | str | None = None
  stop_token_ids: list[int] | None = None
  ignore_eos: bool = False
  logprobs: int | None = None   # top-N logprobs of each generated token (0: only the sampled one)
  skip_special_tokens: bool = True
  include_stop_str_in_output: bool = False
  detokenize: bool = True       # False: token ids only (benchmarks), no text and no stop strings
  # vLLM's StructuredOutputsParams as a dict: one of json (a schema), json_object, regex, choice, grammar (Lark)
  structured_outputs: dict | None = None
  logit_bias: dict[int, float] | None = None
  prompt_logprobs: int | None = None   # each prompt token's log-prob and the top-N at its position (vLLM's)   # token id -> added to its logit (OpenAI: at most 300, in [-100, 100])

  def __post_init__(self):
    if isinstance(self.stop, str):
      self.stop = [self.stop]
    self.stop = list(self.stop or [])
    self.stop_token_ids = list(self.stop_token_ids or [])
    self.validate()

  def validate(self) -> None:
    def check(ok, msg):
      if not ok:
        raise ValueError(msg)
    check(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
      v = getattr(self, name)
      check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
            f"{name} must be a finite number, got {v!r}")
    check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
    check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
    check(isinstance(self.top_k, int) and -1 <= self.top_k <= INT32_MAX,
          f"top_k must be -1 (off) or in [1, {INT32_MAX}], got {self.top_k!r}")
    check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
    check(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
    check(-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
    check(-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
    check(self.max_tokens is None or (isinstance(self.max_tokens, int) and 1 <= self.max_tokens <= INT32_MAX),
          f"max_tokens must be in [1, {INT32_MAX}], got {self.max_tokens!r}")
    check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= INT32_MAX,
          f"min_tokens must be in [0, {INT32_MAX}], got {self.min_tokens!r}")
    check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
          f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
    check(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
    check(all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings")
    check(all(isinstance(t, int) and 0 <= t <= INT32_MAX for t in self.stop_token_ids),
          f"stop_token_ids must be ids in [0, {INT32_MAX}]")
    check(len(self.stop_token_ids) <= MAX_BANNED_IDS - 4, f"at most {MAX_BANNED_IDS - 4} stop_token_ids")
    check(self.detokenize or not self.stop, "stop strings need detokenize=True")
    check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
          f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
    check(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and not isinstance(
        self.prompt_logprobs, bool) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
        f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
    if self.logit_bias is not None:
      check(isinstance(self.logit_bias, dict) and len(self.logit_bias) <= MAX_LOGIT_BIAS,
            f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to numbers")
      for t, v in self.logit_bias.items():
        check(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT32_MAX,
              f"logit_bias keys must be token ids, got {t!r}")
        check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and -100 <= v <= 100,
              f"logit_bias values must be numbers in [-100, 100], got {v!r}")
    if self.structured_outputs is not None:   # (StructuredOutputError is a ValueError)
      from nanoflow_jax.structured import check_spec
      check_spec(self.structured_outputs)

  @property
  def greedy(self) -> bool:
    return self.temperature < 1e-5
