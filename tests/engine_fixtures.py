"""Shared set-up for engine tests: a converted tiny HF model and its transformers twin."""
import torch

import hf_models
from checkpoints.convert import convert


def hf_greedy(model, prompt, max_new_tokens):
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0)
  return out[0, len(prompt):].tolist()


def make_converted(arch, root):
  hf = hf_models.make_hf_model(arch, str(root / "hf"))
  convert(str(root / "hf"), str(root / "ckpt"), dtype="float32", progress=False)
  return hf, str(root / "ckpt")


def random_prompts(rng, lengths):
  return [rng.integers(2, hf_models.VOCAB, size=n).tolist() for n in lengths]
