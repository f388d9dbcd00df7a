"""Multi-round conversations driven through the engine (benchmark --workload=multiround, issue 28): each
conversation's next round arrives when its previous one finished, its prompt the whole history (the shared
system prompt, every earlier user turn and answer as generated) plus a new user turn."""
from __future__ import annotations

import numpy as np

from launch import workloads


class Conversations:
  def __init__(self, num_conversations: int, seed: int, vocab: int, max_model_len: int, params):
    """params(out_len) -> SamplingParams of a round."""
    rng = np.random.default_rng(seed)
    self.system = rng.integers(0, vocab, workloads.MULTIROUND["system"]).tolist()
    self.rounds = workloads.multiround(num_conversations, seed, max_model_len)
    self.users = [[rng.integers(0, vocab, u).tolist() for u, _ in conv] for conv in self.rounds]
    self.history = [list(self.system) for _ in self.rounds]
    self.next_round = [0] * len(self.rounds)
    self.params = params
    self.finished: list[str] = []
    self.outputs = []             # every finished round's RequestOutput
    self.prompt_tokens = 0

  @property
  def num_requests(self) -> int:
    return sum(len(c) for c in self.rounds)

  @property
  def total_output(self) -> int:
    return sum(o for c in self.rounds for _, o in c)

  def _add(self, engine, c: int) -> None:
    k = self.next_round[c]
    prompt = self.history[c] + self.users[c][k]
    self.prompt_tokens += len(prompt)
    engine.add_request(f"c{c}-r{k}", prompt, self.params(self.rounds[c][k][1]),
                       on_delta=lambda d: self.finished.append(d.request_id) if d.finish_reason else None)

  def start(self, engine) -> None:
    for c in range(len(self.rounds)):
      self._add(engine, c)

  def advance(self, engine) -> None:
    """After a step: each finished round's output joins its history, and the next round arrives."""
    done, self.finished = self.finished, []
    for rid in dict.fromkeys(done):
      out = engine.pop_output(rid)
      self.outputs.append(out)
      c, k = (int(x[1:]) for x in rid.split("-"))
      self.history[c] = list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
      self.next_round[c] = k + 1
      if k + 1 < len(self.rounds[c]):
        self._add(engine, c)
