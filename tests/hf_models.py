"""Tiny Hugging Face models and tokenizers built inside the tests (nothing is downloaded)."""
from __future__ import annotations

import os

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world! Héllo wörld, ça va? 日本語のテキスト。",
          "Large language models serve tokens; nano-batches overlap compute, memory and network.",
          "def f(x):\n    return x * 2  # code\n", "emoji 🙂 and symbols ∑ ∫ → ✓"] * 20

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# name -> (config class name, kwargs)
ARCHS = {
    "llama2": ("LlamaConfig", dict(num_key_value_heads=4)),
    "llama3": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=12)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
}
VOCAB = 320


def train_bpe_tokenizer(out_dir: str, vocab_size: int = 300, chat_template: str | None = None):
  """A byte-level BPE `tokenizer.json` (LLaMA-3 style: BOS added by the post-processor), saved through
  transformers so the directory looks like a real checkpoint's."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<|eot|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                     special_tokens=[("<s>", tok.token_to_id("<s>"))])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
  if chat_template:
    fast.chat_template = chat_template
  fast.save_pretrained(out_dir)
  return fast


def train_sentencepiece(out_dir: str, vocab_size: int = 400) -> str:
  import sentencepiece as spm
  os.makedirs(out_dir, exist_ok=True)
  text = os.path.join(out_dir, "corpus.txt")
  with open(text, "w") as f:
    f.write("\n".join(CORPUS))
  spm.SentencePieceTrainer.train(input=text, model_prefix=os.path.join(out_dir, "tokenizer"),
                                 vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
                                 character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                 minloglevel=2)
  os.remove(text)
  os.remove(os.path.join(out_dir, "tokenizer.vocab"))
  return os.path.join(out_dir, "tokenizer.model")


def make_hf_model(arch: str, out_dir: str, seed: int = 0, shard_size: str = "40KB", **overrides):
  """Builds a random tiny model of `arch` with transformers, saves it sharded with a tokenizer; returns it."""
  import torch
  import transformers
  cls_name, kw = ARCHS[arch]
  cfg = getattr(transformers, cls_name)(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=512, bos_token_id=0, eos_token_id=1, **{**kw, **overrides})
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
  with torch.no_grad():  # norms initialise to ones; make them random so a mixed-up norm shows
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  model.save_pretrained(out_dir, max_shard_size=shard_size)
  train_bpe_tokenizer(out_dir)
  return model
