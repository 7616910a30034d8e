"""Bad input: clear errors naming source, file and line; or counted skips with on_error='skip'."""

import json
import math

import pytest

from csft_jax.data.errors import DataError
from csft_jax.data.pipeline import DataPipeline
from tests.data_fixtures import COLLECTION, one_source_config


def _write(tmp_path, name, text, encoding="utf-8"):
  path = tmp_path / name
  path.write_bytes(text.encode(encoding))
  return str(path)


GOOD = json.dumps({"instruction": "头痛怎么办？", "input": "", "output": "注意休息。"}, ensure_ascii=False)


def test_malformed_json_line_names_source_file_and_line(tmp_path):
  path = _write(tmp_path, "a.jsonl", f'{GOOD}\n{{"instruction": "x",\n{GOOD}\n')
  with pytest.raises(DataError, match=rf"source 's', {path}:2: malformed JSON line"):
    DataPipeline(one_source_config(path, "alpaca"))


def test_skip_mode_counts_bad_records_per_source(tmp_path):
  path = _write(tmp_path, "a.jsonl", f"{GOOD}\n{{bad\n{GOOD}\n" + json.dumps({"instruction": "x"}) + "\n")
  data = one_source_config(path, "alpaca")
  data.on_error = "skip"
  pipeline = DataPipeline(data)
  (stats,) = pipeline.stats
  assert (stats.records, stats.skipped, stats.examples) == (4, 2, 2)
  assert f"{path}:2" in stats.first_skip
  assert pipeline.mixture_rows()[0]["skipped"] == 2


def test_wrong_encoding_suggests_the_encoding():
  path = f"{COLLECTION}/cmeddialogue/sample_IM_5000-6000.csv"
  with pytest.raises(DataError, match=r"sample_IM_5000-6000.csv:2 is not valid utf-8.*encoding='gb18030'"):
    DataPipeline(one_source_config(path, "columns", columns={"user": "ask", "assistant": "answer"}))


def test_missing_field_is_named_with_line(tmp_path):
  path = _write(tmp_path, "a.jsonl", f"{GOOD}\n" + json.dumps({"instruction": "x", "input": ""}) + "\n")
  with pytest.raises(DataError, match=rf"{path}:2: missing field 'output'.*format 'alpaca'"):
    DataPipeline(one_source_config(path, "alpaca"))


def test_missing_csv_column_is_named(tmp_path):
  path = _write(tmp_path, "a.csv", "department,title,question\n内科,头痛,头痛怎么办\n", "gb18030")
  with pytest.raises(DataError, match=rf"{path}:2: missing field 'answer'"):
    DataPipeline(one_source_config(path, "columns", encoding="gb18030"))


def test_empty_source_is_an_error(tmp_path):
  path = _write(tmp_path, "empty.jsonl", "\n")
  with pytest.raises(DataError, match="source 's': no records"):
    DataPipeline(one_source_config(path, "alpaca"))


@pytest.mark.parametrize("weight", [0.0, -1.0, math.nan])
def test_bad_weight_is_an_error(tmp_path, weight):
  path = _write(tmp_path, "a.jsonl", GOOD)
  with pytest.raises(DataError, match=r"config.data.sources.s.weight=.*finite and > 0"):
    DataPipeline(one_source_config(path, "alpaca", weight=weight))


def test_glob_matching_nothing_is_an_error(tmp_path):
  with pytest.raises(DataError, match=r"glob '.*nothing-\*.jsonl' .* matches no files"):
    DataPipeline(one_source_config(str(tmp_path / "nothing-*.jsonl"), "alpaca"))


def test_conversation_ending_on_user_turn_is_an_error(tmp_path):
  messages = {
    "messages": [
      {"role": "user", "content": "头痛"},
      {"role": "assistant", "content": "多久了？"},
      {"role": "user", "content": "三天"},
    ]
  }
  path = _write(tmp_path, "m.json", json.dumps([messages, messages], ensure_ascii=False, indent=1))
  with pytest.raises(DataError, match=rf"{path}:2 \(item 1\): conversation ends on a user turn"):
    DataPipeline(one_source_config(path, "messages"))


def test_absent_template_field_is_an_error():
  path = f"{COLLECTION}/cmekg_triples/train_example.json"
  with pytest.raises(
    DataError, match=r"train_example.json:2 \(item 1\): assistant_template field \{triples\} is absent"
  ):
    DataPipeline(one_source_config(path, "template", user_template="{text}", assistant_template="{triples}"))


def test_overlong_drop_counts_per_source(tmp_path):
  long = json.dumps({"instruction": "头痛" * 200, "input": "", "output": "休息"}, ensure_ascii=False)
  path = _write(tmp_path, "a.jsonl", f"{GOOD}\n{long}\n")
  data = one_source_config(path, "alpaca")
  data.overlong = "drop"
  (stats,) = DataPipeline(data).stats
  assert (stats.dropped, stats.truncated, stats.examples) == (1, 0, 1)
  data.overlong = "truncate"  # The answer is cut off: nothing left to train on, so dropped too.
  (stats,) = DataPipeline(data).stats
  assert (stats.dropped, stats.examples) == (1, 1)
