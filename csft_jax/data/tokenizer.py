"""Tokenizers: load a local Hugging Face tokenizer directory; build the demo one."""

import json
import os
from collections.abc import Iterable

from csft_jax.configuration import resolve_path
from csft_jax.data.errors import DataError

# Special tokens of the demo tokenizer: enough for every built-in chat template.
DEMO_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",  # chatml / Qwen, internlm2
    "<s>", "</s>",  # internlm2 BOS/EOS
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>",  # llama3
)
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def load_tokenizer(path: str):
  """Loads a fast tokenizer from a local Hugging Face directory, offline.

  Args:
    path: directory with tokenizer.json/tokenizer_config.json (resolved by
      `csft_jax.configuration.resolve_path`).

  Returns:
    A `transformers` fast tokenizer (its `backend_tokenizer` gives offsets).
  """
  import transformers  # Slow to import; only the pipeline needs it.

  full = os.path.normpath(resolve_path(path))
  if not os.path.isdir(full):
    raise DataError(f"config.data.tokenizer: {path!r} is not a directory (tried {full})")
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(full, local_files_only=True)
  except (OSError, ValueError) as e:
    raise DataError(f"config.data.tokenizer: cannot load a tokenizer from {full}: {e}") from e
  if not getattr(tokenizer, "is_fast", False):
    raise DataError(f"config.data.tokenizer: {full} gives a slow tokenizer; add its tokenizer.json")
  return tokenizer


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
      vocab_size=vocab_size, min_frequency=2, show_progress=False,
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
