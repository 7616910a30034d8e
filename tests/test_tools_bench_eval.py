"""tools/bench_eval.py's MedS-Bench 3-shot prompts: built from the shared files as the official protocol."""

import json
import os

import pytest

from csft_jax.data import meds_ins
from csft_jax.eval import meds_bench
from tests import REPO_ROOT, load_tool
from tests.data_fixtures import template

SHARED_DATA = os.path.join(REPO_ROOT, "..", "shared", "data")

pytestmark = pytest.mark.skipif(
  not os.path.isfile(os.path.join(SHARED_DATA, "meds_bench", "RewriteDefinitions.json")),
  reason="needs ../shared/data/meds_bench",
)


def test_meds_prompts_hold_three_shots_and_the_whole_definition_of_each_task():
  chatml = template("chatml")
  prompts = load_tool("bench_eval")._meds_prompts(chatml, num_tasks=2, instances=4)
  assert len(prompts) == 8
  texts = [chatml.tokenizer.decode(p) for p in prompts]
  with open(os.path.join(SHARED_DATA, "meds_bench", "RewriteDefinitions.json"), encoding="utf-8") as f:
    definitions = json.load(f)
  # The file numbers its tasks task1-3, then task11, ...: the first two are task1 and task2.
  for task, rows in (("task1", texts[:4]), ("task2", texts[4:])):
    for text in rows:
      assert text.count("Input:\n") == meds_bench.NUM_SHOTS + 1  # three solved cases, then the query
      assert definitions[task]["original_def"] + meds_ins.SHOT_INSTRUCTION in text, task
