"""Tokenizers behind one interface: sentencepiece `tokenizer.model`, Hugging Face `tokenizer.json`, and
the built-in byte-level tokenizer of the `tiny` model; chat templates rendered with jinja2 the way
transformers renders them; an incremental detokenizer for streaming."""
from __future__ import annotations

import datetime
import json
import os
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")

# The built-in tokenizer: 256 byte tokens, then these specials.
TINY_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>")
TINY_BOS_ID, TINY_EOS_ID = 256, 257
TINY_VOCAB_SIZE = 256 + len(TINY_SPECIALS)
TINY_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# Texts longer than this are encoded without holding the GIL, so that the server's event loop runs meanwhile
# (a 1 MB text held it for 2 s on the CPU machine).
RELEASE_GIL_CHARS = 1 << 16


class TokenizerError(ValueError):
  pass


class Tokenizer:
  """The common interface. Subclasses implement _encode / decode / vocab_size."""
  bos_id: int | None = None
  eos_ids: tuple[int, ...] = ()
  bos_token: str | None = None
  eos_token: str | None = None
  chat_template: str | None = None
  special_tokens: dict[str, str] = {}

  @property
  def vocab_size(self) -> int:
    raise NotImplementedError

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    raise NotImplementedError

  def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                          tokenize: bool = False, chat_template: str | None = None, **kwargs):
    template = chat_template or self.chat_template
    if not template:
      raise TokenizerError("this model has no chat template; send a prompt instead of messages")
    ctx = dict(self.special_tokens, bos_token=self.bos_token or "", eos_token=self.eos_token or "")
    ctx.update(kwargs)
    text = _compile_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                              **ctx)
    # transformers tokenizes a rendered template without adding specials: the template has them.
    return self.encode(text, add_special_tokens=False) if tokenize else text


