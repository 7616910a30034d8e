"""Format adapters: one record of a source -> one `Conversation`.

Each adapter reads the fields its format needs through `columns` (a mapping
from the adapter's logical field name to the record's field name, so that
renamed fields need no code) and raises `RecordError` naming the missing or
malformed field. Formats:

  alpaca            instruction/input/output, optional system and history
  sharegpt          conversations: [{from, value}]
  messages          OpenAI-style messages: [{role, content}]
  columns           one Q/A pair from table columns
  inline_multiturn  earlier turns inlined as " <user>: .. <bot>: .."
  mcq               CMB exam items, rendered as CollectiveSFT's preprocess/cmb_to_sft.py does
  template          structured records through user/assistant templates
  meds_ins          MedS-Ins task files (registered by csft_jax/data/meds_ins.py, with its own reader)

`FORMATS` holds every format by name: its adapter and, for a format whose files are not one record
per JSON item / line / row, its own file reader (`register_format`). A format defined elsewhere
registers itself; the package imports such modules (csft_jax/data/__init__.py).

The Alpaca join is LLaMA-Factory's (`aligner.py`): the non-empty ones of instruction and input,
joined by "\n". CollectiveSFT's cmeddialogue source is `alpaca` with columns
{"instruction": "title", "input": "ask", "output": "answer"}, as its cmeddialogue_to_sft.py maps them.
"""

import dataclasses
import json
import re
import string
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from csft_jax.data.cmb_exam import format_question
from csft_jax.data.conversation import ASSISTANT, SYSTEM, USER, Conversation, from_messages
from csft_jax.data.errors import RecordError

# Default logical-field -> record-field mapping of each format.
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
  "alpaca": {
    "instruction": "instruction",
    "input": "input",
    "output": "output",
    "system": "system",
    "history": "history",
  },
  "sharegpt": {"conversations": "conversations", "role": "from", "content": "value"},
  "messages": {"messages": "messages", "role": "role", "content": "content"},
  "columns": {"user": "question", "assistant": "answer", "system": "system"},
  "inline_multiturn": {"instruction": "instruction", "input": "input", "output": "output"},
  "mcq": {
    "question": "question",
    "option": "option",
    "answer": "answer",
    "question_type": "question_type",
    "exam_type": "exam_type",
    "exam_class": "exam_class",
    "exam_subject": "exam_subject",
    "explanation": "explanation",
  },
  "template": {},
}
_SHAREGPT_ROLES = {
  "human": USER,
  "user": USER,
  "gpt": ASSISTANT,
  "assistant": ASSISTANT,
  "bot": ASSISTANT,
  "system": SYSTEM,
}
_INLINE_TURN = re.compile(r"\s*<(user|bot)>:\s*")
MCQ_INSTRUCTION = "该问题源自{exam_type}，面向{exam_class}中的{exam_subject}。\n\n"

Adapter = Callable[[Mapping[str, Any], Mapping[str, Any]], Conversation]


def _field(record: Mapping[str, Any], columns: Mapping[str, str], name: str, fmt: str) -> Any:
  """Returns a required field, or raises naming it and the record's fields."""
  key = columns[name]
  value = record.get(key)
  if value is None:
    mapped = f" (mapped from {name!r})" if key != name else ""
    raise RecordError(
      f"missing field {key!r}{mapped} that format {fmt!r} needs; the record"
      f" has fields {sorted(record)}; map the right one with"
      f" columns={{{name!r}: ...}}"
    )
  return value


def _optional(record: Mapping[str, Any], columns: Mapping[str, str], name: str) -> Any:
  return record.get(columns.get(name, name)) or None


def _text(value: Any, what: str) -> str:
  if not isinstance(value, str):
    raise RecordError(f"field {what!r} must be text, found {type(value).__name__}")
  return value


def _alpaca_user(instruction: str, extra: str | None) -> str:
  """LLaMA-Factory's join: instruction and input, each only if non-empty, joined by a newline."""
  return "\n".join(part for part in (instruction, extra) if part)


