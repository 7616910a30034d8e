"""InternLM2's own tokenizer without remote code: a sentencepiece directory converted to a fast tokenizer.

The sentencepiece model is trained here, on the shared collection, with InternLM2's layout: BPE with
byte fallback, no normalization, a dummy prefix, placeholder pieces that tokenizer_config.json
renames to `<|im_start|>`, `<|im_end|>`, ... (as InternLM2.5's does), and an `auto_map` that points
at code which is not there. The reference is the slow tokenizer's rule, written out here: cut the
text at the added tokens, encode each piece in between with sentencepiece.
"""

import csv
import io
import json
import os
import re
import subprocess
import sys

import pytest
import sentencepiece
import transformers

from csft_jax.data.errors import DataError
from csft_jax.data.templates import load_chat_template
from csft_jax.data.tokenizer import load_tokenizer
from tests import REPO_ROOT
from tests.data_fixtures import COLLECTION

INTERNLM2_TOKENS = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>")
PLACEHOLDERS = tuple(f"[UNUSED_TOKEN_{141 + i}]" for i in range(len(INTERNLM2_TOKENS)))
INTERNLM2_CHAT_TEMPLATE = (
  "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
  " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
EDGE_CASES = (
  "",
  " ",
  "  ",
  "\n",
  "\n\n首行空行",
  "  两个前导空格",
  "末尾空格  ",
  "a  b   c\t\td",
  "剂量 0.25 mg, 1,000 IU, 2024年3月",
  "<|im_start|>",
  "<|im_start|><|im_end|>",
  "x<|im_end|>y",
  " <|im_start|> user \n",
  "<s>你好</s>",
  "<unk>",
  "emoji 😀 and rare 龘 ᚠ",
  "<|action_start|><|interpreter|>\nprint(1)\n<|action_end|>",
  '<|plugin|>{"a": 1}',
)


def _collection_texts(per_source: int = 1000) -> list[str]:
  """Instructions, questions and answers of four real sources of the shared collection."""
  texts = []
  with open(os.path.join(COLLECTION, "medicalgpt_sft", "medical_sft_1K_format.jsonl"), encoding="utf-8") as f:
    texts += [turn["value"] for line in f for turn in json.loads(line)["conversations"]][:per_source]
  with open(os.path.join(COLLECTION, "huatuo_cmekg", "llama_data.json"), encoding="utf-8") as f:
    rows = [json.loads(line) for _, line in zip(range(per_source), f)]
  texts += [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows]
  with open(os.path.join(COLLECTION, "cmeddialogue", "sample_IM_5000-6000.csv"), encoding="gb18030") as f:
    rows = list(csv.DictReader(f))[:per_source]
  texts += [f"{r['title']}\n{r['ask']}" for r in rows] + [r["answer"] for r in rows]
  with open(os.path.join(COLLECTION, "huatuo_liver_cancer", "liver_cancer.json"), encoding="utf-8") as f:
    texts += [f"{r['instruction']}{r['output']}" for r in json.load(f)][:per_source]
  return texts


def _chat(question: str, answer: str) -> str:
  """InternLM2's chat markup, as the template renders it (special tokens inside the text)."""
  return f"<s><|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"


def _write_internlm2_dir(path, texts: list[str], placeholders=PLACEHOLDERS, names=INTERNLM2_TOKENS) -> None:
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
    sentence_iterator=iter(texts),
    model_writer=model,
    model_type="bpe",
    vocab_size=3000,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    character_coverage=0.99,
    user_defined_symbols=list(placeholders),
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    num_threads=1,
    minloglevel=2,
  )
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "tokenizer.model"), "wb") as f:
    f.write(model.getvalue())
  processor = sentencepiece.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model"))
  renamed = {"<unk>": "<unk>", "<s>": "<s>", "</s>": "</s>", **dict(zip(placeholders, names))}
  config = {
    "added_tokens_decoder": {
      str(processor.piece_to_id(piece)): {
        "content": name,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
      }
      for piece, name in renamed.items()
    },
    "additional_special_tokens": list(names),
    "auto_map": {
      "AutoTokenizer": [
        "tokenization_internlm2.InternLM2Tokenizer",
        "tokenization_internlm2_fast.InternLM2TokenizerFast",
      ]
    },
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "</s>",
    "unk_token": "<unk>",
    "chat_template": INTERNLM2_CHAT_TEMPLATE,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 1000000000000000019884624838656,
    "tokenizer_class": "InternLM2Tokenizer",
  }
  with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, ensure_ascii=False)


