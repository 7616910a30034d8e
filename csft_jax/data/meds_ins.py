"""MedS-Ins task files as a training source: reader, prompt construction, source config.

A MedS-Ins task is one JSON object per file (pretty-printed or on one line), named
`task<N>_<name>.json`: `Definition: [str]`, `Categories`, `Split Type`, ..., and
`Instances: [{id, input, output: [str, ...]}]`. `read_task_file` expands a file into one record
per instance; `adapt` builds the instance's conversation as `InsDataset` of MAGIC-AI4Med/MedS-Ins
(`Evaluation/EvalDataset.py`) does:

  * the definition is `Definition[0]`, or, with probability `rewrite_prob`, one drawn from the
    task's `auto_rewrite_def` list of a `RewriteDefinitions.json`-style file (a task absent from
    that file draws from its own `Definition` list; an empty list keeps `Definition[0]`);
  * zero-shot: system = the definition, user = the input;
  * with probability `few_shot_prob`, 3-shot: three of the task's own instances (any of them, this
    one included, as the official code samples) as `Input:\\n{x}\\n\\nOutput:\\n{y}\\n` cases joined
    by blank lines, then the definition and the fixed instruction, as the system turn; the user
    turn is `Input:\\n{x}\\nOutput:\\n`;
  * the response is `output[0]`.

The official probabilities are `original_ins_possibility = 1 - rewrite_prob` and
`no_context_possibility = 1 - few_shot_prob`. Contents are not stripped here; per-model rules
(Llama 3 strips every message) belong to the chat template.

Determinism: every draw of an instance comes from a generator seeded with (seed, task id,
instance index), so the conversations of a source depend only on the files and the options,
not on reading order, process or how many records were read before.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections

from csft_jax import configuration, files
from csft_jax.configuration import resolve_path
from csft_jax.data import config as data_config
from csft_jax.data.adapters import register_format
from csft_jax.data.conversation import ASSISTANT, USER, Conversation
from csft_jax.data.errors import DataError, Location, RecordError, RecordLeftOut
from csft_jax.data.readers import decode_json, scan_json_array, skip_space

FORMAT = "meds_ins"
SPLIT_TYPES = ("Train", "Test", "Train/Test")
NUM_SHOTS = 3
SHOT_TEMPLATE = "Input:\n{input}\n\nOutput:\n{output}\n"
QUERY_TEMPLATE = "Input:\n{input}\nOutput:\n"
# Appended to the definition with no separator, as in InsDataset (EvalDataset.py at HEAD; the published
# MMedS-Llama3 results predate a typo fix and read "ouput").
SHOT_INSTRUCTION = "Please learn from the few-shot cases to see what content you have to output."
# The options of a meds_ins source beside the common ones, with their defaults.
OPTION_DEFAULTS = dict(rewrite_definitions="", rewrite_prob=0.0, few_shot_prob=0.0, split_types=(), seed=0)
_TASK_FILE = "one JSON object {'Definition': [str], 'Instances': [{'id', 'input', 'output': [str, ...]}], ...}"


@dataclasses.dataclass(frozen=True)
class Task:
  """What the instances of one task file share (one object per file, referenced by its records)."""

  task_id: str  # File name up to the first '_', as the official code: task12_x.json -> task12.
  path: str
  definitions: tuple[str, ...]
  categories: tuple[str, ...]
  split_type: str
  instances: tuple[Mapping[str, Any], ...]  # The valid instances: the pool of few-shot cases.
  fields: Mapping[str, Any]  # Every other top-level field, to write filtered copies of the file.


def task_id_from_path(path: str) -> str:
  """`/d/task12_pubmedqa_en.json` -> `task12` (the text before the first '_')."""
  return os.path.basename(path).split("_")[0].removesuffix(".json")


def read_task_file(source: str, path: str, text: str) -> Iterator[tuple[dict[str, Any], Location] | RecordError]:
  """Yields one record per instance of a task file, in file order.

  A record holds the instance's `id`, `input` and `output`, its `instance_index`, the task's
  `task_id`, `definition` (`Definition[0]`), `categories` and `split_type`, and the `Task`
  itself (for the few-shot cases). An instance without `input` or `output` is yielded as a
  `RecordError` at its line; a file that is not a task raises `DataError`.
  """
  fields, instances = _parse_task_object(source, path, text)
  where = f"source {source!r}: {path}"
  if instances is None:
    raise DataError(f"{where}: task file has no 'Instances' (fields: {sorted(fields)}); expected {_TASK_FILE}")
  definitions = fields.get("Definition")
  if isinstance(definitions, str):
    definitions = [definitions]
  if not (isinstance(definitions, list) and definitions and all(isinstance(d, str) for d in definitions)):
    raise DataError(f"{where}: 'Definition' must be a non-empty list of strings, found {definitions!r:.80}")
  task_id = task_id_from_path(path)
  checked = [(i, instance, line, _instance_problem(instance)) for i, (instance, line) in enumerate(instances)]
  task = Task(
    task_id=task_id,
    path=path,
    definitions=tuple(definitions),
    categories=tuple(_strings(fields.get("Categories"))),
    split_type=_split_type(fields.get("Split Type")),
    instances=tuple(instance for _, instance, _, problem in checked if problem is None),
    fields=fields,
  )
  for i, instance, line, problem in checked:
    location = Location(path, line, i + 1)
    if problem is not None:
      yield RecordError(f"task {task_id!r} instance {_instance_id(instance, i)!r}: {problem}", location)
      continue
    record = dict(
      id=instance.get("id"),
      input=instance["input"],
      output=instance["output"],
      instance_index=i,
      task_id=task_id,
      definition=definitions[0],
      categories=task.categories,
      split_type=task.split_type,
      task=task,
    )
    yield record, location


def adapt(record: Mapping[str, Any], options: Mapping[str, Any]) -> Conversation:
  """One instance -> its zero-shot or 3-shot conversation; see the module docstring.

  Raises `RecordLeftOut` when the task's Split Type is not in `options["split_types"]`.
  """
  task = record.get("task")
  if not isinstance(task, Task):
    hint = "this record is a whole task file" if "Instances" in record else f"record fields {sorted(record)}"
    raise RecordError(f"format 'meds_ins' adapts the instances its reader yields, not {hint}")
  split_types = _split_types_option(options)
  if split_types and task.split_type not in split_types:
    raise RecordLeftOut(
      f"task {task.task_id!r} ({task.path}) has Split Type {task.split_type or '(none)'!r}, "
      f"not one of split_types={list(split_types)}"
    )
  rewrite_prob = _probability(options, "rewrite_prob")
  few_shot_prob = _probability(options, "few_shot_prob")
  rng = random.Random(f"{options.get('seed', 0)}|{task.task_id}|{record['instance_index']}")
  # The draws in InsDataset's order and comparisons: q (original definition iff
  # q <= original_ins_possibility), the rewrite, p (zero-shot iff p <= no_context_possibility),
  # the shots.
  definition = task.definitions[0]
  if rng.random() > 1.0 - rewrite_prob:
    rewrites = _rewrites(options.get("rewrite_definitions") or "", task)
    definition = rng.sample(rewrites, 1)[0] if rewrites else definition
  if rng.random() > 1.0 - few_shot_prob:
    shots = rng.sample(task.instances, min(len(task.instances), NUM_SHOTS))
    system, user = few_shot_prompt(definition, shots, record["input"])
  else:
    system, user = definition, record["input"]
  return Conversation(system, ((USER, user), (ASSISTANT, answer(record["output"]))))


def few_shot_prompt(definition: str, shots: Sequence[Mapping[str, Any]], query: str) -> tuple[str, str]:
  """(system, user) of the 3-shot prompt: cases, definition, fixed instruction; `Input:..Output:` query."""
  cases = [SHOT_TEMPLATE.format(input=s["input"], output=answer(s["output"])) for s in shots]
  return "\n\n".join(cases) + "\n\n" + definition + SHOT_INSTRUCTION, QUERY_TEMPLATE.format(input=query)


def answer(output: str | Sequence[str]) -> str:
  """The trained response: `output[0]` (or `output` itself when a task file gives a string)."""
  return output if isinstance(output, str) else output[0]


def instance_text(record: Mapping[str, Any]) -> str:
  """An instance's own input and answer (without definition or few-shot cases), for n-gram checks."""
  return f"{record['input']}\n{answer(record['output'])}"