def alpaca(record: Mapping[str, Any], options: Mapping[str, Any]) -> Conversation:
  """instruction + "\\n" + input (either may be empty) -> output, after optional [[q, a], ...] history."""
  cols = options["columns"]
  instruction = _text(_field(record, cols, "instruction", "alpaca"), cols["instruction"])
  output = _text(_field(record, cols, "output", "alpaca"), cols["output"])
  extra = _optional(record, cols, "input")
  user = _alpaca_user(instruction, extra and _text(extra, cols["input"]))
  turns = []
  for i, pair in enumerate(_optional(record, cols, "history") or []):
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
      raise RecordError(f"history item {i} must be a [question, answer] pair, found {pair!r:.80}")
    turns += [(USER, _text(pair[0], "history")), (ASSISTANT, _text(pair[1], "history"))]
  system = _optional(record, cols, "system") or options.get("system")
  return Conversation(system, tuple(turns) + ((USER, user), (ASSISTANT, output)))


def _role_content_list(record, options, list_name: str, roles: Mapping[str, str], fmt: str) -> Conversation:
  cols = options["columns"]
  items = _field(record, cols, list_name, fmt)
  if not isinstance(items, list):
    raise RecordError(f"field {cols[list_name]!r} must be a list of turns, found {type(items).__name__}")
  messages = []
  for i, item in enumerate(items):
    if not isinstance(item, Mapping):
      raise RecordError(f"turn {i} of {cols[list_name]!r} must be an object, found {item!r:.80}")
    role = roles.get(_field(item, cols, "role", fmt))
    if role is None:
      raise RecordError(f"turn {i}: unknown role {item[cols['role']]!r}; known roles: {sorted(roles)}")
    messages.append({"role": role, "content": _text(_field(item, cols, "content", fmt), cols["content"])})
  if options.get("system") and not (messages and messages[0]["role"] == SYSTEM):
    messages.insert(0, {"role": SYSTEM, "content": options["system"]})
  return from_messages(messages)


def sharegpt(record: Mapping[str, Any], options: Mapping[str, Any]) -> Conversation:
  """conversations: [{from: human|gpt|system, value}]."""
  return _role_content_list(record, options, "conversations", _SHAREGPT_ROLES, "sharegpt")


def messages(record: Mapping[str, Any], options: Mapping[str, Any]) -> Conversation:
  """messages: [{role: system|user|assistant, content}]."""
  roles = {USER: USER, ASSISTANT: ASSISTANT, SYSTEM: SYSTEM}
  return _role_content_list(record, options, "messages", roles, "messages")


def columns(record: Mapping[str, Any], options: Mapping[str, Any]) -> Conversation:
  """One question/answer pair from the `user` and `assistant` columns."""
  cols = options["columns"]
  user = _text(_field(record, cols, "user", "columns"), cols["user"])
  assistant = _text(_field(record, cols, "assistant", "columns"), cols["assistant"])
  system = _optional(record, cols, "system") or options.get("system")
  return Conversation(system, ((USER, user), (ASSISTANT, assistant)))


def inline_multiturn(record: Mapping[str, Any], options: Mapping[str, Any]) -> Conversation:
  """Splits ' <user>: a <bot>: b <user>: c' in the instruction; output answers c."""
  cols = options["columns"]
  instruction = _text(_field(record, cols, "instruction", "inline_multiturn"), cols["instruction"])
  output = _text(_field(record, cols, "output", "inline_multiturn"), cols["output"])
  parts = _INLINE_TURN.split(instruction)
  if parts[0].strip():  # Text before the first marker is a plain first user turn.
    turns = [(USER, parts[0].strip())]
  else:
    turns = []
  for marker, text in zip(parts[1::2], parts[2::2]):
    turns.append((USER if marker == "user" else ASSISTANT, text.strip()))
  extra = _optional(record, cols, "input")
  if extra and turns and turns[-1][0] == USER:
    turns[-1] = (USER, f"{turns[-1][1]}\n{_text(extra, cols['input'])}")
  if not turns or turns[-1][0] != USER:
    raise RecordError(
      f"inline turns in {cols['instruction']!r} must end with a '<user>:' turn that {cols['output']!r} answers"
    )
  return Conversation(options.get("system"), tuple(turns) + ((ASSISTANT, output),))


