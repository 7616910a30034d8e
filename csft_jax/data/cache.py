"""The tokenize-once cache: ArrayRecord shards of (token ids, loss mask) per source, and a manifest.

Layout under `config.data.cache_dir`:
  manifest.json                    written last: a cache is complete (manifest) or absent
  build-<hash>/<source>/shard-00000.array_record   one record per example (see `encode_example`)
  build-<hash>/<source>/shard-00000.json           the shard's counts; its presence marks it done
  build-<hash>/<source>/shard-00000.lengths.npy    int32 tokens per example of the shard
  build-<hash>/<source>/lengths.npy                the source's lengths (memory-mapped when read)

The manifest holds per source the shards and counts (records, examples, tokens, loss tokens,
skipped, dropped, truncated) and a fingerprint of everything that changes the tokens: the files
(size and mtime), the format options, the tokenizer files (SHA-256), the chat template,
seq_len, the over-long and bad-record policies, and the data code itself (its syntax trees: comments
and docstrings do not count). Mixing, weights,
seed, val_fraction and val_split are applied when the cache is read, so changing them needs no rebuild.

Shard k of a source holds the examples of its conversations [k * SHARD_CONVERSATIONS,
(k + 1) * SHARD_CONVERSATIONS) in source order, tokenized by `examples.tokenize_source`, so
the shards concatenated are exactly the uncached `TokenizedSource`.
"""

import ast
import functools
import glob
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from csft_jax import files
from csft_jax.configuration import resolve_path
from csft_jax.data.conversation import Conversation
from csft_jax.data.errors import DataError
from csft_jax.data.examples import tokenize_source
from csft_jax.data.sources import SourceRecord, SourceSpec, SourceStats
from csft_jax.data.templates import ChatTemplate
from csft_jax.data.tokenizer import TOKENIZER_FILES

CACHE_MODES = ("off", "auto", "require")
CACHE_VERSION = 1
MANIFEST = "manifest.json"
SHARD_CONVERSATIONS = 16_384  # Conversations per shard: the unit of parallel work.
# group_size:1 makes every record its own chunk: what Grain needs for fast random access.
_WRITER_OPTIONS = "group_size:1"
# Modules that only arrange tokens already made; every other csft_jax/data module is fingerprinted.
# packing.py stays in: it reads the cached loss masks (LAST_TOKEN_TARGET).
_NOT_TOKEN_CODE = ("__init__", "cache", "config", "errors", "holdout", "inspection", "mixture", "pipeline", "prepare")


class CacheError(DataError):
  """The cache is absent, unfinished or built for another config; the message says what to run."""


def encode_example(token_ids: np.ndarray, loss_mask: np.ndarray) -> bytes:
  """One record: n int32 token ids (little-endian) then n int8 loss-mask bytes."""
  return token_ids.astype("<i4").tobytes() + loss_mask.astype(np.int8).tobytes()


def decode_example(record: bytes) -> tuple[np.ndarray, np.ndarray]:
  """The inverse of `encode_example`: (int32 token ids, int8 loss mask)."""
  n = len(record) // 5
  ids = np.frombuffer(record, dtype="<i4", count=n).astype(np.int32, copy=False)
  return ids, np.frombuffer(record, dtype=np.int8, count=n, offset=4 * n)


def _sha256_files(paths: Sequence[str]) -> str:
  digest = hashlib.sha256()
  for path in paths:
    digest.update(os.path.basename(path).encode())
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
  return digest.hexdigest()


@functools.cache
def _code_hash() -> str:
  """The data code this process runs, as syntax trees: comments, docstrings and layout do not count."""
  here = os.path.dirname(os.path.abspath(__file__))
  digest = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(here, "*.py"))):
    name = os.path.splitext(os.path.basename(path))[0]
    if name in _NOT_TOKEN_CODE:
      continue
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      body = getattr(node, "body", None)
      if (
        isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
      ):
        node.body = body[1:] or [ast.Pass()]
    digest.update(name.encode() + ast.dump(tree).encode())
  return digest.hexdigest()


