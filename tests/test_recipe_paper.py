"""The CollectiveSFT recipe's `paper` variant trains on what collectivesft.yaml trained on.

The five shared sources and CMB items go through the paper variant's data config (caps, val
split, padding, template, cutoff); every example must equal what CollectiveSFT's preprocess
scripts + LLaMA-Factory v0.8.3 give for the same records: records turned into Alpaca/ShareGPT
messages as cmb_to_sft.py, cmeddialogue_to_sft.py and `aligner.py` do, then
`llamafactory_reference` (template intern2, supervised.py's labels, infer_seqlen at cutoff 1024).
"""

import csv
import functools
import json
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from configs import collection_shared
from configs import collectivesft_internlm2_5_7b as recipe
from configs import collectivesft_qwen2_5_0_5b as small_recipe
from csft_jax.data.config import source_config
from csft_jax.data.holdout import held_out_indices
from csft_jax.data.pipeline import DataPipeline
from csft_jax.data.sources import load_conversations, parse_sources
from tests.data_fixtures import COLLECTION
from tests.test_data_llamafactory import as_labels, intern2_tokenizer, llamafactory_references

CMB_ITEMS = [
  {
    "exam_type": "医师考试",
    "exam_class": "执业医师",
    "exam_subject": "口腔执业医师",
    "question": "患者，男性，11岁。近2个月来时有低热（37～38℃）。此男孩可能患",
    "answer": "D",
    "question_type": "单项选择题",
    "option": {"A": "小叶型肺炎", "B": "浸润性肺结核", "C": "继发性肺结核", "D": "原发性肺结核", "E": "粟粒型肺结核"},
  },
  {
    "exam_type": "护理考试",
    "exam_class": "护士执业资格",
    "exam_subject": "护理学",
    "question": "下列属于癌前病变的是",
    "answer": "AC",
    "question_type": "多项选择题",
    "option": {"D": "增生", "C": "黏膜白斑", "B": "", "A": "肠上皮化生"},
  },
] * 5  # 10 items: one held out at val_size 0.1
# The paper variant caps every source at 1000 records (checked below); these tests keep the first
# 200 of each, to stay fast: the same rule (the first N records) on fewer records.
CAP = 200


def cmb_to_sft(item):
  """CollectiveSFT's preprocess/cmb_to_sft.py for one item -> (instruction, input, output)."""
  question = f"{item['question']}\n"
  for option in sorted(item["option"]):
    question += f"{option}: {item['option'][option]}\n"
  return (
    f"该问题源自{item['exam_type']}，面向{item['exam_class']}中的{item['exam_subject']}。\n\n",
    question,
    f"答案是{item['answer']}。",
  )


def alpaca_turns(instruction, query, response):
  """aligner.py's convert_alpaca: non-empty prompt and query joined by a newline."""
  return (("user", "\n".join(x for x in (instruction, query) if x)), ("assistant", response))


@functools.cache
def official_turns():
  """Per source: (system, turns) of the first CAP raw records, as the official code converts them."""
  with open(f"{COLLECTION}/cmeddialogue/sample_IM_5000-6000.csv", encoding="gb18030", newline="") as f:
    rows = list(csv.DictReader(f))[:CAP]
  with open(f"{COLLECTION}/huatuo_cmekg/llama_data.json", encoding="utf-8") as f:
    cmekg = [json.loads(line) for line in f][:CAP]
  with open(f"{COLLECTION}/medicalgpt_sft/medical_sft_1K_format.jsonl", encoding="utf-8") as f:
    sharegpt = [json.loads(line)["conversations"] for line in f][:CAP]
  roles = {"human": "user", "gpt": "assistant"}
  out = {
    "cmeddialogue": [(None, alpaca_turns(r["title"], r["ask"], r["answer"])) for r in rows],
    "huatuo_cmekg": [(None, alpaca_turns(r["instruction"], r["input"], r["output"])) for r in cmekg],
    "medicalgpt_sft": [(None, tuple((roles[t["from"]], t["value"]) for t in c)) for c in sharegpt],
    "cmb": [(None, alpaca_turns(*cmb_to_sft(item))) for item in CMB_ITEMS],
  }
  # No official preprocessing exists for these two: our adapters' conversations (tested in
  # test_data_adapters.py) go through LLaMA-Factory's template and cutoff.
  for spec in parse_sources(collection_shared.get_data_config().sources):
    if spec.name in ("huatuo_liver_cancer", "cmekg_triples"):
      records, _ = load_conversations(spec, "raise")
      out[spec.name] = [(r.conversation.system, r.conversation.turns) for r in records[:CAP]]
  return out