def mcq(record: Mapping[str, Any], options: Mapping[str, Any]) -> Conversation:
  """CMB exam item -> the Alpaca record of CollectiveSFT's cmb_to_sft.py, joined as LLaMA-Factory does.

  instruction '该问题源自{exam_type}，面向{exam_class}中的{exam_subject}。\\n\\n'; input the question
  and a newline, then one 'X: text\\n' line per option in letter order (empty options too);
  output '答案是X。' ('{explanation}所以答案是X。' with the `with_explanation` option, ours).
  With `prompt="cmb_exam"` the user turn is instead the CMB benchmark's own answer-only question
  (`csft_jax.data.cmb_exam`) and the reply '答案是X。': the format the benchmark's extraction reads.
  """
  cols = options["columns"]
  instruction = MCQ_INSTRUCTION.format(
    **{k: _text(_field(record, cols, k, "mcq"), cols[k]) for k in ("exam_type", "exam_class", "exam_subject")}
  )
  question = _text(_field(record, cols, "question", "mcq"), cols["question"])
  choices = _field(record, cols, "option", "mcq")
  if not isinstance(choices, Mapping) or not choices:
    raise RecordError(f"field {cols['option']!r} must be a non-empty {{letter: text}} object, found {choices!r:.80}")
  answer = _text(_field(record, cols, "answer", "mcq"), cols["answer"])
  unknown = [c for c in answer.strip() if c not in choices]
  if not answer.strip() or unknown:
    raise RecordError(f"answer {answer!r} is not made of option letters {sorted(choices)}")
  prompt = options.get("prompt") or "cmb_to_sft"
  if prompt == "cmb_exam":
    item = {k: _text(_field(record, cols, k, "mcq"), cols[k]) for k in ("exam_type", "exam_class", "question_type")}
    user = format_question({**item, "question": question, "option": choices}, "answer")
    return Conversation(options.get("system"), ((USER, user), (ASSISTANT, f"答案是{answer}。")))
  if prompt != "cmb_to_sft":
    raise RecordError(
      f"mcq prompt={prompt!r}; choose 'cmb_to_sft' (CollectiveSFT's rendering) or 'cmb_exam' "
      "(the CMB benchmark's answer-only question)"
    )
  explanation = _optional(record, cols, "explanation") if options.get("with_explanation") else None
  reply = f"{explanation}所以答案是{answer}。" if explanation else f"答案是{answer}。"
  lines = "".join(f"{letter}: {choices[letter]}\n" for letter in sorted(choices))
  return Conversation(
    options.get("system"), ((USER, _alpaca_user(instruction, f"{question}\n{lines}")), (ASSISTANT, reply))
  )


def template(record: Mapping[str, Any], options: Mapping[str, Any]) -> Conversation:
  """Renders `user_template` and `assistant_template` with the record's fields.

  A list field renders one item per line; an item that is itself a list
  renders its parts joined by `item_separator` (default '，'), e.g. a
  (subject, predicate, object) triple.
  """
  turns = []
  for role, key in ((USER, "user_template"), (ASSISTANT, "assistant_template")):
    fmt = options.get(key)
    if not fmt:
      raise RecordError(f"format 'template' needs {key} in the source config")
    turns.append((role, _render_template(fmt, key, record, options.get("item_separator", "，"))))
  return Conversation(options.get("system"), tuple(turns))


def _render_template(fmt: str, key: str, record: Mapping[str, Any], separator: str) -> str:
  values = {}
  for _, name, _, _ in string.Formatter().parse(fmt):
    if name is None:
      continue
    if record.get(name) is None:
      raise RecordError(f"{key} field {{{name}}} is absent from the record; record fields: {sorted(record)}")
    values[name] = _render_value(record[name], separator)
  return fmt.format(**values)


def _render_value(value: Any, separator: str) -> str:
  if isinstance(value, list):
    return "\n".join(separator.join(map(str, v)) if isinstance(v, list) else _render_value(v, separator) for v in value)
  if isinstance(value, Mapping):
    return json.dumps(value, ensure_ascii=False)
  return str(value)


# A format's own file reader: (source name, path, decoded text) -> its records, each with its location
# (or a RecordError for a record that cannot be read on its own).
Reader = Callable[[str, str, str], Iterator[Any]]


@dataclasses.dataclass(frozen=True)
class Format:
  """A source format: `adapt(record, options) -> Conversation`, and `read`, its own file reader, or
  None to read files by the source's `reader` option (JSON, JSONL, CSV, Parquet by extension)."""

  adapt: Adapter
  read: Reader | None = None


FORMATS: dict[str, Format] = {}


def register_format(name: str, adapt: Adapter, *, read: Reader | None = None) -> None:
  """Makes `format=name` available to every source config."""
  if name in FORMATS:
    raise ValueError(f"source format {name!r} is registered twice")
  FORMATS[name] = Format(adapt, read)


for _name, _adapt in (
  ("alpaca", alpaca),
  ("sharegpt", sharegpt),
  ("messages", messages),
  ("columns", columns),
  ("inline_multiturn", inline_multiturn),
  ("mcq", mcq),
  ("template", template),
):
  register_format(_name, _adapt)