def _jsonable(value: Any) -> Any:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in sorted(value.items())}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def source_fingerprint(spec: SourceSpec) -> dict[str, Any]:
  """What of one source changes its tokens: files (size, mtime) and read/format options."""
  stats = {}
  for path in spec.paths:
    st = os.stat(path)
    stats[path] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
  # A file that an option names (e.g. meds_ins's rewrite_definitions) shapes the text too.
  option_files = {}
  for key, value in sorted(spec.options.items()):
    if isinstance(value, str) and os.path.isfile(value):
      st = os.stat(value)
      option_files[key] = {"path": value, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
  return {
    "files": stats,
    "format": spec.format,
    "max_samples": spec.max_samples,
    "encoding": spec.encoding,
    "reader": spec.reader,
    "options": _jsonable(spec.options),
    "option_files": option_files,
  }


def fingerprint(data_config: ml_collections.ConfigDict, specs: Sequence[SourceSpec]) -> dict[str, Any]:
  """Everything that changes the cached tokens (see the module docstring)."""
  tokenizer_dir = resolve_path(data_config.tokenizer)
  tokenizer_files = [
    os.path.join(tokenizer_dir, name)
    for name in sorted(TOKENIZER_FILES)
    if os.path.isfile(os.path.join(tokenizer_dir, name))
  ]
  return {
    "version": CACHE_VERSION,
    "code": _code_hash(),
    "tokenizer": _sha256_files(tokenizer_files),
    "chat_template": data_config.chat_template,
    "seq_len": data_config.seq_len,
    "overlong": data_config.overlong,
    "on_error": data_config.on_error,
    "sources": {spec.name: source_fingerprint(spec) for spec in specs},
  }


def build_name(fp: Mapping[str, Any]) -> str:
  """The build directory of a fingerprint: a new config never writes over shards being read."""
  return "build-" + hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]


def fingerprint_difference(cached: Any, current: Any, field: str = "") -> tuple[str, Any, Any] | None:
  """The first field (dotted, `[key]` for file paths) where two fingerprints differ, with both values.

  Sources of the cache that the config does not name are ignored: a source may be disabled.
  """
  if isinstance(cached, dict) and isinstance(current, dict):
    keys = current if field == "sources" else sorted(set(cached) | set(current))
    for key in keys:
      sub = f"{field}[{key}]" if field.endswith(".files") else (f"{field}.{key}" if field else key)
      if key not in cached or key not in current:
        return sub, cached.get(key, "absent"), current.get(key, "absent")
      found = fingerprint_difference(cached[key], current[key], sub)
      if found:
        return found
    return None
  return None if cached == current else (field, cached, current)


_WHY = {
  "code": "the data code (csft_jax/data readers, adapters, templates) changed since it was built",
  "version": "it was written by another cache version",
  "tokenizer": "the tokenizer files (config.data.tokenizer) changed",
}


def read_manifest(cache_dir: str) -> dict[str, Any] | None:
  """The manifest of a finished cache, or None when there is none."""
  return files.read_json_if_exists(os.path.join(cache_dir, MANIFEST), error=CacheError)


def open_cache(
  data_config: ml_collections.ConfigDict, specs: Sequence[SourceSpec], fp: Mapping[str, Any] | None = None
) -> dict[str, Any]:
  """The manifest of the cache in `config.data.cache_dir`, checked against the config.

  Raises:
    CacheError: no cache, an unfinished one (a prepare interrupted or still running), or one
      whose fingerprint differs from the config (the message names the first differing field).
  """
  cache_dir = data_config.cache_dir
  prepare = "run `python -m csft_jax.data.prepare --config=<your config>`"
  manifest = read_manifest(cache_dir)
  if manifest is None:
    unfinished = sorted(glob.glob(os.path.join(cache_dir, "build-*")))
    if unfinished:
      raise CacheError(
        f"config.data.cache_dir={cache_dir} has shards ({os.path.basename(unfinished[-1])}) but no {MANIFEST}:"
        f" a prepare was interrupted (or is still running); {prepare} again"
      )
    raise CacheError(
      f"config.data.cache_dir={cache_dir} holds no cache ({MANIFEST} not found); {prepare}"
      " first, or set config.data.cache='auto' to build it on start"
    )
  fp = fp or fingerprint(data_config, specs)
  difference = fingerprint_difference(manifest.get("fingerprint", {}), fp)
  if difference:
    field, was, now = difference
    top = field.split(".")[0].split("[")[0]
    what = _WHY.get(top, f"config.data.{field} is {was!r} in the cache but {now!r} in the config")
    if field.startswith("sources.") and ".files[" in field:
      path, _, key = field.split("[", 1)[1].rpartition("]")
      what = f"source file {path} changed ({key.lstrip('.') or 'listed'}: {was!r} -> {now!r})"
    elif field.startswith("sources.") and was == "absent":
      what = f"source {field.split('.')[1]!r} is not in the cache (it holds {sorted(manifest['sources'])})"
    raise CacheError(
      f"cache {cache_dir} does not match the config: {what} (field {field}); {prepare} to"
      " rebuild it, or set config.data.cache='auto'"
    )
  return manifest


