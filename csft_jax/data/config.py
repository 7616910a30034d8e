"""Data config: defaults of `config.data`, one source entry, and the sample collection.

`configs/*.py` build on these so that every experiment states its data in one `ConfigDict`
(big_vision style). Every field can be set from the command line, including the optional ones
(typed placeholders): `--config.data.sources.cmb.weight=2.0`, `--config.data.sources.cmb.max_samples=1000`,
`--config.data.sources.cmb.enabled=False` (drops the source).
"""

import ml_collections
from ml_collections import config_dict

from csft_jax import configuration

SAMPLE_COLLECTION = "pkg://csft_jax/assets/sample_collection"
DEMO_TOKENIZER = "pkg://csft_jax/assets/demo_tokenizer"


def default_config() -> ml_collections.ConfigDict:
  """Returns `config.data` with every field the pipeline reads, and no sources."""
  return ml_collections.ConfigDict(
    dict(
      sources=ml_collections.ConfigDict(),
      mixing="temperature",  # explicit | proportional | temperature | uniform
      temperature=2.0,  # For mixing="temperature": p_i ~ n_i ** (1 / T).
      mixture_block=10_000,  # Draws per block in which source counts are exact.
      seq_len=1024,
      packing="packed",  # packed | padded
      num_packing_bins=8,  # First-fit bins per batch row; more bins, less padding.
      overlong="truncate",  # truncate | drop | infer_seqlen (LLaMA-Factory's per-turn budget)
      on_error="raise",  # raise | skip
      tokenizer="",  # Tokenizer directory; empty: the one of config.init.from_hf.
      chat_template="chatml",  # A registered template (csft_jax.data.templates.TEMPLATES), e.g. hf, llama3.
      seed=0,
      val_fraction=0.0,  # Held-out fraction for eval loss.
      # per_source: val_fraction of each source; concatenation: of all sources together, the examples
      # LLaMA-Factory's split_dataset (val_size) holds out with seed `seed` (a source may give none).
      val_split="per_source",
      cache="off",  # off (tokenize at every start) | auto (build the cache if absent or stale) | require
      cache_dir="",  # Tokenize-once cache (`python -m csft_jax.data.prepare`); see csft_jax/data/cache.py.
    )
  )


configuration.declare_path_fields("data.tokenizer", "data.sources.*.path", "data.cache_dir")


def source_config(path: str, format: str, **options) -> ml_collections.ConfigDict:
  """Returns one `config.data.sources` entry.

  Args:
    path: file, directory or glob (see `csft_jax.configuration` for the path rule).
    format: a registered source format (`csft_jax.data.adapters.FORMATS`).
    **options: enabled (False drops the source), weight (explicit mixing), max_samples (keep
      the first N), encoding, reader (auto|json|jsonl|csv|parquet), columns (logical -> record
      field names), system (default system prompt), user_template and assistant_template
      (format "template"), item_separator, with_explanation and prompt (format "mcq": "cmb_to_sft", the
      default, or "cmb_exam", the CMB benchmark's own question).
  """
  entry = dict(
    path=path,
    format=format,
    enabled=True,
    weight=config_dict.placeholder(float),
    max_samples=config_dict.placeholder(int),
    encoding="utf-8",
    reader="auto",
    columns={},
    system=config_dict.placeholder(str),
    user_template=config_dict.placeholder(str),
    assistant_template=config_dict.placeholder(str),
    item_separator="，",
    with_explanation=False,
    prompt=config_dict.placeholder(str),
  )
  unknown = set(options) - set(entry)
  if unknown:
    raise ValueError(f"source_config: unknown options {sorted(unknown)}; known: {sorted(entry)}")
  entry.update(options)
  return ml_collections.ConfigDict(entry)


def sample_collection_config() -> ml_collections.ConfigDict:
  """`config.data` for the project's own small sample collection (demo, tests)."""
  data = default_config()
  root = SAMPLE_COLLECTION
  data.sources = ml_collections.ConfigDict(
    dict(
      alpaca_qa=source_config(f"{root}/alpaca_qa.jsonl", "alpaca"),
      sharegpt_dialogues=source_config(f"{root}/sharegpt_dialogues.json", "sharegpt"),
      doctor_qa=source_config(
        f"{root}/doctor_qa_gb18030.csv", "columns", encoding="gb18030", columns={"user": "ask", "assistant": "answer"}
      ),
      cmb_style_mcq=source_config(f"{root}/cmb_style_mcq.json", "mcq", with_explanation=True),
      messages_chat=source_config(f"{root}/messages_chat.jsonl", "messages"),
    )
  )
  data.tokenizer = DEMO_TOKENIZER
  data.seq_len = 256
  data.val_fraction = 0.1
  return data