def source_config(path: str, **options: Any) -> ml_collections.ConfigDict:
  """One `config.data.sources` entry of MedS-Ins task files (a file, directory or glob).

  Args:
    path: the task files.
    **options: the common source options (weight, max_samples, ...; see
      `csft_jax.data.config.source_config`) and the meds_ins ones: `rewrite_definitions` (a
      RewriteDefinitions.json-style file, or "" for none), `rewrite_prob`, `few_shot_prob`,
      `split_types` (the Split Types to keep, e.g. ("Train", "Train/Test"); empty keeps all) and
      `seed` (of the per-instance draws; configs link it to config.data.seed with
      `data.get_ref("seed")`).
  """
  meds = {key: options.pop(key, default) for key, default in OPTION_DEFAULTS.items()}
  entry = data_config.source_config(path, FORMAT, **options)
  for key, value in meds.items():
    setattr(entry, key, value)
  return entry


def _parse_task_object(source: str, path: str, text: str) -> tuple[dict[str, Any], list[tuple[Any, int]] | None]:
  """The task's top-level fields and its instances with their 1-based lines (None: no Instances).

  Walks the object key by key so that each instance of a pretty-printed file knows its line.
  """
  fields: dict[str, Any] = {}
  instances = None

  def fail(pos: int, what: str) -> DataError:
    line = text.count("\n", 0, pos) + 1
    return DataError(f"source {source!r}: {path}:{line} {what}; a MedS-Ins task file is {_TASK_FILE}")

  def decode(pos: int) -> tuple[Any, int]:
    return decode_json(source, path, text, pos)

  pos = skip_space(text, 0)
  if text[pos : pos + 1] != "{":
    raise fail(pos, "expected a JSON object")
  pos = skip_space(text, pos + 1)
  while text[pos : pos + 1] != "}":
    key, pos = decode(pos)
    pos = skip_space(text, pos)
    if not isinstance(key, str) or text[pos : pos + 1] != ":":
      raise fail(pos, 'malformed JSON object: expected a "key": value')
    pos = skip_space(text, pos + 1)
    if key == "Instances" and text[pos : pos + 1] == "[":
      instances, pos = scan_json_array(source, path, text, pos, "'Instances' list")
    else:
      fields[key], pos = decode(pos)
    pos = skip_space(text, pos)
    if text[pos : pos + 1] == ",":
      pos = skip_space(text, pos + 1)
    elif text[pos : pos + 1] != "}":
      raise fail(pos, "malformed JSON object: expected ',' or '}'")
  if skip_space(text, pos + 1) != len(text):
    raise fail(pos + 1, "text after the task object (one task per file)")
  if "Instances" in fields:  # Present but not a list.
    raise fail(0, f"'Instances' must be a list, found {type(fields['Instances']).__name__}")
  return fields, instances