class CachedSource:
  """A source's examples read from the cache by random access (Grain's ArrayRecordDataSource).

  Same interface as `examples.TokenizedSource` for the pipeline (len, name, stats, num_tokens,
  subset) plus `[i] -> (token_ids, loss_mask)`. It holds no Python object per example: a
  subset keeps one int64 index array, lengths are a memory-mapped file.
  """

  def __init__(
    self,
    name: str,
    records: grain.sources.ArrayRecordDataSource,
    lengths: np.ndarray,
    stats: SourceStats,
    indices: np.ndarray | None = None,
  ):
    self.name = name
    self.stats = stats
    self._records = records
    self._lengths = lengths
    self._indices = indices

  def __len__(self) -> int:
    return len(self._records) if self._indices is None else len(self._indices)

  def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    key = index if self._indices is None else int(self._indices[index])
    return decode_example(self._records[key])

  @property
  def lengths(self) -> np.ndarray:
    """Tokens per example."""
    return self._lengths if self._indices is None else self._lengths[self._indices]

  @property
  def num_tokens(self) -> int:
    return int(self.lengths.sum(dtype=np.int64))

  def subset(self, indices: Sequence[int]) -> "CachedSource":
    indices = np.asarray(indices, dtype=np.int64)
    if self._indices is not None:
      indices = self._indices[indices]
    return CachedSource(self.name, self._records, self._lengths, self.stats, indices)


def cached_source(cache_dir: str, manifest: Mapping[str, Any], name: str) -> CachedSource:
  """Opens one source of a checked manifest; reads no shard (readers open on first access)."""
  entry = manifest["sources"][name]
  build = os.path.join(cache_dir, manifest["build"])
  # "path[0:n]" gives the record count up front, so no shard is opened to count it.
  paths = [f"{os.path.join(build, s['file'])}[0:{s['examples']}]" for s in entry["shards"] if s["examples"]]
  records = grain.sources.ArrayRecordDataSource(paths)
  lengths = np.load(os.path.join(build, entry["lengths"]), mmap_mode="r")
  stats = SourceStats(
    **{
      k: entry[k]
      for k in ("records", "skipped", "dropped", "truncated", "examples", "tokens", "loss_tokens", "first_skip")
    }
  )
  return CachedSource(name, records, lengths, stats)


def shard_stem(build_dir: str, source: str, shard: int) -> str:
  return os.path.join(build_dir, source, f"shard-{shard:05d}")


def write_shard(
  stem: str, name: str, conversations: Sequence[Conversation], template: ChatTemplate, seq_len: int, overlong: str
) -> dict[str, int]:
  """Tokenizes one shard's conversations as the uncached pipeline does and writes its files.

  The shard's `.json` (its counts) is written last, so a shard is done exactly when it exists.
  """
  from array_record.python.array_record_module import ArrayRecordWriter

  stats = SourceStats()
  records = [SourceRecord(c, {}, None) for c in conversations]
  try:
    source = tokenize_source(name, records, stats, template, seq_len, overlong)
    token_ids, loss_masks = source.token_ids, source.loss_masks
  except DataError:
    if stats.dropped != len(records):
      raise
    # Every example of this shard is over-long: an empty shard; prepare checks the whole source.
    token_ids, loss_masks = [], []
  os.makedirs(os.path.dirname(stem), exist_ok=True)
  writer = ArrayRecordWriter(f"{stem}.array_record.tmp", _WRITER_OPTIONS)
  for ids, mask in zip(token_ids, loss_masks):
    writer.write(encode_example(ids, mask))
  writer.close()
  os.replace(f"{stem}.array_record.tmp", f"{stem}.array_record")
  lengths = np.fromiter((len(t) for t in token_ids), dtype=np.int32, count=len(token_ids))
  with open(f"{stem}.lengths.npy.tmp", "wb") as f:
    np.save(f, lengths)
  os.replace(f"{stem}.lengths.npy.tmp", f"{stem}.lengths.npy")
  counts = {
    "conversations": len(records),
    "examples": stats.examples,
    "tokens": stats.tokens,
    "loss_tokens": stats.loss_tokens,
    "dropped": stats.dropped,
    "truncated": stats.truncated,
  }
  files.write_json_atomic(f"{stem}.json", counts)
  return counts