class SlowReference:
  """The slow InternLM2Tokenizer's ids: added tokens cut out of the raw text, sentencepiece in between."""

  def __init__(self, path: str):
    self.processor = sentencepiece.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model"))
    with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
      decoder = json.load(f)["added_tokens_decoder"]
    self.added = {token["content"]: int(i) for i, token in decoder.items()}
    self.pattern = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)) + ")")

  def encode(self, text: str) -> list[int]:
    ids = []
    for i, chunk in enumerate(self.pattern.split(text)):
      if i % 2:
        ids.append(self.added[chunk])
      elif chunk:
        ids += self.processor.encode(chunk)
    return ids


@pytest.fixture(scope="module")
def texts() -> list[str]:
  return _collection_texts()


@pytest.fixture(scope="module")
def internlm2_dir(tmp_path_factory, texts) -> str:
  path = str(tmp_path_factory.mktemp("internlm2_tokenizer"))
  _write_internlm2_dir(path, texts[::3])  # trained on a third; compared on all
  return path


def test_converted_tokenizer_encodes_the_collection_as_sentencepiece(internlm2_dir, texts):
  tokenizer = load_tokenizer(internlm2_dir)  # converted on load; AutoTokenizer would ask for remote code
  reference = SlowReference(internlm2_dir)
  chats = [_chat(q, a) for q, a in zip(texts[0::2], texts[1::2])]
  cases = texts + chats + list(EDGE_CASES)
  encoded = tokenizer.backend_tokenizer.encode_batch(cases, add_special_tokens=False)
  mismatches = [text for text, e in zip(cases, encoded) if e.ids != reference.encode(text)]
  assert not mismatches, (len(mismatches), mismatches[:3])
  assert len(cases) > 5_000
  all_ids = [i for e in encoded for i in e.ids]
  byte_ids = {reference.processor.piece_to_id(f"<0x{b:02X}>") for b in range(256)}
  assert sum(i in byte_ids for i in all_ids) > 100  # rare characters went through byte fallback
  assert {reference.added[t] for t in ("<|im_start|>", "<|im_end|>", "<s>")} <= set(all_ids)
  # As InternLM2's tokenizer: BOS first with special tokens; its specials are special; same decoding.
  assert tokenizer("胸痛3天")["input_ids"] == [1] + reference.encode("胸痛3天")
  assert {"<|im_start|>", "<|im_end|>", "<|action_start|>", "<s>", "</s>"} <= set(tokenizer.all_special_tokens)
  assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "</s>")
  for text in texts[:200]:
    assert tokenizer.decode(reference.encode(text)) == reference.processor.decode(reference.encode(text))
  template = load_chat_template("internlm2", tokenizer)
  assert template.stop_token_ids == (reference.added["<|im_end|>"], reference.added["</s>"])
  assert (
    tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    == "<s><|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
  )


def test_cli_writes_a_fast_tokenizer_that_loads_without_remote_code(internlm2_dir, texts, tmp_path):
  out = tmp_path / "fast"
  result = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO_ROOT, "tools", "convert_tokenizer.py"),
      f"--tokenizer_dir={internlm2_dir}",
      f"--out={out}",
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "<|im_start|>=" in result.stderr
  assert {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= set(os.listdir(out))
  config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
  assert "auto_map" not in config and config["tokenizer_class"] == "PreTrainedTokenizerFast"
  fast = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
  reference = SlowReference(internlm2_dir)
  sample = texts[::50] + [_chat(texts[0], texts[1])] + list(EDGE_CASES)
  assert [fast(t, add_special_tokens=False)["input_ids"] for t in sample] == [reference.encode(t) for t in sample]
  assert fast.chat_template == INTERNLM2_CHAT_TEMPLATE


def test_missing_template_tokens_are_named(tmp_path, texts):
  path = str(tmp_path / "no_chat_tokens")
  # An InternLM2-style model whose config renames only the tool tokens: no <|im_start|>/<|im_end|>.
  _write_internlm2_dir(path, texts[:1500], placeholders=PLACEHOLDERS[:4], names=INTERNLM2_TOKENS[:4])
  with pytest.raises(DataError, match=re.escape("['<|im_start|>', '<|im_end|>']")):
    load_chat_template("internlm2", load_tokenizer(path))


def test_config_naming_a_token_the_model_lacks(tmp_path, texts):
  path = str(tmp_path / "bad_config")
  _write_internlm2_dir(path, texts[:1500])
  config_file = os.path.join(path, "tokenizer_config.json")
  with open(config_file, encoding="utf-8") as f:
    config = json.load(f)
  config["eos_token"] = "<|endoftext|>"
  with open(config_file, "w", encoding="utf-8") as f:
    json.dump(config, f)
  with pytest.raises(DataError, match=r"'eos_token': '<\|endoftext\|>'.*neither pieces"):
    load_tokenizer(path)
