"""Data config: defaults of `config.data`, one source entry, and the sample collection.

`configs/*.py` build on these so that every experiment states its data in one
`ConfigDict` (big_vision style).
"""

import os

import ml_collections

# The repository root: relative paths in configs are resolved against it.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE_COLLECTION = "csft_jax/assets/sample_collection"
DEMO_TOKENIZER = "csft_jax/assets/demo_tokenizer"


def default_data_config() -> ml_collections.ConfigDict:
  """Returns `config.data` with every field the pipeline reads, and no sources."""
  return ml_collections.ConfigDict(dict(
      sources=ml_collections.ConfigDict(),
      mixing="temperature",  # explicit | proportional | temperature | uniform
      temperature=2.0,  # For mixing="temperature": p_i ~ n_i ** (1 / T).
      mixture_block=10_000,  # Draws per block in which source counts are exact.
      seq_len=1024,
      packing="packed",  # packed | padded
      num_packing_bins=8,  # First-fit bins per batch row; more bins, less padding.
      overlong="truncate",  # truncate | drop
      on_error="raise",  # raise | skip
      tokenizer=DEMO_TOKENIZER,
      chat_template="chatml",  # hf | chatml | internlm2 | llama3
      seed=0,
      val_fraction=0.0,  # Held-out fraction of each source for eval loss.
  ))


def source_config(path: str, format: str, **options) -> ml_collections.ConfigDict:  # pylint: disable=redefined-builtin
  """Returns one `config.data.sources` entry.

  Args:
    path: file, directory or glob; relative to the repository root.
    format: adapter name (see `csft_jax.data.adapters.ADAPTERS`).
    **options: weight (explicit mixing), max_samples (keep the first N),
      encoding, reader (auto|json|jsonl|csv|parquet), columns (logical ->
      record field names), system (default system prompt), user_template and
      assistant_template (format "template"), item_separator,
      with_explanation (format "mcq").
  """
  entry = dict(path=path, format=format, weight=None, max_samples=None, encoding="utf-8",
               reader="auto", columns={}, system=None, user_template=None,
               assistant_template=None, item_separator="，", with_explanation=False)
  unknown = set(options) - set(entry)
  if unknown:
    raise ValueError(f"source_config: unknown options {sorted(unknown)}; known: {sorted(entry)}")
  entry.update(options)
  return ml_collections.ConfigDict(entry)


def sample_collection_config() -> ml_collections.ConfigDict:
  """`config.data` for the project's own small sample collection (demo, tests)."""
  data = default_data_config()
  root = SAMPLE_COLLECTION
  data.sources = ml_collections.ConfigDict(dict(
      alpaca_qa=source_config(f"{root}/alpaca_qa.jsonl", "alpaca"),
      sharegpt_dialogues=source_config(f"{root}/sharegpt_dialogues.json", "sharegpt"),
      doctor_qa=source_config(f"{root}/doctor_qa_gb18030.csv", "columns", encoding="gb18030",
                              columns={"user": "ask", "assistant": "answer"}),
      cmb_style_mcq=source_config(f"{root}/cmb_style_mcq.json", "mcq", with_explanation=True),
      messages_chat=source_config(f"{root}/messages_chat.jsonl", "messages"),
  ))
  data.seq_len = 256
  data.val_fraction = 0.1
  return data