class HFTokenizer(Tokenizer):
  """A `tokenizer.json` through the tokenizers library (BOS comes from its post-processor)."""

  def __init__(self, tok):
    self._tok = tok

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text, add_special_tokens=True):
    if len(text) > RELEASE_GIL_CHARS:   # encode() holds the GIL throughout; encode_batch() lets it go
      return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids, skip_special_tokens=True):
    return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece `tokenizer.model` (LLaMA-2); BOS/EOS added per tokenizer_config."""

  def __init__(self, model_file: str, add_bos: bool = True, add_eos: bool = False):
    import sentencepiece as spm
    try:
      self._sp = spm.SentencePieceProcessor(model_file=model_file)
    except Exception as e:  # sentencepiece raises plain RuntimeError/OSError on a bad file
      raise TokenizerError(f"cannot read {model_file}: {e}") from None
    self.add_bos, self.add_eos = add_bos, add_eos
    bos, eos = self._sp.bos_id(), self._sp.eos_id()
    self.bos_id = bos if bos >= 0 else None
    self.eos_ids = (eos,) if eos >= 0 else ()
    self.bos_token = self._sp.id_to_piece(bos) if bos >= 0 else None
    self.eos_token = self._sp.id_to_piece(eos) if eos >= 0 else None

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text, add_special_tokens=True):
    ids = self._sp.encode(text)
    if add_special_tokens:
      ids = ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + ids
      ids = ids + ([self.eos_ids[0]] if self.add_eos and self.eos_ids else [])
    return ids

  def decode(self, ids, skip_special_tokens=True):
    ids = [int(i) for i in ids if 0 <= i < self.vocab_size]
    if skip_special_tokens:
      ids = [i for i in ids if not self._sp.is_control(i)]
    return self._sp.decode(ids)

  def token_to_id(self, token: str) -> int | None:
    i = self._sp.piece_to_id(token)
    return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte-level alphabet: every byte as a printable character, in byte order."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  out, n = {}, 0
  for b in range(256):
    if b in keep:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + n)
      n += 1
  return out


def tiny_tokenizer() -> HFTokenizer:
  """Built in code, so the tiny model needs no file: id b < 256 is byte b, then TINY_SPECIALS."""
  from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, processors
  vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
  raw = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  raw.decoder = decoders.ByteLevel()
  raw.add_special_tokens(list(TINY_SPECIALS))
  raw.post_processor = processors.TemplateProcessing(
      single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
      special_tokens=[("<|begin_of_text|>", TINY_BOS_ID)])
  tok = HFTokenizer(raw)
  tok.bos_id, tok.bos_token = TINY_BOS_ID, TINY_SPECIALS[0]
  tok.eos_ids, tok.eos_token = (TINY_EOS_ID, TINY_BOS_ID + 3), TINY_SPECIALS[1]
  tok.chat_template = TINY_CHAT_TEMPLATE
  return tok


def _token_str(value) -> str | None:
  # tokenizer_config.json stores special tokens as strings or as serialized AddedToken dicts.
  if isinstance(value, dict):
    return value.get("content")
  return value


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise TokenizerError(f"{path} is not valid JSON: {e}") from None


def _chat_template_from(path: str, tok_cfg: dict[str, Any]) -> str | None:
  jinja_file = os.path.join(path, "chat_template.jinja")
  if os.path.exists(jinja_file):
    with open(jinja_file) as f:
      return f.read()
  tmpl = _read_json(os.path.join(path, "chat_template.json")).get("chat_template") or tok_cfg.get("chat_template")
  if isinstance(tmpl, list):  # named templates: use "default"
    named = {t["name"]: t["template"] for t in tmpl}
    tmpl = named.get("default") or next(iter(named.values()), None)
  return tmpl


def load_tokenizer(path: str) -> Tokenizer:
  """Reads the tokenizer of a model directory (Hugging Face layout; converted checkpoints keep it)."""
  tok_cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
  tok_cfg.update({k: v for k, v in _read_json(os.path.join(path, "special_tokens_map.json")).items()
                  if k not in tok_cfg})
  json_file, sp_file = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
  if os.path.exists(json_file):
    from tokenizers import Tokenizer as RawTokenizer
    try:
      tok: Tokenizer = HFTokenizer(RawTokenizer.from_file(json_file))
    except Exception as e:
      raise TokenizerError(f"cannot read {json_file}: {e}") from None
  elif os.path.exists(sp_file):
    tok = SentencePieceTokenizer(sp_file, add_bos=tok_cfg.get("add_bos_token", True),
                                 add_eos=tok_cfg.get("add_eos_token", False))
  else:
    raise TokenizerError(f"no tokenizer.json or tokenizer.model in {path}")

  specials = {k: _token_str(v) for k, v in tok_cfg.items()
              if k.endswith("_token") and isinstance(_token_str(v), str)}
  tok.special_tokens = specials
  if specials.get("bos_token"):
    tok.bos_token = specials["bos_token"]
    tok.bos_id = tok.token_to_id(tok.bos_token)
  if specials.get("eos_token"):
    tok.eos_token = specials["eos_token"]
    eos = tok.token_to_id(tok.eos_token)
    tok.eos_ids = (eos,) if eos is not None else tok.eos_ids
  # generation_config.json's eos_token_id wins: LLaMA-3-Instruct stops on two ids.
  gen_eos = _read_json(os.path.join(path, "generation_config.json")).get("eos_token_id")
  if gen_eos is not None:
    tok.eos_ids = tuple(gen_eos) if isinstance(gen_eos, list) else (int(gen_eos),)
  tok.chat_template = _chat_template_from(path, tok_cfg)
  return tok


# --- chat templates -------------------------------------------------------------------------------
_TEMPLATE_CACHE: dict[str, jinja2.Template] = {}


def _raise_exception(message):
  raise TokenizerError(f"chat template error: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # transformers' own filter: unlike jinja's, it keeps non-ASCII characters and HTML as they are.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


def _compile_template(template: str) -> jinja2.Template:
  if template not in _TEMPLATE_CACHE:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    _TEMPLATE_CACHE[template] = env.from_string(template)
  return _TEMPLATE_CACHE[template]


# --- streaming ------------------------------------------------------------------------------------
class IncrementalDetokenizer:
  """Turns a stream of token ids into text deltas. Bytes of a multi-byte character that has not been
  completed yet (decoded as U+FFFD) are held back until it is. A few prompt tokens give the decoder
  the context it needs (sentencepiece drops a leading space at the start of a decode)."""

  CONTEXT = 5

  def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
    self.tokenizer = tokenizer
    self.skip_special_tokens = skip_special_tokens
    self.ids = list(prompt_ids[-self.CONTEXT:])
    self.prefix_offset = 0
    self.read_offset = len(self.ids)

  def _window(self) -> tuple[str, str]:
    """(the text already given out of the context window, the window's whole text)."""
    dec = self.tokenizer.decode
    return (dec(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens),
            dec(self.ids[self.prefix_offset:], self.skip_special_tokens))

  def push(self, token_id: int) -> str:
    self.ids.append(int(token_id))
    prefix, full = self._window()
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
      delta = full[len(prefix):]
      self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
      return delta
    return ""

  def flush(self) -> str:
    """At the end: what is held back, decoded as it stands (incomplete UTF-8 as U+FFFD, as transformers'
    decode of the whole output gives it)."""
    prefix, full = self._window()
    self.prefix_offset = self.read_offset = len(self.ids)
    return full[len(prefix):] if len(full) > len(prefix) else ""
