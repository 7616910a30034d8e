"""Tokenizers: load a local Hugging Face tokenizer directory; convert a sentencepiece one; build the demo one.

A directory that holds only a sentencepiece `tokenizer.model` (InternLM2 and Llama-2 style models,
whose own fast tokenizer is remote code) is converted with transformers' sentencepiece converter
when it is loaded; its code is never run. The result encodes as the slow tokenizer of that
directory does: the text is cut at the added tokens of `tokenizer_config.json`, and sentencepiece
encodes each piece in between as a sentence of its own. Every conversion is checked against
sentencepiece itself before it is used.
"""

import json
import os
import re
import shutil
from collections.abc import Iterable
from typing import Any

from csft_jax import files
from csft_jax.configuration import resolve_path
from csft_jax.data.errors import DataError

SENTENCEPIECE_FILE = "tokenizer.model"
FAST_TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# The files of a tokenizer directory that decide its token ids and chat template (copied beside
# exported weights; fingerprinted by the tokenize-once cache).
TOKENIZER_FILES = (
  FAST_TOKENIZER_FILE,
  TOKENIZER_CONFIG_FILE,
  "special_tokens_map.json",
  SENTENCEPIECE_FILE,
  "vocab.json",
  "merges.txt",
  "added_tokens.json",
  "chat_template.jinja",
)

_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# Texts a conversion must encode exactly as sentencepiece does: Chinese, runs of spaces at the
# start, middle and end, newlines, tabs, digits, and bytes outside any vocabulary (byte fallback).
_PROBE_TEXTS = (
  "患者，男，45岁。主诉：反复胸痛3天，加重1小时。",
  "  two  spaces\n\nthen\ttabs and trailing  ",
  "\n开头换行 1234567890 ５ ",
  "emoji 😀, ü, ᚠ",
  " ",
)