def paper_pipeline(tmp_dir: str) -> DataPipeline:
  """The paper variant's data config with its sources replaced by the shared ones and CMB items."""
  config = recipe.get_config("variant=paper")
  cmb = f"{tmp_dir}/cmb.json"
  with open(cmb, "w", encoding="utf-8") as f:
    json.dump(CMB_ITEMS, f, ensure_ascii=False)
  intern2_tokenizer().save_pretrained(f"{tmp_dir}/tokenizer")
  sources = collection_shared.get_data_config().sources.to_dict()
  for entry in sources.values():
    entry["max_samples"] = CAP
  _, fmt, options = recipe.SOURCES["cmb"]
  sources["cmb"] = source_config(cmb, fmt, **options, max_samples=CAP).to_dict()
  config.data.sources = ml_collections.ConfigDict(sources)
  config.data.tokenizer = f"{tmp_dir}/tokenizer"
  return DataPipeline(config.data)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  return paper_pipeline(str(tmp_path_factory.mktemp("paper")))


def test_paper_variant_is_the_yaml_and_full_keeps_examples_per_step():
  paper, full = recipe.get_config("variant=paper"), recipe.get_config("variant=full")
  assert recipe.get_config().to_dict() == paper.to_dict()  # paper is the default
  assert {s.max_samples for s in paper.data.sources.values()} == {1000}
  assert (paper.data.val_fraction, paper.data.packing, paper.data.seq_len) == (0.1, "padded", 1024)
  assert (paper.data.overlong, paper.data.chat_template) == ("infer_seqlen", "llamafactory_intern2")
  assert paper.train.global_batch_size == 16 * 2 * 8  # per-device batch x accumulation x GPUs, one example a row
  assert (paper.train.grad_accum_steps, paper.optim.lr, paper.train.num_epochs) == (2, 2e-5, 3.0)
  assert {s.max_samples for s in full.data.sources.values()} == {None} and full.data.packing == "packed"
  assert full.train.global_batch_size * 4 == paper.train.global_batch_size  # ~4 examples per packed row
  for mesh, (_, accum, *_) in recipe.MESH_PRESETS.items():
    rows = recipe.get_config(f"variant=full,mesh={mesh}").train
    # A quarter of the rows, a quarter of the accumulation: no more rows per device than measured.
    assert rows.grad_accum_steps == max(1, accum // 4)
    assert rows.global_batch_size // rows.grad_accum_steps <= 256 // accum
  assert recipe.SOURCES["cmeddialogue"][1:] == (
    "alpaca",
    {"encoding": "gb18030", "columns": {"instruction": "title", "input": "ask", "output": "answer"}},
  )
  shared = collection_shared.get_data_config().sources.cmeddialogue
  assert (shared.format, shared.columns.to_dict()) == ("alpaca", recipe.SOURCES["cmeddialogue"][2]["columns"])
  small = small_recipe.get_config("variant=full")
  assert (small.data.chat_template, small.data.overlong, small.train.global_batch_size) == (
    "chatml",
    "infer_seqlen",
    64,
  )


def test_paper_variant_trains_every_example_as_the_official_code(pipeline):
  tok = intern2_tokenizer()
  official = official_turns()
  for name, train, val in zip(pipeline.source_names, pipeline.train_sources, pipeline.val_sources):
    expected = sorted(
      (np.asarray(ids).tobytes(), np.asarray(labels).tobytes())
      for ids, labels in llamafactory_references(tok, official[name], 1024)
    )
    held = (val.token_ids, val.loss_masks) if val is not None else ([], [])
    ours = sorted(
      (ids.astype(np.int64).tobytes(), np.asarray(as_labels(ids, mask), dtype=np.int64).tobytes())
      for ids, mask in zip(train.token_ids + held[0], train.loss_masks + held[1])
    )
    assert ours == expected, name
  truncated = {n: s.truncated for n, s in zip(pipeline.source_names, pipeline.stats)}
  assert truncated["medicalgpt_sft"] > 0  # some replies are longer than the cutoff: infer_seqlen cut them


# Made by tools/llamafactory_fixtures.py: the row positions LLaMA-Factory v0.8.3's split_dataset
# (val_size 0.1, seed 42) holds out of a dataset of N rows.
LLAMAFACTORY_SPLIT = json.loads((Path(__file__).parent / "fixtures" / "llamafactory_split.json").read_text())
YAML_DATASETS = "cmb,cmeddialogue,cmedqa2,cmid,discmed,headqa,medicaldialogue,medmcqa,medqajin,mlecqa,nlpec,webmedqa"


def test_paper_variant_holds_out_llamafactorys_examples(pipeline):
  """The held-out examples are those LLaMA-Factory's split_dataset takes from the concatenation of
  the sources, in the order collectivesft.yaml lists them (`dataset:`), which is the config's."""
  assert LLAMAFACTORY_SPLIT["made_by"].startswith("llamafactory 0.8.3 split_dataset")
  config = recipe.get_config("variant=paper")
  assert ",".join(config.data.sources) == YAML_DATASETS
  assert (config.data.val_split, config.data.seed, config.data.val_fraction) == ("concatenation", 42, 0.1)
  lengths = [len(t) + (len(v) if v is not None else 0) for t, v in zip(pipeline.train_sources, pipeline.val_sources)]
  starts = np.cumsum([0, *lengths])
  ours = [int(start + i) for start, held in zip(starts, pipeline.held_out) for i in held]
  assert ours == LLAMAFACTORY_SPLIT["held_out_positions"][str(sum(lengths))]
  assert [len(v) if v is not None else 0 for v in pipeline.val_sources] == [len(h) for h in pipeline.held_out]
  # The paper's own size: 12 sources of 1000 records.
  held = held_out_indices([1000] * 12, 0.1, 42, "concatenation")
  assert [int(1000 * k + i) for k, h in enumerate(held) for i in h] == LLAMAFACTORY_SPLIT["held_out_positions"]["12000"]
  # The full variant keeps the per-source split.
  assert recipe.get_config("variant=full").data.val_split == "per_source"


def test_paper_variant_text_and_trained_spans(pipeline):
  template = pipeline.template
  text, spans = template.render(load_first(pipeline, "cmb"))
  assert text == (
    "<s><|im_start|>user\n该问题源自医师考试，面向执业医师中的口腔执业医师。\n\n\n"
    "患者，男性，11岁。近2个月来时有低热（37～38℃）。此男孩可能患\n"
    "A: 小叶型肺炎\nB: 浸润性肺结核\nC: 继发性肺结核\nD: 原发性肺结核\nE: 粟粒型肺结核\n"
    "<|im_end|>\n<|im_start|>assistant\n答案是D。</s>"
  )
  assert [text[a:b] for a, b in spans] == ["答案是D。</s>"]
  text, spans = template.render(load_first(pipeline, "cmeddialogue"))
  assert text.startswith(
    "<s><|im_start|>user\n高血压患者能吃党参吗？\n我有高血压这两天女婿来的时候给我拿了些党参泡水喝"
  )
  assert [text[a:b] for a, b in spans] == [text[text.index("高血压病人可以口服党参的。") :]]
  text, spans = template.render(load_first(pipeline, "huatuo_liver_cancer"))
  trained = [text[a:b] for a, b in spans]
  assert trained[0].endswith("<|im_end|>") and trained[1].endswith("</s>") and len(trained) == 2


def load_first(pipeline, name):
  (spec,) = [s for s in parse_sources(pipeline.config.sources) if s.name == name]
  records, _ = load_conversations(spec, "raise")
  return records[0].conversation


def test_paper_variant_steps_on_256_padded_examples(pipeline):
  batch = next(iter(pipeline.train_dataset(256)))
  assert batch["input_ids"].shape == (256, 1024)
  assert (batch["segment_ids"].max(axis=1) == 1).all()  # one example per row: 256 examples a step
  # Multi-turn rows: the target after an earlier reply is </s>, the input there stays <|im_end|>.
  eos, im_end = intern2_tokenizer().eos_token_id, intern2_tokenizer().convert_tokens_to_ids("<|im_end|>")
  inner = (batch["target_ids"] == eos) & (np.roll(batch["input_ids"], -1, axis=1) == im_end) & (batch["loss_mask"] == 1)
  assert inner.any()
