"""Readers and format adapters on the real shapes in ../shared/data and the sample collection."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import demo
from csft_jax import configuration
from csft_jax.data.adapters import FORMATS
from csft_jax.data.config import sample_collection_config
from csft_jax.data.conversation import Conversation
from csft_jax.data.sources import load_conversations, parse_sources
from csft_jax.eval import cmb
from tests.data_fixtures import COLLECTION, one_source_config


def _load(data):
  (spec,) = parse_sources(data.sources)
  return load_conversations(spec, data.on_error)


def _first(path, fmt, max_samples=3, **options):
  records, _ = _load(one_source_config(path, fmt, max_samples=max_samples, **options))
  return records


def test_columns_adapter_reads_gb18030_cmeddialogue_csv():
  records = _first(
    f"{COLLECTION}/cmeddialogue/sample_IM_5000-6000.csv",
    "columns",
    encoding="gb18030",
    columns={"user": "ask", "assistant": "answer"},
  )
  first = records[0]
  assert first.conversation.turns[0] == (
    "user",
    "我有高血压这两天女婿来的时候给我拿了些党参泡水喝，您好高血压可以吃党参吗？",
  )
  assert first.conversation.turns[1][1].startswith("高血压病人可以口服党参的。")
  assert first.record["department"] == "心血管科"
  assert first.location.line == 2 and records[1].location.line == 3


def test_cmeddialogue_as_collectivesft_maps_it_title_then_ask():
  """cmeddialogue_to_sft.py: instruction=title, input=ask, output=answer; LLaMA-Factory joins with a newline."""
  (first,) = _first(
    f"{COLLECTION}/cmeddialogue/sample_IM_5000-6000.csv",
    "alpaca",
    max_samples=1,
    encoding="gb18030",
    columns={"instruction": "title", "input": "ask", "output": "answer"},
  )
  assert first.conversation.turns[0] == (
    "user",
    "高血压患者能吃党参吗？\n我有高血压这两天女婿来的时候给我拿了些党参泡水喝，您好高血压可以吃党参吗？",
  )


@pytest.mark.parametrize(
  "instruction, extra, user",
  [
    ("请回答。", "头痛怎么办？", "请回答。\n头痛怎么办？"),
    ("", "头痛怎么办？", "头痛怎么办？"),  # aligner.py skips an empty instruction: no leading newline
    ("头痛怎么办？", "", "头痛怎么办？"),
    ("头痛怎么办？", None, "头痛怎么办？"),
    ("a\n", "\nb", "a\n\n\nb"),  # nothing is stripped
  ],
)
def test_alpaca_joins_non_empty_instruction_and_input_like_llamafactory(tmp_path, instruction, extra, user):
  record = {"instruction": instruction, "output": "注意休息。", **({} if extra is None else {"input": extra})}
  path = tmp_path / "a.jsonl"
  path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
  (only,) = _first(str(path), "alpaca")
  assert only.conversation.turns == (("user", user), ("assistant", "注意休息。"))


def test_sharegpt_adapter_on_medicalgpt():
  (first,) = _first(f"{COLLECTION}/medicalgpt_sft/medical_sft_1K_format.jsonl", "sharegpt", max_samples=1)
  roles = [r for r, _ in first.conversation.turns]
  assert roles[0] == "user" and roles[-1] == "assistant"
  assert first.conversation.turns[0][1].startswith("治疗阳痿吃什么药呢？")


def test_alpaca_adapter_reads_jsonl_named_json():
  records = _first(f"{COLLECTION}/huatuo_cmekg/llama_data.json", "alpaca")
  assert (
    records[0].conversation.turns[0][1]
    == "一名年龄在70岁的女性，出现了晕厥、不自主颤抖、情绪不稳等症状，请详细说明其手术治疗和术前准备。"
  )
  assert [r.location.line for r in records] == [1, 2, 3]


def test_inline_multiturn_adapter_splits_liver_cancer_turns():
  (first,) = _first(f"{COLLECTION}/huatuo_liver_cancer/liver_cancer.json", "inline_multiturn", max_samples=1)
  turns = first.conversation.turns
  assert [r for r, _ in turns] == ["user", "assistant", "user", "assistant"]
  assert turns[0][1] == "我听说免疫疗法是治疗晚期肝癌的一种很有效的方法，真的吗？"
  assert turns[2][1] == "但是，这是否适用于所有的肝癌患者？"
  assert turns[3][1].startswith("不是所有的肝癌患者都适合进行免疫疗法。")
  assert first.location.item == 1


def test_template_adapter_renders_cmekg_triples():
  (first,) = _first(
    f"{COLLECTION}/cmekg_triples/train_example.json",
    "template",
    max_samples=1,
    user_template="抽取三元组：{text}",
    assistant_template="{spo_list}",
  )
  user, answer = first.conversation.turns[0][1], first.conversation.turns[1][1]
  assert user.startswith("抽取三元组：12小时尿沉渣计数的相关疾病")
  assert answer.splitlines()[0] == "12小时尿沉渣计数，相关疾病，单纯型尿路感染"
  assert len(answer.splitlines()) == len(first.record["spo_list"])


def test_mcq_adapter_renders_cmb_items_as_cmb_to_sft(tmp_path):
  """cmb_to_sft.py: instruction ends '。\\n\\n', input = question + one 'X: text\\n' per sorted option
  (empty ones kept), output '答案是X。'; LLaMA-Factory joins instruction and input with '\\n'."""
  item = {
    "exam_type": "医师考试",
    "exam_class": "规培结业",
    "exam_subject": "临床病理科",
    "question": "下列哪项是癌前病变？",
    "option": {"B": "炎性息肉", "A": "肠化生", "D": "增生", "C": ""},
    "answer": "A",
    "explanation": "肠化生可进展为癌。",
  }
  path = tmp_path / "cmb.json"
  path.write_text(json.dumps([item], ensure_ascii=False), encoding="utf-8")
  (plain,) = _first(str(path), "mcq")
  assert plain.conversation.turns == (
    (
      "user",
      "该问题源自医师考试，面向规培结业中的临床病理科。\n\n\n"
      "下列哪项是癌前病变？\nA: 肠化生\nB: 炎性息肉\nC: \nD: 增生\n",
    ),
    ("assistant", "答案是A。"),
  )
  (explained,) = _first(str(path), "mcq", with_explanation=True)
  assert explained.conversation.turns[1][1] == "肠化生可进展为癌。所以答案是A。"


def test_alpaca_history_system_and_messages_in_sample_collection():
  specs = {s.name: s for s in parse_sources(sample_collection_config().sources)}
  alpaca, _ = load_conversations(specs["alpaca_qa"], "raise")
  with_history = [r for r in alpaca if r.record.get("history")][0]
  assert with_history.conversation.turns[0] == ("user", with_history.record["history"][0][0])
  assert len(with_history.conversation.turns) == 4
  assert alpaca[0].conversation.system == alpaca[0].record["system"]
  chats, _ = load_conversations(specs["messages_chat"], "raise")
  assert chats[1].conversation == Conversation(
    chats[1].record["messages"][0]["content"], tuple((m["role"], m["content"]) for m in chats[1].record["messages"][1:])
  )


def test_parquet_reader_and_directory_path(tmp_path):
  rows = [{"question": "头痛怎么办？", "answer": "注意休息。"}, {"question": "发热怎么办？", "answer": "多饮水。"}]
  os.makedirs(tmp_path / "d")
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d" / "part-0.parquet")
  records, stats = _load(one_source_config(str(tmp_path / "d"), "columns"))
  assert [r.conversation.turns[1][1] for r in records] == ["注意休息。", "多饮水。"]
  assert str(records[1].location).endswith("part-0.parquet (item 2)")
  assert stats.records == 2


def test_max_samples_keeps_the_first_records(tmp_path):
  records, stats = _load(one_source_config(f"{COLLECTION}/huatuo_cmekg/llama_data.json", "alpaca", max_samples=5))
  assert len(records) == 5 and stats.records == 5
  assert [r.location.line for r in records] == [1, 2, 3, 4, 5]
  # As LLaMA-Factory's `dataset.select(range(max_samples))` before its conversion: a record the
  # conversion skips (here an empty ShareGPT conversation) still counts.
  lines = [
    {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(4)
  ]
  lines[1]["conversations"] = []
  (tmp_path / "s.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
  data = one_source_config(str(tmp_path / "s.jsonl"), "sharegpt", max_samples=3)
  data.on_error = "skip"
  records, stats = _load(data)
  assert [r.conversation.turns[0][1] for r in records] == ["q0", "q2"]
  assert (stats.records, stats.skipped + stats.left_out) == (3, 1)


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages", "columns", "mcq"])
def test_every_sample_source_loads(fmt):
  specs = [s for s in parse_sources(sample_collection_config().sources) if s.format == fmt]
  records, stats = load_conversations(specs[0], "raise")
  assert len(records) >= 36 and stats.skipped == 0


def test_the_demo_rehearses_cmb_questions_exactly_as_the_benchmark_asks_them():
  """The demo's `cmb_exam` source (mcq, prompt='cmb_exam') renders each item as `csft_jax.eval.cmb` asks it."""
  config = configuration.resolve_paths(demo.get_config())
  spec = next(s for s in parse_sources(config.data.sources) if s.name == "cmb_exam")
  with open(spec.paths[0], encoding="utf-8") as f:
    items = json.load(f)
  for item in items:
    conversation = FORMATS["mcq"].adapt(item, spec.options)
    user, assistant = conversation.turns
    assert [{"role": "user", "content": user[1]}] == cmb.build_messages(item, mode="answer")
    assert assistant[1] == f"答案是{item['answer']}。"
    assert cmb.extract_answer(assistant[1], item["question_type"]) == item["answer"]
