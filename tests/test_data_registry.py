"""Formats, templates, benchmarks and path fields come from registries: a new one needs no edit of a
central list."""

import os

import pytest

from csft_jax import configuration
from csft_jax.data.adapters import FORMATS, register_format
from csft_jax.data.conversation import Conversation
from csft_jax.data.errors import Location
from csft_jax.data.pipeline import DataPipeline
from csft_jax.data.templates import TEMPLATES, MarkupSpec, MarkupTemplate, register_template, template_names
from csft_jax.eval import runner
from tests import REPO_ROOT
from tests.data_fixtures import one_source_config


@pytest.fixture
def registered():
  """Names registered by a test, unregistered after it."""
  formats, templates = set(FORMATS), set(TEMPLATES)
  yield
  for name in set(FORMATS) - formats:
    del FORMATS[name]
  for name in set(TEMPLATES) - templates:
    del TEMPLATES[name]


def test_a_format_and_a_template_defined_in_test_code_run_through_the_pipeline(tmp_path, registered):
  def read_tab_lines(source, path, text):  # the format's own reader: "question<TAB>answer" lines
    del source
    for line_number, line in enumerate(text.splitlines(), start=1):
      question, answer = line.split("\t")
      yield {"q": question, "a": answer}, Location(path, line_number)

  register_format(
    "tab_qa",
    lambda record, options: Conversation(None, (("user", record["q"]), ("assistant", record["a"]))),
    read=read_tab_lines,
  )
  spec = MarkupSpec("", "<|im_start|>[{role}]\n", "<|im_end|>", "\n", "<|endoftext|>", ("<|im_start|>", "<|im_end|>"))
  register_template("bracketed")(lambda tokenizer: MarkupTemplate("bracketed", tokenizer, spec))
  assert "bracketed" in template_names()

  (tmp_path / "qa.txt").write_text("头痛怎么办？\t注意休息。\n发热怎么办？\t多饮水。\n", encoding="utf-8")
  data = one_source_config(str(tmp_path / "qa.txt"), "tab_qa")
  data.chat_template = "bracketed"
  pipeline = DataPipeline(data)
  ids, mask = pipeline.train_example(0, 1)
  text = pipeline.tokenizer.decode(ids)
  assert text == "<|im_start|>[user]\n发热怎么办？<|im_end|>\n<|im_start|>[assistant]\n多饮水。<|im_end|>\n"
  assert pipeline.tokenizer.decode(ids[mask != 0]) == "多饮水。<|im_end|>"


def test_benchmark_names_come_from_the_modules_that_define_one():
  assert runner.benchmark_names() == ["cmb", "cmb_clin", "meds_bench"]


@pytest.mark.parametrize(
  "config_file",
  [
    "configs/demo.py",
    "configs/meds_ins_demo.py",
    "configs/eval/cmb.py",
    "configs/eval/cmb_clin.py",
    "configs/eval/meds_bench.py",
  ],
)
def test_every_path_field_of_a_shipped_config_is_declared_by_its_component(config_file):
  """Loading a config resolves every path field its components declare: no `pkg://` is left."""
  config = configuration.load(os.path.join(REPO_ROOT, config_file))
  leaves = [(key, value) for key, value in _leaves(config.to_dict()) if isinstance(value, str)]
  assert not [key for key, value in leaves if value.startswith(configuration.PACKAGE_PREFIX)]
  assert {p.split(".")[-1] for p in configuration.path_fields()} >= {"tokenizer", "path", "exam", "clin", "task_dir"}


def _leaves(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value
