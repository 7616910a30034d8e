"""Writes the test fixtures that pin LLaMA-Factory v0.8.3's own functions' outputs.

tests/fixtures/llamafactory_infer_seqlen.json: `infer_seqlen(source_len, target_len, cutoff_len)`
(processors/processor_utils.py), the per-turn budget split of `overlong=infer_seqlen`, on the edge
cases and a seeded random grid; tests/test_data_llamafactory.py compares ours with it.

tests/fixtures/llamafactory_split.json: the rows LLaMA-Factory's `split_dataset` (data_utils.py)
holds out: `val_size` of the concatenated, tokenized sources, by `datasets`' `train_test_split(
test_size=val_size, seed=training_args.seed)`. Which rows it takes depends only on the row count,
val_size and the seed, so running it on a dataset of row positions gives the positions it holds out
of any concatenation of that many rows; tests/test_recipe_paper.py compares the paper variant's
held-out examples with these.

LLaMA-Factory v0.8.3 pins an old transformers, so it is not a test dependency; this script runs it
once, in a separate environment, and the tests read the files it writes:

    python3 -m venv /tmp/lf && /tmp/lf/bin/pip install torch==2.13.0 transformers==4.43.4 \\
        datasets==2.20.0 pyarrow==16.1.0 accelerate==0.33.0 peft==0.12.0 trl==0.9.6 rich pydantic
    /tmp/lf/bin/pip install --no-deps llamafactory==0.8.3
    /tmp/lf/bin/python tools/llamafactory_fixtures.py --out_dir=tests/fixtures
"""

import argparse
import json
import os
import random

# Row counts: the paper test's pipeline (tests/test_recipe_paper.py) and the paper's 12 sources x 1000.
SIZES = (834, 12000)
VAL_SIZE = 0.1
SEED = 42  # transformers' TrainingArguments.seed default; collectivesft.yaml sets none.


def split_fixture() -> dict:
  import datasets
  import llamafactory
  from llamafactory.data.data_utils import split_dataset
  from llamafactory.hparams import DataArguments

  data_args = DataArguments(dataset="collection", val_size=VAL_SIZE)
  held_out = {}
  for size in SIZES:
    rows = datasets.Dataset.from_dict({"position": list(range(size))})
    split = split_dataset(rows, data_args, seed=SEED)
    held_out[str(size)] = sorted(split["validation"]["position"])
  return {
    "made_by": f"llamafactory {llamafactory.__version__} split_dataset, datasets {datasets.__version__}",
    "val_size": VAL_SIZE,
    "seed": SEED,
    "held_out_positions": held_out,
  }


def infer_seqlen_fixture() -> dict:
  import llamafactory
  from llamafactory.data.processors.processor_utils import infer_seqlen

  edges = [
    (s, t, c)
    for s in (0, 1, 2, 5, 511, 512, 513, 1024, 3000)
    for t in (0, 1, 2, 5, 511, 512, 513, 1024, 3000)
    for c in (1, 2, 3, 1023, 1024, 1025)
  ]
  draw = random.Random(0)
  grid = [(draw.randint(0, 2048), draw.randint(0, 2048), draw.randint(1, 2048)) for _ in range(2000)]
  return {
    "made_by": f"llamafactory {llamafactory.__version__} infer_seqlen",
    "cases": [[s, t, c, *infer_seqlen(s, t, c)] for s, t, c in edges + grid],
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out_dir", required=True)
  args = parser.parse_args()
  for name, fixture in (
    ("llamafactory_split.json", split_fixture()),
    ("llamafactory_infer_seqlen.json", infer_seqlen_fixture()),
  ):
    with open(os.path.join(args.out_dir, name), "w", encoding="utf-8") as f:
      json.dump(fixture, f)
      f.write("\n")


if __name__ == "__main__":
  main()
