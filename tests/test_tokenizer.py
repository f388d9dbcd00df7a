"""Tokenizers against the reference libraries; chat templates against transformers; streaming text."""
import json
import os

import pytest

import hf_models
from nanoflow_jax import tokenizer as tk

TEXTS = ["Hello world!", " leading space", "Héllo wörld, ça va? 日本語のテキスト。", "emoji 🙂 → ✓ ∑",
         "code:\n    return x * 2\n", "", "unseen wörds qzxj 🦄"]
LLAMA3_LIKE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role') }}{% endif %}<|start|>{{ message['role'] }}\n\n{{ message['content'] | trim }}"
    "<|eot|>{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n\n{% endif %}")
TOOLS_TEMPLATE = ("{%- for m in messages %}{%- if loop.index > 5 %}{% break %}{% endif %}"
                  "{{- m['role'] + ': ' + (m['content'] | tojson) }}\n{%- endfor %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 🙂 \"quoted\"  "},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "日本語?"}]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("bpe")
  hf_models.train_bpe_tokenizer(str(d), chat_template=LLAMA3_LIKE_TEMPLATE)
  with open(d / "generation_config.json", "w") as f:
    json.dump({"eos_token_id": [1, 2]}, f)
  return str(d)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("sp")
  hf_models.train_sentencepiece(str(d))
  return str(d)


def test_bpe_matches_transformers(bpe_dir):
  from transformers import AutoTokenizer
  ref = AutoTokenizer.from_pretrained(bpe_dir)
  ours = tk.load_tokenizer(bpe_dir)
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == ref(text)["input_ids"], text
    assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids)
  assert ours.bos_id == ref.bos_token_id and ids[0] == ours.bos_id
  assert ours.eos_ids == (1, 2)  # from generation_config.json, not only tokenizer_config's eos


def test_chat_template_matches_transformers(bpe_dir):
  from transformers import AutoTokenizer
  ref = AutoTokenizer.from_pretrained(bpe_dir)
  ours = tk.load_tokenizer(bpe_dir)
  for gen in (True, False):
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen) == ref.apply_chat_template(
        MESSAGES, add_generation_prompt=gen, tokenize=False)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=True) == list(
        ref.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=True, return_dict=False))
  assert ours.apply_chat_template(MESSAGES, chat_template=TOOLS_TEMPLATE) == ref.apply_chat_template(
      MESSAGES, chat_template=TOOLS_TEMPLATE, tokenize=False)
  with pytest.raises(tk.TokenizerError, match="bad role"):
    ours.apply_chat_template([{"role": "robot", "content": "x"}])


def test_chat_template_jinja_file_wins(bpe_dir, tmp_path):
  import shutil
  d = tmp_path / "t"
  shutil.copytree(bpe_dir, d)
  (d / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
  assert tk.load_tokenizer(str(d)).apply_chat_template(MESSAGES[:2]) == "[Be brief.][Héllo 🙂 \"quoted\"  ]"


def test_sentencepiece_matches_library(sp_dir):
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=os.path.join(sp_dir, "tokenizer.model"))
  ours = tk.load_tokenizer(sp_dir)
  assert isinstance(ours, tk.SentencePieceTokenizer)
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == [sp.bos_id()] + sp.encode(text)
    assert ours.decode(ids) == sp.decode(sp.encode(text))
  assert ours.bos_id == 1 and ours.eos_ids == (2,)
  with open(os.path.join(sp_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"add_bos_token": False, "add_eos_token": True}, f)
  no_bos = tk.load_tokenizer(sp_dir)
  assert no_bos.encode("Hello") == sp.encode("Hello") + [2]


@pytest.mark.parametrize("which", ["bpe", "sp", "tiny"])
def test_incremental_detokenizer_streams_exact_text(which, bpe_dir, sp_dir):
  tok = {"bpe": lambda: tk.load_tokenizer(bpe_dir), "sp": lambda: tk.load_tokenizer(sp_dir),
         "tiny": tk.tiny_tokenizer}[which]()
  prompt = tok.encode("Prompt: ")
  for text in TEXTS[1:]:
    gen = tok.encode(text, add_special_tokens=False)
    detok = tk.IncrementalDetokenizer(tok, prompt)
    deltas = [detok.push(t) for t in gen]
    assert "".join(deltas) == tok.decode(prompt + gen)[len(tok.decode(prompt)):]
    assert not any("\ufffd" in d for d in deltas)


def test_tiny_tokenizer_bytes_roundtrip():
  tok = tk.tiny_tokenizer()
  text = "Héllo 🙂 wörld"
  ids = tok.encode(text)
  assert ids[0] == tk.TINY_BOS_ID and ids[1:] == list(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.vocab_size == tk.TINY_VOCAB_SIZE
