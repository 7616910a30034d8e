"""Finds training examples that share a long character n-gram with benchmark questions.

  python tools/decontaminate.py --config=configs/collection_shared.py \
      --benchmark=cmb:PATH/CMB-val.json --benchmark=meds:PATH/task.json \
      [--ngram=13] [--write_filtered=DIR] [--json]

Benchmarks: `cmb` (JSON list of items with `question` and `option`), `meds`
(a MedS-Bench task file, pretty-printed or one line, whose `Instances[].input`
are the questions; a folder of them, every `task*.json`; or a results CSV with
an `input` column). Whitespace is ignored when comparing. A `meds_ins` source
is checked on each instance's own input and answer, not on the few-shot cases
its prompt borrows from other instances. --write_filtered writes the kept raw
records per source: one JSONL file, or for a `meds_ins` source a folder of its
task files with the contaminated instances removed (readable as the same
source); files appear only after every source was checked, so an error leaves
nothing half-written.
"""

import csv
import json
import os
import shutil
import tempfile

from absl import app, flags

from csft_jax import configuration
from csft_jax.console import run_cli
from csft_jax.data import meds_ins
from csft_jax.data.errors import DataError
from csft_jax.data.sources import SourceRecord, load_conversations, parse_sources
from csft_jax.eval import meds_bench

FLAGS = flags.FLAGS
_SHOW = 3  # Contaminated examples shown per source.


def _normalize(text: str) -> str:
  return "".join(text.split())


def benchmark_questions(kind: str, path: str) -> list[str]:
  """Reads the question texts (with options for MCQ) of a benchmark file."""
  full = configuration.resolve_path(path)
  if kind == "meds" and os.path.isdir(full):
    try:
      tasks = meds_bench.load_task_dir(full)
    except meds_bench.MedSInputError as e:
      raise DataError(f"benchmark meds: {e}") from None
    return [instance["input"] for task in tasks.values() for instance in task["Instances"]]
  if not os.path.isfile(full):
    raise DataError(f"benchmark {kind}: {path} not found (tried {full})")
  if kind == "cmb":
    with open(full, encoding="utf-8") as f:
      items = json.load(f)
    if not isinstance(items, list):
      raise DataError(f"benchmark cmb: {full} must be a JSON list of items")
    questions = []
    for i, item in enumerate(items):
      if "question" not in item:
        raise DataError(
          f"benchmark cmb: {full} item {i} has no 'question' field (is it an answer key?); "
          "pass a file with question texts"
        )
      options = "".join(str(v) for v in (item.get("option") or {}).values())
      questions.append(item["question"] + options)
    return questions
  if kind == "meds":
    if full.endswith(".csv"):
      with open(full, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
      if rows and "input" not in rows[0]:
        raise DataError(f"benchmark meds: {full} has no 'input' column")
      return sorted({r["input"] for r in rows})
    try:
      task = meds_bench.load_task(full)
    except meds_bench.MedSInputError as e:
      raise DataError(f"benchmark meds: {e} (expected a MedS-Bench task file)") from None
    return [instance["input"] for instance in task["Instances"]]
  raise DataError(f"--benchmark kind {kind!r} is not one of cmb, meds")


def ngram_set(texts: list[str], n: int) -> set[str]:
  """All length-n windows of the whitespace-free texts."""
  grams = set()
  for text in texts:
    t = _normalize(text)
    grams.update(t[i : i + n] for i in range(len(t) - n + 1))
  return grams


def shared_ngram(text: str, grams: set[str], n: int) -> str | None:
  """The first length-n window of `text` found in `grams`, or None."""
  t = _normalize(text)
  for i in range(len(t) - n + 1):
    if t[i : i + n] in grams:
      return t[i : i + n]
  return None


def write_task_files(records: list[SourceRecord], directory: str) -> None:
  """Writes the task files of kept meds_ins records, each with only its kept instances."""
  os.makedirs(directory)
  by_task: dict[str, tuple[meds_ins.Task, list]] = {}
  for r in records:
    task = r.record["task"]
    instance = {k: r.record[k] for k in ("id", "input", "output") if r.record[k] is not None}
    by_task.setdefault(task.path, (task, []))[1].append(instance)
  for path, (task, instances) in by_task.items():
    with open(os.path.join(directory, os.path.basename(path)), "w", encoding="utf-8") as f:
      json.dump({**task.fields, "Instances": instances}, f, ensure_ascii=False, indent=1)


def main(argv: list[str]) -> None:
  """The command: see the module docstring."""
  del argv
  if not FLAGS.benchmark:
    raise app.UsageError("give at least one --benchmark=KIND:PATH")
  questions = []
  for spec in FLAGS.benchmark:
    kind, sep, path = spec.partition(":")
    if not sep:
      raise app.UsageError(f"--benchmark={spec!r} must be KIND:PATH")
    questions += benchmark_questions(kind, path)
  grams = ngram_set(questions, FLAGS.ngram)
  data = configuration.from_flags().data
  report, kept, formats = {}, {}, {}
  for spec in parse_sources(data.sources):
    records, _ = load_conversations(spec, data.on_error)
    hits, kept[spec.name], formats[spec.name] = [], [], spec.format
    for r in records:
      text = meds_ins.instance_text(r.record) if spec.format == meds_ins.FORMAT else r.conversation.text()
      gram = shared_ngram(text, grams, FLAGS.ngram)
      if gram is None:
        kept[spec.name].append(r)
      else:
        hits.append((str(r.location), gram))
    report[spec.name] = {
      "examples": len(records),
      "contaminated": len(hits),
      "first": [{"location": loc, "ngram": g} for loc, g in hits[:_SHOW]],
    }
    print(f"{spec.name}: {len(hits)} of {len(records)} examples share a {FLAGS.ngram}-gram with the benchmarks")
    for loc, g in hits[:_SHOW]:
      print(f"  {loc}: {g}")
  if FLAGS.write_filtered:
    out = configuration.resolve_path(FLAGS.write_filtered)
    staging = tempfile.mkdtemp(prefix=".decontaminate-", dir=os.path.dirname(os.path.abspath(out)))
    for name, records in kept.items():
      if formats[name] == meds_ins.FORMAT:
        write_task_files(records, os.path.join(staging, name))
        continue
      with open(os.path.join(staging, f"{name}.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r.record, ensure_ascii=False) + "\n" for r in records)
    if os.path.exists(out):
      shutil.rmtree(out)
    os.replace(staging, out)
    print(f"wrote filtered copies to {out}")
  if FLAGS.json:
    print(
      json.dumps({"ngram": FLAGS.ngram, "benchmark_questions": len(questions), "sources": report}, ensure_ascii=False)
    )


def define_flags() -> None:
  """Command-line flags, defined only when run as a program."""
  configuration.define_config_flag("Config file with a `data` field.")
  flags.DEFINE_multi_string("benchmark", [], "KIND:PATH with KIND in {cmb, meds}.")
  flags.DEFINE_integer("ngram", 13, "Character n-gram length.")
  flags.DEFINE_string("write_filtered", None, "Directory for filtered copies (JSONL per source).")
  flags.DEFINE_bool("json", False, "Print a JSON summary as the last line.")


if __name__ == "__main__":
  define_flags()
  run_cli(main)