def _instance_problem(instance: Any) -> str | None:
  """What is wrong with an instance, or None."""
  if not isinstance(instance, Mapping):
    return f"expected an object {{'id', 'input', 'output'}}, found {type(instance).__name__}"
  if not isinstance(instance.get("input"), str):
    return f"needs 'input' (text); found fields {sorted(instance)}"
  output = instance.get("output")
  if output is None:
    return f"has no 'output'; found fields {sorted(instance)}; each instance needs 'output': [answer, ...]"
  if not (isinstance(output, str) or (isinstance(output, list) and output and isinstance(output[0], str))):
    return f"'output' must be a non-empty list of strings, found {output!r:.80}"
  return None


def _instance_id(instance: Any, index: int) -> str:
  found = instance.get("id") if isinstance(instance, Mapping) else None
  return str(found) if found is not None else f"Instances[{index}]"


def _strings(value: Any) -> list[str]:
  if value is None:
    return []
  return [value] if isinstance(value, str) else [str(v) for v in value]


def _split_type(value: Any) -> str:
  """`Split Type` as one string; the guideline says STR, some files wrap it in a list."""
  if isinstance(value, list) and len(value) == 1:
    value = value[0]
  return value.strip() if isinstance(value, str) else ""


def _split_types_option(options: Mapping[str, Any]) -> tuple[str, ...]:
  value = options.get("split_types") or ()
  value = (value,) if isinstance(value, str) else tuple(value)
  unknown = [v for v in value if v not in SPLIT_TYPES]
  if unknown:
    raise DataError(
      f"meds_ins option split_types={list(value)}: {unknown} not among the Split Types {list(SPLIT_TYPES)}"
    )
  return value


def _probability(options: Mapping[str, Any], name: str) -> float:
  value = options.get(name) or 0.0
  if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
    raise DataError(f"meds_ins option {name}={value!r} must be a probability in [0, 1]")
  return float(value)


def _rewrites(path: str, task: Task) -> tuple[str, ...]:
  """The rewritten definitions a task draws from: its file entry's, else its own Definition list."""
  if not path:
    return task.definitions
  entry = _rewrite_definitions(resolve_path(path)).get(task.task_id)
  return task.definitions if entry is None else entry


@functools.lru_cache(maxsize=8)
def _rewrite_definitions(path: str) -> dict[str, tuple[str, ...]]:
  """{task id: auto_rewrite_def} of a RewriteDefinitions.json-style file (read once per process)."""
  what = "{taskN: {'original_def': [..], 'auto_rewrite_def': [str, ...]}}"
  table = files.read_json(path, expect=dict, what=what, error=DataError)
  out = {}
  for task_id, entry in table.items():
    rewrites = entry.get("auto_rewrite_def") if isinstance(entry, Mapping) else None
    if not (isinstance(rewrites, list) and all(isinstance(r, str) for r in rewrites)):
      raise DataError(f"{path}: entry {task_id!r} needs 'auto_rewrite_def': a list of strings; expected {what}")
    out[task_id] = tuple(rewrites)
  return out


register_format(FORMAT, adapt, read=read_task_file)  # its own reader: a task file holds many instances
configuration.declare_path_fields("data.sources.*.rewrite_definitions")
