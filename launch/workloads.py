"""Request length workloads of the NanoFlow paper: constant, the Splitwise trace, LMSYS- and ShareGPT-like."""
from __future__ import annotations

import csv
import math
import os

import numpy as np

SPLITWISE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workloads", "azure_llm_conv_2023.csv")
# mean (sd) of input and output tokens, from the paper
SYNTHETIC = {"lmsys": ((102, 169), (222, 210)), "sharegpt": ((246, 547), (322, 244))}
CONSTANT = {"512-512": (512, 512), "1024-512": (1024, 512), "512-1024": (512, 1024),
            "1000-1000": (1000, 1000)}   # TensorRT-LLM's published table
NAMES = [*CONSTANT, "splitwise", *SYNTHETIC, "multiround"]
# Multi-round chats (issue 28): a system prompt every conversation shares, LMSYS-like user turns and answers,
# 1 + geometric(0.4) rounds (mean 2.5, at most 8); each round's prompt is the whole history plus a new turn.
MULTIROUND = {"system": 512, "user": (102, 169), "output": (222, 210), "p_more": 0.6, "max_rounds": 8}


def _lognormal(rng, mean, sd, n):
  sigma2 = math.log(1 + (sd / mean) ** 2)
  return rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2), n)


def read_csv(path: str) -> list[tuple[int, int]]:
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    if not reader.fieldnames or not {"ContextTokens", "GeneratedTokens"} <= set(reader.fieldnames):
      raise ValueError(f"{path}: needs ContextTokens and GeneratedTokens columns, has {reader.fieldnames}")
    return [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in reader]


def lengths(name: str, num_requests: int, seed: int = 0, workload_file: str | None = None, sample: bool = False,
            max_model_len: int | None = None) -> list[tuple[int, int]]:
  """(input, output) token counts for `num_requests` requests; clipped to max_model_len, both >= 1."""
  rng = np.random.default_rng(seed)
  if workload_file or name == "splitwise":
    rows = read_csv(workload_file or SPLITWISE)
    if sample:
      rows = [rows[i] for i in rng.choice(len(rows), size=min(num_requests, len(rows)), replace=False)]
    out = rows[:num_requests]
  elif name in CONSTANT:
    out = [CONSTANT[name]] * num_requests
  elif name in SYNTHETIC:
    (mi, si), (mo, so) = SYNTHETIC[name]
    out = list(zip(_lognormal(rng, mi, si, num_requests).astype(int), _lognormal(rng, mo, so, num_requests).astype(int)))
  else:
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(NAMES)} or --workload_file")
  res = []
  for i, o in out:
    i, o = max(int(i), 1), max(int(o), 1)
    if max_model_len:
      i = min(i, max_model_len - 1)
      o = min(o, max_model_len - i)
    res.append((i, o))
  return res


def multiround(num_conversations: int, seed: int = 0, max_model_len: int | None = None) -> list[list[tuple[int, int]]]:
  """Per conversation, its rounds' (user turn, output) token counts; a conversation stops before a round
  whose prompt and output would pass max_model_len (the shared system prompt counted)."""
  rng = np.random.default_rng(seed)
  m = MULTIROUND
  out = []
  for _ in range(num_conversations):
    rounds = min(int(rng.geometric(1 - m["p_more"])), m["max_rounds"])
    users = np.maximum(_lognormal(rng, *m["user"], rounds).astype(int), 1)
    outs = np.maximum(_lognormal(rng, *m["output"], rounds).astype(int), 1)
    conv, total = [], m["system"]
    for u, o in zip(users, outs):
      if max_model_len and total + u + o > max_model_len:
        break
      conv.append((int(u), int(o)))
      total += u + o
    out.append(conv or [(1, 1)])
  return out
