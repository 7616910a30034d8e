"""Shared helpers for the data tests: pipelines built once, small config builders."""

import functools
import os

import ml_collections

from csft_jax.data.config import DEMO_TOKENIZER, default_config, sample_collection_config, source_config
from csft_jax.data.conversation import Conversation
from csft_jax.data.pipeline import DataPipeline
from csft_jax.data.templates import load_chat_template
from csft_jax.data.tokenizer import load_tokenizer
from tests import REPO_ROOT

SHARED = os.path.join(REPO_ROOT, "..", "shared", "data")
COLLECTION = os.path.join(SHARED, "collection")
# A two-round consultation with a system prompt: what the template tests render.
CONVERSATION = Conversation(
  "你是医生助手。",
  (
    ("user", "我头痛三天了。"),
    ("assistant", "有没有发热？"),
    ("user", "没有，只是晚上睡不好。"),
    ("assistant", "建议规律作息，必要时到神经内科就诊。"),
  ),
)


@functools.cache
def demo_tokenizer():
  return load_tokenizer(DEMO_TOKENIZER)


@functools.cache
def template(name: str = "chatml"):
  return load_chat_template(name, demo_tokenizer())


def sample_config(**overrides) -> ml_collections.ConfigDict:
  """The sample collection's data config with small, fast settings."""
  data = sample_collection_config()
  data.seq_len = 128
  data.num_packing_bins = 4
  data.update(overrides)
  return data


@functools.cache
def sample_pipeline(packing: str = "packed") -> DataPipeline:
  return DataPipeline(sample_config(packing=packing))


def one_source_config(path: str, format: str, **options) -> ml_collections.ConfigDict:
  """A data config with a single source `s` at `path` (absolute or repo-relative)."""
  data = default_config()
  data.sources = ml_collections.ConfigDict({"s": source_config(path, format, **options)})
  data.tokenizer = DEMO_TOKENIZER
  data.seq_len = 128
  return data
