"""Writes tests/fixtures/llamafactory_split.json: the rows LLaMA-Factory v0.8.3 holds out.

LLaMA-Factory's `split_dataset` (data_utils.py) holds out `val_size` of the concatenated, tokenized
sources with `datasets`' `train_test_split(test_size=val_size, seed=training_args.seed)`. Which rows it
takes depends only on the row count, val_size and the seed, so running it on a dataset of row
positions gives the positions it holds out of any concatenation of that many rows. The test
`tests/test_recipe_paper.py` compares the paper variant's held-out examples with these.

LLaMA-Factory v0.8.3 pins an old transformers, so it is not a test dependency; this script runs it
once, in a separate environment, and the test reads the file it writes:

    python3 -m venv /tmp/lf && /tmp/lf/bin/pip install torch==2.13.0 transformers==4.43.4 \\
        datasets==2.20.0 pyarrow==16.1.0 accelerate==0.33.0 peft==0.12.0 trl==0.9.6 rich pydantic
    /tmp/lf/bin/pip install --no-deps llamafactory==0.8.3
    /tmp/lf/bin/python tools/llamafactory_split_fixture.py --out=tests/fixtures/llamafactory_split.json
"""

import argparse
import json

# Row counts: the paper test's pipeline (tests/test_recipe_paper.py) and the paper's 12 sources x 1000.
SIZES = (834, 12000)
VAL_SIZE = 0.1
SEED = 42  # transformers' TrainingArguments.seed default; collectivesft.yaml sets none.


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
  args = parser.parse_args()
  import datasets  # pylint: disable=import-outside-toplevel
  import llamafactory  # pylint: disable=import-outside-toplevel
  from llamafactory.data.data_utils import split_dataset  # pylint: disable=import-outside-toplevel
  from llamafactory.hparams import DataArguments  # pylint: disable=import-outside-toplevel

  data_args = DataArguments(dataset="collection", val_size=VAL_SIZE)
  held_out = {}
  for size in map(int, args.sizes.split(",")):
    rows = datasets.Dataset.from_dict({"position": list(range(size))})
    split = split_dataset(rows, data_args, seed=SEED)
    held_out[str(size)] = sorted(split["validation"]["position"])
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump({"made_by": f"llamafactory {llamafactory.__version__} split_dataset, datasets {datasets.__version__}",
               "val_size": VAL_SIZE, "seed": SEED, "held_out_positions": held_out}, f)
    f.write("\n")


if __name__ == "__main__":
  main()
