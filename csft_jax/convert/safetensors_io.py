"""Streaming read and write of (sharded) safetensors checkpoints, tensor by tensor.

Reading memory-maps each file and hands out one tensor at a time, so importing a 7B model never
holds more than the model plus one tensor in host RAM. Writing streams each tensor straight to
its shard file. The format is the plain safetensors layout (8-byte little-endian header length,
JSON header, raw little-endian bytes), implemented here so bfloat16 works without torch.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

from csft_jax import files as files_lib

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFileError(ValueError):
  """A safetensors file that cannot be read whole: missing, cut short, or with a broken header."""


class SafetensorsReader:
  """Lazy view of a checkpoint directory: `names()`, `shape(name)`, `get(name) -> np.ndarray`."""

  def __init__(self, directory: str):
    self.directory = directory
    index_path = os.path.join(directory, INDEX_NAME)
    if os.path.exists(index_path):
      weight_map = files_lib.read_json(
        index_path, what="safetensors index (weight_map)", error=SafetensorsFileError
      ).get("weight_map")
      if not isinstance(weight_map, dict):
        raise SafetensorsFileError(f"{index_path}: no 'weight_map' object; re-download or re-export the model.")
      files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(directory, SINGLE_NAME)):
      files = [SINGLE_NAME]
    else:
      found = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
      if not found:
        raise FileNotFoundError(
          f"No safetensors weights in {directory}: expected {SINGLE_NAME} or {INDEX_NAME} "
          f"(PyTorch .bin checkpoints are not supported; re-save with safe_serialization=True)."
        )
      files = found
    self._entries: dict[str, tuple[str, dict, int]] = {}
    for file_name in files:
      path = os.path.join(directory, file_name)
      header, data_start = _read_header(path)
      for name, info in header.items():
        if name != "__metadata__":
          self._entries[name] = (path, info, data_start)

  def names(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name][1]["shape"])

  def get(self, name: str) -> np.ndarray:
    """Returns the tensor as a read-only memory-mapped array (copy it to keep it)."""
    path, info, data_start = self._entries[name]
    dtype = _DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end == begin:
      return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


def _read_header(path: str) -> tuple[dict, int]:
  """The header of one safetensors file and where its data starts, checked against the file's size.

  Raises:
    SafetensorsFileError naming the file when it is missing, its header is broken, or it is shorter
    than its header says (a download or copy that stopped early).
  """
  redo = "re-download or re-copy this file (the other shards are not affected)"
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      prefix = f.read(8)
      if len(prefix) < 8:
        raise SafetensorsFileError(f"{path}: {size} bytes, too short for a safetensors header; {redo}.")
      (length,) = struct.unpack("<Q", prefix)
      if 8 + length > size:
        raise SafetensorsFileError(
          f"{path}: header of {length} bytes but the file has {size}; it is cut short or "
          f"not a safetensors file; {redo}."
        )
      header = json.loads(f.read(length))
  except FileNotFoundError:
    raise SafetensorsFileError(f"{path}: the shard is missing (the index names it); {redo}.") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise SafetensorsFileError(f"{path}: the header is not valid JSON ({e}); {redo}.") from None
  data_start = 8 + length
  end = max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"), default=0)
  if data_start + end > size:
    raise SafetensorsFileError(
      f"{path}: {size:,} bytes but its header needs {data_start + end:,}; the file is cut short; {redo}."
    )
  return header, data_start


def plan_shards(
  tensors: list[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...], np.dtype]]]:
  """Groups tensors, in order, into shards of at most `max_shard_bytes` (a bigger tensor goes alone)."""
  shards: list[list] = [[]]
  size = 0
  for name, shape, dtype in tensors:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((name, shape, dtype))
    size += nbytes
  return shards


def write_sharded(
  directory: str,
  tensors: list[tuple[str, tuple[int, ...], np.dtype]],
  produce: Callable[[str], np.ndarray],
  max_shard_bytes: int = 5 * 2**30,
  metadata: dict[str, str] | None = None,
) -> list[str]:
  """Writes `model-0000k-of-0000n.safetensors` + index (or one `model.safetensors`).

  Args:
    directory: output directory (created).
    tensors: `(name, shape, dtype)` for every tensor, in file order.
    produce: called once per name, right before the tensor is written; must return an array of
      the announced shape and dtype.
    max_shard_bytes: shard size limit.
    metadata: string metadata stored in each header (HF uses `{"format": "pt"}`).

  Returns:
    The written file names.
  """
  os.makedirs(directory, exist_ok=True)
  shards = plan_shards(tensors, max_shard_bytes)
  metadata = {"format": "pt", **(metadata or {})}
  names = (
    [SINGLE_NAME]
    if len(shards) == 1
    else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  )
  weight_map = {}
  for file_name, shard in zip(names, shards):
    _write_file(os.path.join(directory, file_name), shard, produce, metadata)
    weight_map.update({name: file_name for name, _, _ in shard})
  if len(shards) > 1:
    total = sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d in tensors)
    files_lib.write_json_atomic(
      os.path.join(directory, INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": weight_map}
    )
  return names


def _write_file(
  path: str,
  shard: Iterable[tuple[str, tuple[int, ...], np.dtype]],
  produce: Callable[[str], np.ndarray],
  metadata: dict[str, str],
) -> None:
  header: dict = {"__metadata__": metadata}
  offset = 0
  shard = list(shard)
  for name, shape, dtype in shard:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header_bytes = json.dumps(header, separators=(",", ":")).encode()
  header_bytes += b" " * (-len(header_bytes) % 8)  # the format pads the header to 8 bytes
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(header_bytes)))
    f.write(header_bytes)
    for name, shape, dtype in shard:
      array = np.ascontiguousarray(produce(name))
      if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
        raise ValueError(f"{name}: produced {array.shape} {array.dtype}, announced {tuple(shape)} {np.dtype(dtype)}.")
      f.write(array.reshape(-1).view(np.uint8).data)  # little-endian hosts only (x86, ARM)
  os.replace(tmp, path)
