"""Comparing greedy outputs of two execution paths on random weights (the GPU tests). The reference asks
for MAX_LOGPROBS (20) top log-probabilities: with 5, a near tie whose other token ranked 6th or lower
counted as a real disagreement (session 9: the Triton path's one failure had no gap to judge by)."""

TIE = 0.25  # a gap in log-probability within the paths' measured differences (up to 0.1): either token may win


def first_differences(ref_outs, outs) -> list[tuple[int, int, float | None]]:
  """(sequence, position, the reference's log-probability gap to the other path's token, None where that
  token is not among the reference's top log-probabilities) at each sequence's first differing token."""
  diffs = []
  for n, (ref, out) in enumerate(zip(ref_outs, outs)):
    for pos, (a, b) in enumerate(zip(ref.token_ids, out.token_ids)):
      if a != b:
        top = ref.logprobs[pos].top
        diffs.append((n, pos, ref.logprobs[pos].logprob - top[b] if b in top else None))
        break
  return diffs


def real_disagreements(ref_outs, outs) -> int:
  """Sequences whose greedy tokens differ from the reference's where the reference's choice was not a near
  tie. Random weights give a flat distribution, so two tokens within bf16 rounding of each other are
  common; after the first difference the sequences rightly diverge, so only that position counts."""
  return sum(gap is None or gap >= TIE for _, _, gap in first_differences(ref_outs, outs))


def max_first_logprob_diff(ref_outs, outs) -> float:
  """The largest difference between the two paths' log-probabilities of each sequence's first token."""
  return max(abs(a.logprobs[0].logprob - b.logprobs[0].logprob) for a, b in zip(ref_outs, outs))
