"""The safetensors files of a checkpoint folder: found, validated and read one tensor at a time.

:func:`open_checkpoint` reads ``model.safetensors.index.json`` (a sharded checkpoint) or the
folder's single ``*.safetensors`` file, and checks every shard up front: each one named by
the index exists, its header reads, its data is as long as the header says, and it holds
the keys the index assigns to it.  Anything else is a :class:`CheckpointError` with a
one-line message.  Only the public ``safetensors.safe_open`` API is used.

:meth:`Checkpoint.read` opens the shard for one tensor (or one expert of a fused bank) and
closes it again, so the memory-mapped pages of a shard are never held beyond one read.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["CheckpointError", "Checkpoint", "open_checkpoint", "INDEX_FILE", "FLOAT_DTYPES"]

INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype names a solver can take (after a cast)
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_ITEM_BYTES = {**FLOAT_DTYPES, "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2}  # others: 1


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as it stands (one line)."""


class Checkpoint:
    """The tensors of a safetensors checkpoint: ``entries[key] = (file, shape, dtype name)``."""

    def __init__(self, folder: str, entries: Dict[str, Tuple[str, Tuple[int, ...], str]]):
        self.folder = folder
        self.entries = entries

    @property
    def files(self) -> List[str]:
        return sorted({f for f, _, _ in self.entries.values()})

    def nbytes(self, key: str, expert: Optional[int] = None) -> int:
        _, shape, dt = self.entries[key]
        n = _ITEM_BYTES.get(dt, 1)
        for s in shape[1:] if expert is not None else shape:
            n *= s
        return n

    def read(self, key: str, expert: Optional[int] = None) -> torch.Tensor:
        """The stored tensor ``key`` (``expert``: only that index of its first dimension), as stored."""
        from safetensors import safe_open

        path = os.path.join(self.folder, self.entries[key][0])
        with safe_open(path, framework="pt") as fh:
            if expert is None:
                return fh.get_tensor(key)
            return fh.get_slice(key)[expert]


def _shard_header(folder: str, name: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    from safetensors import safe_open

    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (the index {INDEX_FILE} names it)")
    try:
        with safe_open(path, framework="pt") as fh:
            out = {}
            end = 0
            for key in fh.keys():
                sl = fh.get_slice(key)
                shape = tuple(int(s) for s in sl.get_shape())
                dt = sl.get_dtype()
                out[key] = (shape, dt)
                n = _ITEM_BYTES.get(dt, 1)
                for s in shape:
                    n *= s
                end += n
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({first}); is it truncated?") from None
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
    if os.path.getsize(path) < 8 + header_len + end:
        raise CheckpointError(f"{path}: truncated ({os.path.getsize(path)} bytes, the header needs "
                              f"{8 + header_len + end})")
    return out


def open_checkpoint(folder: str) -> Checkpoint:
    """The validated safetensors checkpoint in ``folder`` (sharded with an index, or one file)."""
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as fh:
                weight_map = json.load(fh)["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError("empty weight_map")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{index_path}: not a safetensors index ({str(exc).splitlines()[0]})") from None
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not shards:
            raise CheckpointError(f"{folder}: no *.safetensors file and no {INDEX_FILE}")
        if len(shards) > 1:
            raise CheckpointError(f"{folder}: {len(shards)} safetensors files ({shards[0]}, ...) and no "
                                  f"{INDEX_FILE} to say which are the model's")
        weight_map = None
    entries: Dict[str, Tuple[str, Tuple[int, ...], str]] = {}
    for shard in shards:
        header = _shard_header(folder, shard)
        for key, (shape, dt) in header.items():
            if weight_map is None or weight_map.get(key) == shard:
                entries[key] = (shard, shape, dt)
    if weight_map is not None:
        lost = [k for k in weight_map if k not in entries]
        if lost:
            raise CheckpointError(f"{os.path.join(folder, weight_map[lost[0]])}: lacks {lost[0]} "
                                  f"({len(lost)} keys the index {INDEX_FILE} puts there are missing)")
    return Checkpoint(folder, entries)
