"""Reading Hugging Face weight files lazily and writing safetensors one tensor at a time.

Why our own writer: ``safetensors.torch.save_file`` takes every tensor of a file at once (a
second copy of the model when the exported tensors are computed, as the folded queries are).
The format is small (an 8-byte header length, a JSON header of dtype / shape / byte offsets,
then the raw bytes), so the writer here puts out the header from the shapes alone and then each
tensor as it is made. Reading uses the ``safetensors`` library (memory-mapped, per tensor).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable

import torch

from megarch.convert.hf_t5 import ConvertError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.float64: "F64", torch.int64: "I64", torch.int32: "I32"}


class HFWeights:
    """The tensors of a ``save_pretrained`` directory by name, read one at a time."""

    def __init__(self, hf_dir: str):
        self.where = hf_dir
        self._files: dict[str, str] = {}  # tensor name -> file
        self._open: dict[str, object] = {}
        if os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
            self._add_safetensors(os.path.join(hf_dir, SINGLE_FILE))
        elif os.path.isfile(os.path.join(hf_dir, INDEX_FILE)):
            for file in sorted(set(self._index(os.path.join(hf_dir, INDEX_FILE)).values())):
                self._add_safetensors(os.path.join(hf_dir, file))
        elif os.path.isfile(os.path.join(hf_dir, BIN_FILE)):
            self._add_bin(os.path.join(hf_dir, BIN_FILE))
        elif os.path.isfile(os.path.join(hf_dir, BIN_INDEX_FILE)):
            for file in sorted(set(self._index(os.path.join(hf_dir, BIN_INDEX_FILE)).values())):
                self._add_bin(os.path.join(hf_dir, file))
        else:
            raise ConvertError(f"{hf_dir}: no weights file ({SINGLE_FILE}, {INDEX_FILE}, "
                               f"{BIN_FILE} or {BIN_INDEX_FILE}); pass the directory "
                               "save_pretrained wrote")

    @staticmethod
    def _index(path: str) -> dict[str, str]:
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise ConvertError(f"{path}: not a weights index ({err})") from None

    def _add_safetensors(self, path: str) -> None:
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise ConvertError(f"{path} not found (listed in the index): the download is "
                               "incomplete")
        try:
            handle = safe_open(path, framework="pt")
        except Exception as err:  # the library raises its own error types
            raise ConvertError(f"{path}: not a readable safetensors file ({err})") from None
        self._open[path] = handle
        for name in handle.keys():
            self._files[name] = path

    def _add_bin(self, path: str) -> None:
        if not os.path.isfile(path):
            raise ConvertError(f"{path} not found (listed in the index): the download is "
                               "incomplete")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # unpickling errors come in many types
            raise ConvertError(f"{path}: not a readable weights file ({err})") from None
        self._open[path] = state
        for name in state:
            self._files[name] = path

    def get(self, name: str) -> torch.Tensor | None:
        """The tensor ``name``, or None when no file has it."""
        path = self._files.get(name)
        if path is None:
            return None
        handle = self._open[path]
        return handle[name] if isinstance(handle, dict) else handle.get_tensor(name)


def _header(items: list[tuple[str, torch.Size, torch.dtype]]) -> tuple[bytes, list[int]]:
    header, offset, sizes = {}, 0, []
    for name, shape, dtype in items:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
        sizes.append(size)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text, sizes


def write_safetensors(path: str,
                      tensors: list[tuple[str, torch.Size, torch.dtype, Callable[[], torch.Tensor]]]
                      ) -> None:
    """Write one safetensors file from (name, shape, dtype, make) entries, calling each
    ``make`` only when its bytes are due (one computed tensor in memory at a time)."""
    head, sizes = _header([(n, s, d) for n, s, d, _ in tensors])
    with open(path, "wb") as f:
        f.write(head)
        for (name, shape, dtype, make), size in zip(tensors, sizes, strict=True):
            tensor = make().detach().to("cpu", dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: made {tuple(tensor.shape)}, announced {tuple(shape)}")
            data = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
            assert len(data) == size
            f.write(data)


def write_sharded(out_dir: str, entries: Iterable[tuple[str, torch.Size, torch.dtype,
                                                         Callable[[], torch.Tensor]]],
                  max_shard_bytes: int) -> list[str]:
    """Write ``model.safetensors``, or above ``max_shard_bytes`` shards
    ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``; return the
    files written."""
    shards: list[list] = [[]]
    size = 0
    total = 0
    for entry in entries:
        nbytes = torch.Size(entry[1]).numel() * torch.empty((), dtype=entry[2]).element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
        total += nbytes
    if len(shards) == 1:
        write_safetensors(os.path.join(out_dir, SINGLE_FILE), shards[0])
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        write_safetensors(os.path.join(out_dir, name), shard)
        weight_map.update({entry[0]: name for entry in shard})
    with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return [*names, INDEX_FILE]