# Special tokens of the demo tokenizer: enough for every built-in chat template.
DEMO_SPECIAL_TOKENS = (
  "<|endoftext|>",
  "<|im_start|>",
  "<|im_end|>",  # chatml / Qwen, internlm2
  "<s>",
  "</s>",  # internlm2 BOS/EOS
  "<|begin_of_text|>",
  "<|end_of_text|>",
  "<|start_header_id|>",
  "<|end_header_id|>",
  "<|eot_id|>",  # llama3
)
DEMO_CHAT_TEMPLATE = (
  "{% for message in messages %}"
  "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def has_tokenizer(path: str) -> bool:
  """Whether the directory `path` holds a tokenizer of its own (`load_tokenizer` reads it)."""
  return any(
    os.path.isfile(os.path.join(path, name))
    for name in (FAST_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SENTENCEPIECE_FILE)
  )


def is_sentencepiece_only(path: str) -> bool:
  """True for a directory with a sentencepiece `tokenizer.model` and no `tokenizer.json`."""
  return os.path.isfile(os.path.join(path, SENTENCEPIECE_FILE)) and not os.path.isfile(
    os.path.join(path, FAST_TOKENIZER_FILE)
  )


def load_tokenizer(path: str):
  """Loads a fast tokenizer from a local Hugging Face directory, offline, never running its code.

  Args:
    path: directory with tokenizer.json/tokenizer_config.json, or with a sentencepiece
      tokenizer.model only (converted, see the module docstring); resolved by
      `csft_jax.configuration.resolve_path`.

  Returns:
    A `transformers` fast tokenizer (its `backend_tokenizer` gives offsets).
  """
  import transformers  # Slow to import; only the pipeline needs it.

  full = os.path.normpath(resolve_path(path))
  if not os.path.isdir(full):
    raise DataError(f"config.data.tokenizer: {path!r} is not a directory (tried {full})")
  if is_sentencepiece_only(full):
    return tokenizer_from_sentencepiece(full)
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(full, local_files_only=True, trust_remote_code=False)
  except (OSError, ValueError) as e:
    raise DataError(f"config.data.tokenizer: cannot load a tokenizer from {full}: {e}") from e
  if not getattr(tokenizer, "is_fast", False):
    raise DataError(f"config.data.tokenizer: {full} gives a slow tokenizer; add its tokenizer.json")
  return tokenizer


def tokenizer_from_sentencepiece(path: str):
  """The fast tokenizer of a sentencepiece directory, converted with transformers' converter.

  Args:
    path: directory with tokenizer.model and optionally tokenizer_config.json, whose
      `added_tokens_decoder` (id -> token) names or adds tokens (InternLM2 renames its
      placeholder pieces to `<|im_start|>`, ... this way), and whose special tokens,
      `add_bos_token`/`add_eos_token` (default true/false, as InternLM2 and Llama-2),
      `legacy` and `chat_template` are kept.

  Returns:
    A `transformers.PreTrainedTokenizerFast` that encodes as the directory's slow tokenizer.

  Raises:
    DataError when the files disagree (a token without an id, an id given twice), the model is
    not BPE, or the result encodes a probe text differently from sentencepiece.
  """
  import transformers
  from tokenizers import AddedToken
  from transformers.convert_slow_tokenizer import SpmConverter

  model_file = os.path.join(path, SENTENCEPIECE_FILE)
  config_file = os.path.join(path, TOKENIZER_CONFIG_FILE)
  config = (
    files.read_json(config_file, what="tokenizer settings", error=DataError) if os.path.isfile(config_file) else {}
  )
  proto = _read_sentencepiece_proto(model_file)
  if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
    raise DataError(
      f"{model_file}: a {proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)} "
      "sentencepiece model; only BPE models (InternLM2, Llama-2 style) are converted here. "
      f"Add the model's {FAST_TOKENIZER_FILE} instead."
    )
  added = _added_tokens(config, config_file)
  pieces = [piece.piece for piece in proto.pieces]
  vocab = {}
  for i, piece in enumerate(pieces):
    name = added[i]["content"] if i in added else piece
    if name in vocab:
      raise DataError(
        f"{config_file}: added_tokens_decoder names id {i} {name!r}, which {model_file} already "
        f"has as id {vocab[name]}; give each token one id."
      )
    vocab[name] = i
  extra_ids = sorted(i for i in added if i >= len(pieces))
  if extra_ids != list(range(len(pieces), len(pieces) + len(extra_ids))):
    raise DataError(
      f"{config_file}: added_tokens_decoder ids {extra_ids} beyond the {len(pieces)} pieces of "
      f"{model_file} must continue them without gaps (from {len(pieces)})."
    )

  # legacy (the default, as InternLM2's tokenizer): each piece between added tokens gets a dummy prefix.
  legacy = {} if config.get("legacy", True) else {"legacy": False}
  backend = SpmConverter.build_tokenizer_from_spm_proto(proto=proto, vocab=vocab, **legacy)
  # Matched in the raw text (not normalized), so each piece between them gets its own dummy
  # prefix, as the slow tokenizer's sentencepiece calls do.
  backend.add_tokens(
    [
      AddedToken(
        t["content"],
        special=t.get("special", True),
        normalized=False,
        lstrip=t.get("lstrip", False),
        rstrip=t.get("rstrip", False),
        single_word=t.get("single_word", False),
      )
      for _, t in sorted(added.items())
    ]
  )
  moved = {t["content"]: i for i, t in added.items() if backend.token_to_id(t["content"]) != i}
  if moved:
    raise DataError(f"{config_file}: added tokens {moved} did not get their ids in the converted tokenizer.")

  named = {key: _special_token(config, key, proto) for key in _NAMED_SPECIAL_TOKENS}
  extra = [t.get("content") if isinstance(t, dict) else t for t in config.get("additional_special_tokens") or ()]
  vocab = backend.get_vocab()
  missing = {key: token for key, token in named.items() if token is not None and token not in vocab}
  if any(t not in vocab for t in extra):
    missing["additional_special_tokens"] = [t for t in extra if t not in vocab]
  if missing:
    raise DataError(
      f"{config_file}: {missing} are neither pieces of {model_file} nor in added_tokens_decoder; "
      "fix the token names or add them there with their ids."
    )
  template_file = os.path.join(path, "chat_template.jinja")
  chat_template = config.get("chat_template")
  if chat_template is None and os.path.isfile(template_file):
    with open(template_file, encoding="utf-8") as f:
      chat_template = f.read()
  tokenizer = transformers.PreTrainedTokenizerFast(
    tokenizer_object=backend,
    name_or_path=path,
    chat_template=chat_template,
    add_bos_token=config.get("add_bos_token", True),
    add_eos_token=config.get("add_eos_token", False),
    clean_up_tokenization_spaces=False,
    model_max_length=config.get("model_max_length", int(1e30)),
    additional_special_tokens=extra,
    **named,
  )
  _check_against_sentencepiece(tokenizer, model_file, {t["content"]: {**t, "id": i} for i, t in added.items()})
  return tokenizer


def save_converted_tokenizer(tokenizer, source: str, out_dir: str) -> None:
  """Writes a tokenizer converted from the sentencepiece directory `source` to `out_dir`.

  `out_dir` gets tokenizer.json, a tokenizer_config.json naming no remote code, the chat template
  (chat_template.jinja) and the source's tokenizer.model beside them; it loads with
  `AutoTokenizer.from_pretrained(out_dir)` or `load_tokenizer(out_dir)` without converting again.
  """
  os.makedirs(out_dir, exist_ok=True)
  tokenizer.save_pretrained(out_dir)
  config_file = os.path.join(out_dir, TOKENIZER_CONFIG_FILE)
  config = files.read_json(config_file, what="tokenizer settings", error=DataError)
  config.pop("auto_map", None)
  config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the class every transformers version knows
  files.write_json_atomic(config_file, config)
  source_model = os.path.join(source, SENTENCEPIECE_FILE)
  if os.path.abspath(source_model) != os.path.abspath(os.path.join(out_dir, SENTENCEPIECE_FILE)):
    shutil.copyfile(source_model, os.path.join(out_dir, SENTENCEPIECE_FILE))


def _read_sentencepiece_proto(model_file: str):
  try:
    from sentencepiece import sentencepiece_model_pb2
  except ImportError as e:
    raise DataError(
      f"{model_file}: converting a sentencepiece tokenizer needs the sentencepiece and protobuf "
      "packages (pip install sentencepiece protobuf; both are dependencies of csft_jax)."
    ) from e
  proto = sentencepiece_model_pb2.ModelProto()
  with open(model_file, "rb") as f:
    data = f.read()
  try:
    proto.ParseFromString(data)
  except Exception as e:  # protobuf's DecodeError has no stable import path
    raise DataError(f"{model_file}: not a sentencepiece model ({type(e).__name__}: {e}).") from e
  if not proto.pieces:
    raise DataError(f"{model_file}: not a sentencepiece model (no pieces).")
  return proto


def _added_tokens(config: dict[str, Any], config_file: str) -> dict[int, dict[str, Any]]:
  """`added_tokens_decoder` of tokenizer_config.json as id -> token fields."""
  out = {}
  for key, token in (config.get("added_tokens_decoder") or {}).items():
    token = {"content": token} if isinstance(token, str) else token
    if not (str(key).isdigit() and isinstance(token, dict) and isinstance(token.get("content"), str)):
      raise DataError(
        f"{config_file}: added_tokens_decoder entry {key!r}: {token!r} is not an id -> "
        '{"content": ..., "special": ...} entry.'
      )
    out[int(key)] = token
  return out


def _special_token(config: dict[str, Any], key: str, proto) -> str | None:
  """A named special token: from tokenizer_config.json, else the sentencepiece model's own piece."""
  if key in config:
    value = config[key]
    return value.get("content") if isinstance(value, dict) else value
  spec = proto.trainer_spec
  own = {
    "bos_token": (spec.bos_id, spec.bos_piece),
    "eos_token": (spec.eos_id, spec.eos_piece),
    "unk_token": (spec.unk_id, spec.unk_piece),
    "pad_token": (spec.pad_id, spec.pad_piece),
  }[key]
  return own[1] if own[0] >= 0 else None


def _sentencepiece_ids(processor, text: str, added: dict[str, dict[str, Any]]) -> list[int]:
  # `added`: content -> fields of added_tokens_decoder, with its "id".
  """What the slow tokenizer gives: added tokens found in the raw text, sentencepiece in between."""
  if not added:
    return processor.encode(text)
  pattern = "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True))
  ids, chunks = [], re.split(f"({pattern})", text)
  for i, chunk in enumerate(chunks):
    if i % 2:
      ids.append(added[chunk]["id"])
      continue
    if i > 0 and added[chunks[i - 1]].get("rstrip"):
      chunk = chunk.lstrip()
    if i + 1 < len(chunks) and added[chunks[i + 1]].get("lstrip"):
      chunk = chunk.rstrip()
    if chunk:
      ids.extend(processor.encode(chunk))
  return ids


def _check_against_sentencepiece(tokenizer, model_file: str, added: dict[str, dict[str, Any]]) -> None:
  """Raises DataError unless `tokenizer` encodes the probe texts exactly as sentencepiece does."""
  import sentencepiece
  import transformers

  processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
  chat = "".join(f"{token}第{i}段 text\n" for i, token in enumerate(added))  # every added token, in text
  for text in (*_PROBE_TEXTS, chat):
    fast = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    slow = _sentencepiece_ids(processor, text, added)
    if fast != slow:
      raise DataError(
        f"{model_file}: converted with transformers {transformers.__version__}, {text!r} encodes as {fast} "
        f"but sentencepiece gives {slow}; use a transformers version whose converter follows the "
        f"sentencepiece model, or add the model's {FAST_TOKENIZER_FILE}."
      )


def build_demo_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 3000) -> None:
  """Trains the byte-level BPE demo tokenizer and writes it as a HF directory.

  Byte-level BPE falls back to single bytes, so any text encodes without an
  unknown token even though the vocabulary only saw the sample collection.

  Args:
    texts: training texts (the project's sample collection).
    out_dir: directory to write tokenizer.json and tokenizer_config.json to.
    vocab_size: vocabulary size including the 256 byte tokens and specials.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  # Untrimmed offsets: the loss mask maps character spans to tokens by offset.
  tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=2,
    show_progress=False,
    special_tokens=list(DEMO_SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tokenizer.train_from_iterator(texts, trainer)
  os.makedirs(out_dir, exist_ok=True)
  tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
  config = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "bos_token": None,
    "model_max_length": 32768,
    "chat_template": DEMO_CHAT_TEMPLATE,
  }
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, ensure_ascii=False, indent=2)
    f.write("\n")
