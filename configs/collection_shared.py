"""Data config: the five real sources in ../shared/data/collection, temperature-mixed (T=2).

Used by integration tests and tools/bench_data.py; reads the files in place.
Run `python -m csft_jax.data.inspect --config=configs/collection_shared.py`.
"""

import ml_collections

from configs import base
from csft_jax.data.config import DEMO_TOKENIZER, default_config, source_config

COLLECTION = "../shared/data/collection"


def get_data_config() -> ml_collections.ConfigDict:
  """Returns `config.data` mixing the shared collection by n_i ** (1/2)."""
  data = default_config()
  data.sources = ml_collections.ConfigDict(
    dict(
      # As CollectiveSFT's cmeddialogue_to_sft.py maps it: title + "\n" + ask -> answer.
      cmeddialogue=source_config(
        f"{COLLECTION}/cmeddialogue/sample_IM_5000-6000.csv",
        "alpaca",
        encoding="gb18030",
        columns={"instruction": "title", "input": "ask", "output": "answer"},
      ),
      medicalgpt_sft=source_config(f"{COLLECTION}/medicalgpt_sft/medical_sft_1K_format.jsonl", "sharegpt"),
      huatuo_cmekg=source_config(f"{COLLECTION}/huatuo_cmekg/llama_data.json", "alpaca"),
      huatuo_liver_cancer=source_config(f"{COLLECTION}/huatuo_liver_cancer/liver_cancer.json", "inline_multiturn"),
      cmekg_triples=source_config(
        f"{COLLECTION}/cmekg_triples/train_example.json",
        "template",
        user_template="请从下面的医学文本中抽取所有（主体，关系，客体）三元组，每行一个：\n{text}",
        assistant_template="{spo_list}",
      ),
    )
  )
  data.mixing = "temperature"
  data.temperature = 2.0
  data.seq_len = 1024
  data.val_fraction = 0.01
  data.tokenizer = DEMO_TOKENIZER
  return data


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the base config with the shared collection as `data`."""
  del arg
  config = base.get_config()
  config.data = get_data_config()
  return config
