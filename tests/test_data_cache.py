"""The tokenize-once cache: bitwise the uncached batches, exact resume, 2-process prepare and split, bad input."""

import glob
import json
import os
import shutil
import subprocess
import sys

import grain
import numpy as np
import pytest

from csft_jax.configuration import resolve_path
from csft_jax.data import cache, prepare
from csft_jax.data.config import SAMPLE_COLLECTION
from csft_jax.data.errors import DataError
from csft_jax.data.packing import packing_efficiency
from csft_jax.data.pipeline import DataPipeline
from tests import REPO_ROOT
from tests.data_fixtures import one_source_config, sample_config, sample_pipeline

SHARD = 7  # Conversations per shard in these tests: every source spans several shards.


def _take(it, n):
  return [next(it) for _ in range(n)]


def _prepare(data, **kwargs):
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(cache, "SHARD_CONVERSATIONS", SHARD)
    return prepare.prepare(data, num_workers=1, out=None, **kwargs)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("cache"))
  _prepare(sample_config(cache_dir=path))
  return path


def _cached(cache_dir, **overrides):
  return DataPipeline(sample_config(cache_dir=cache_dir, cache="require", **overrides))


def test_manifest_counts_and_shards(cache_dir):
  manifest = cache.read_manifest(cache_dir)
  reference = sample_pipeline()
  for name, stats in zip(reference.source_names, reference.stats):
    entry = manifest["sources"][name]
    assert entry["examples"] == stats.examples and entry["tokens"] == stats.tokens
    assert (entry["loss_tokens"], entry["truncated"], entry["records"]) == (
      stats.loss_tokens,
      stats.truncated,
      stats.records,
    )
    assert len(entry["shards"]) == -(-stats.records // SHARD)
  assert manifest["fingerprint"]["seq_len"] == 128


@pytest.mark.parametrize("packing", ["packed", "padded"])
def test_cached_batches_are_bitwise_the_uncached_ones(cache_dir, packing):
  reference, cached = sample_pipeline(packing), _cached(cache_dir, packing=packing)
  assert [vars(s) for s in cached.stats] == [vars(s) for s in reference.stats]
  assert cached.mixture_table() == reference.mixture_table()
  np.testing.assert_array_equal(cached.weights, reference.weights)
  expected, got = _take(iter(reference.train_dataset(4)), 40), _take(iter(cached.train_dataset(4)), 40)
  for e, g in zip(expected, got):
    assert e.keys() == g.keys()
    for k in e:
      assert e[k].dtype == g[k].dtype and e[k].tobytes() == g[k].tobytes(), k
  np.testing.assert_equal(cached.val_batches(8), reference.val_batches(8))
  for i in range(len(reference.source_names)):
    np.testing.assert_array_equal(cached.train_lengths(i), reference.train_lengths(i))
    ids, mask = cached.train_example(i, 3)
    np.testing.assert_array_equal(ids, reference.train_example(i, 3)[0])
    np.testing.assert_array_equal(mask, reference.train_example(i, 3)[1])


def test_resume_is_exact_on_the_cached_path_and_states_carry_over(cache_dir):
  ds = grain.experimental.LimitIterDataset(_cached(cache_dir).train_dataset(2), count=6)
  grain.experimental.assert_equal_output_after_checkpoint(ds)
  # 40 batches pass several epochs of the small sources; the uncached run's state restores
  # into a fresh cached pipeline and continues exactly.
  it = iter(sample_pipeline().train_dataset(4))
  _take(it, 40)
  state = it.get_state()
  expected = _take(it, 5)
  restored = iter(_cached(cache_dir).train_dataset(4))
  restored.set_state(state)
  np.testing.assert_equal(_take(restored, 5), expected)


def test_two_processes_prepare_their_shares_and_read_their_rows(tmp_path):
  cache_dir = str(tmp_path / "cache")
  # Process 1 tokenizes its shards and leaves; process 0 makes the rest and writes the manifest.
  assert _prepare(sample_config(cache_dir=cache_dir), process_index=1, process_count=2) is None
  assert cache.read_manifest(cache_dir) is None
  manifest = _prepare(sample_config(cache_dir=cache_dir), process_index=0, process_count=2)
  assert manifest["num_processes"] == 2 and manifest["sources"]["alpaca_qa"]["examples"] == 90
  single = _take(iter(sample_pipeline().train_dataset(8)), 3)
  parts = [_take(iter(_cached(cache_dir).train_dataset(8, p, 2)), 3) for p in range(2)]
  for i, batch in enumerate(single):
    for k, v in batch.items():
      assert parts[0][i][k].shape == (4, 128)
      np.testing.assert_array_equal(np.concatenate([parts[0][i][k], parts[1][i][k]]), v)


def test_prepare_and_inspect_clis_use_worker_processes_and_the_cache(tmp_path):
  env = {**os.environ, "PYTHONPATH": REPO_ROOT}
  cache_dir = str(tmp_path / "cache")

  def run(*args):
    done = subprocess.run(
      [sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done

  out = run(
    "csft_jax.data.prepare",
    "--config=configs/sample_collection.py",
    f"--config.data.cache_dir={cache_dir}",
    "--config.data.seq_len=128",
    "--config.data.num_packing_bins=4",
    "--num_workers=2",
    "--json",
  )
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  reference = sample_pipeline()
  assert {n: s["examples"] for n, s in summary["sources"].items()} == {
    n: s.examples for n, s in zip(reference.source_names, reference.stats)
  }
  assert "ETA" in out.stderr and "prepared 330 examples" in out.stderr and "sharegpt_dialogues" in out.stderr
  out = run(
    "csft_jax.data.inspect",
    "--config=configs/sample_collection.py",
    f"--config.data.cache_dir={cache_dir}",
    "--config.data.cache=require",
    "--config.data.seq_len=128",
    "--config.data.num_packing_bins=4",
    "--num_batches=4",
    "--batch_size=8",
    "--json",
  )
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["packing_efficiency"] == packing_efficiency(_take(iter(reference.train_dataset(8)), 4))
  assert {n: r["tokens"] for n, r in report["sources"].items()} == {
    r["source"]: r["tokens"] for r in reference.mixture_rows()
  }
  assert "[[答案是" in out.stdout


def test_a_changed_config_or_file_names_the_field_and_auto_rebuilds(cache_dir, tmp_path):
  with pytest.raises(cache.CacheError, match=r"config.data.seq_len is 128 in the cache but 96 .*field seq_len"):
    _cached(cache_dir, seq_len=96)
  with pytest.raises(cache.CacheError, match=r"config.data.chat_template is 'chatml' in the cache but 'llama3'"):
    _cached(cache_dir, chat_template="llama3")
  data = sample_config(cache_dir=cache_dir, cache="require")
  data.sources.doctor_qa.columns.user = "title"
  with pytest.raises(cache.CacheError, match=r"field sources.doctor_qa.options.columns.user"):
    DataPipeline(data)
  source = tmp_path / "alpaca.jsonl"
  shutil.copy(os.path.join(resolve_path(SAMPLE_COLLECTION), "alpaca_qa.jsonl"), source)
  data = one_source_config(str(source), "alpaca")
  data.cache_dir = str(tmp_path / "one")
  _prepare(data)
  with source.open("a", encoding="utf-8") as f:
    f.write(json.dumps({"instruction": "新问题", "input": "", "output": "新回答"}, ensure_ascii=False) + "\n")
  data.cache = "require"
  with pytest.raises(cache.CacheError, match=rf"source file {source} changed \(mtime_ns: .*field sources.s.files\["):
    DataPipeline(data)
  data.cache = "auto"
  rebuilt = DataPipeline(data)
  assert len(rebuilt.train_sources[0]) == 91
  data.cache = "require"  # The rebuilt cache now matches; the stale build was removed.
  assert len(DataPipeline(data).train_sources[0]) == 91
  assert len([d for d in os.listdir(tmp_path / "one") if d.startswith("build-")]) == 1


def test_a_disabled_source_reads_the_rest_and_a_new_source_is_named(cache_dir):
  data = sample_config(cache_dir=cache_dir, cache="require")
  data.sources.doctor_qa.enabled = False
  assert DataPipeline(data).source_names == ["alpaca_qa", "cmb_style_mcq", "messages_chat", "sharegpt_dialogues"]
  data = sample_config(cache_dir=cache_dir, cache="require")
  data.sources.extra = data.sources.alpaca_qa.copy_and_resolve_references()
  with pytest.raises(cache.CacheError, match=r"source 'extra' is not in the cache"):
    DataPipeline(data)


class _Killed(BaseException):
  """Stands for the process being killed in the middle of a prepare."""


def test_an_interrupted_prepare_leaves_no_manifest_says_so_and_resumes(tmp_path, monkeypatch):
  data, resumed = sample_config(cache_dir=str(tmp_path / "cache")), False
  with pytest.raises(DataError, match="holds no cache"):
    DataPipeline(sample_config(cache_dir=data.cache_dir, cache="require"))
  write_shard, calls = cache.write_shard, []

  def interrupted(*args):
    calls.append(args[0])
    if len(calls) == 5 and not resumed:
      raise _Killed
    return write_shard(*args)

  monkeypatch.setattr(cache, "write_shard", interrupted)
  with pytest.raises(_Killed):
    _prepare(data)
  assert cache.read_manifest(data.cache_dir) is None
  with pytest.raises(
    cache.CacheError,
    match=r"has shards \(build-\w+\) but no manifest.json: a prepare was"
    r" interrupted",
  ):
    DataPipeline(sample_config(cache_dir=data.cache_dir, cache="require"))
  calls.clear()
  resumed = True
  _prepare(data)  # The 4 finished shards are kept; the rest are made now.
  assert len(calls) == sum(-(-s.records // SHARD) for s in sample_pipeline().stats) - 4
  reference = sample_pipeline()
  np.testing.assert_equal(
    _take(iter(_cached(data.cache_dir).train_dataset(4)), 3), _take(iter(reference.train_dataset(4)), 3)
  )


def test_bad_cache_settings_and_all_dropped_sources(tmp_path):
  with pytest.raises(DataError, match=r"config.data.cache_dir is not set"):
    prepare.prepare(sample_config(), out=None)
  with pytest.raises(DataError, match=r"config.data.cache='sometimes' is not one of \('off', 'auto', 'require'\)"):
    DataPipeline(sample_config(cache="sometimes"))
  with pytest.raises(DataError, match=r"config.data.cache='require' needs config.data.cache_dir"):
    DataPipeline(sample_config(cache="require"))
  path = os.path.join(resolve_path(SAMPLE_COLLECTION), "sharegpt_dialogues.json")
  data = one_source_config(path, "sharegpt")
  data.update(cache_dir=str(tmp_path / "c"), seq_len=16, overlong="drop")
  with pytest.raises(DataError) as uncached:
    DataPipeline(data)
  with pytest.raises(DataError) as cached:
    _prepare(data)
  assert str(cached.value) == str(uncached.value)
  assert "all 40 examples are longer than seq_len=16" in str(cached.value)


def test_a_file_named_by_a_source_option_is_fingerprinted(tmp_path):
  from csft_jax.data import meds_ins
  from csft_jax.data.sources import parse_sources

  rewrites = tmp_path / "RewriteDefinitions.json"
  rewrites.write_text(json.dumps({"task1001": {"auto_rewrite_def": ["分诊。"]}}, ensure_ascii=False))
  sources = {
    "meds": meds_ins.source_config(
      resolve_path("pkg://csft_jax/assets/meds_ins"), rewrite_definitions=str(rewrites), rewrite_prob=0.5
    )
  }
  before = cache.source_fingerprint(parse_sources(sources)[0])
  rewrites.write_text(json.dumps({"task1001": {"auto_rewrite_def": ["请分诊。"]}}, ensure_ascii=False))
  after = cache.source_fingerprint(parse_sources(sources)[0])
  field, _, _ = cache.fingerprint_difference(before, after)
  assert field.startswith("option_files.rewrite_definitions.")  # mtime_ns, or size


def test_force_rewrites_every_shard(tmp_path):
  data = sample_config(cache_dir=str(tmp_path))
  _prepare(data)
  shards = sorted(glob.glob(os.path.join(str(tmp_path), "build-*", "*", "shard-*.json")))
  before = {path: os.stat(path).st_mtime_ns for path in shards}
  _prepare(data, force=True)
  assert shards and all(os.stat(path).st_mtime_ns != before[path] for path in shards)
