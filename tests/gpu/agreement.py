"""Comparing greedy outputs of two execution paths on random weights (the GPU tests)."""

TIE = 0.25  # a gap in log-probability within the paths' measured differences (up to 0.1): either token may win


def real_disagreements(ref_outs, outs) -> int:
  """Sequences whose greedy tokens differ from the reference's where the reference's choice was not a near
  tie. Random weights give a flat distribution, so two tokens within bf16 rounding of each other are
  common; after the first difference the sequences rightly diverge, so only that position counts."""
  bad = 0
  for ref, out in zip(ref_outs, outs):
    for pos, (a, b) in enumerate(zip(ref.token_ids, out.token_ids)):
      if a != b:
        top = ref.logprobs[pos].top
        bad += not (b in top and ref.logprobs[pos].logprob - top[b] < TIE)
        break
  return bad


def max_first_logprob_diff(ref_outs, outs) -> float:
  """The largest difference between the two paths' log-probabilities of each sequence's first token."""
  return max(abs(a.logprobs[0].logprob - b.logprobs[0].logprob) for a, b in zip(ref_outs, outs))
