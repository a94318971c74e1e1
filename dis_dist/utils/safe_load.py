"""Reading checkpoint files as data, never as code.

Checkpoints live on shared filesystems and buckets that many people write to, and a pickle runs
whatever it names when it is loaded. Every file of a checkpoint is read here: torch files with
``weights_only=True`` (tensors, containers, numbers, strings, plus DeepSpeed's three plain-data
classes), DCP's metadata through an unpickler that builds only DCP's own metadata classes, and
DeepSpeed's loads (its engine's and zero_to_fp32's) through the same ``weights_only`` loader.
Anything else in a file is a :class:`CheckpointError` naming the file; its payload never runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from dis_dist.errors import CheckpointError

_torch_load = torch.load  # the real one, whatever ``torch_load_as_data`` does to torch.load

# Plain-data classes DeepSpeed pickles into its checkpoints (found by loading ZeRO-1/2/3
# checkpoints with weights_only=True): an enum, a dataclass, and the loss scaler's settings.
DEEPSPEED_DATA_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)

# What DCP's .metadata pickle may build.
_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


def _reason(e: BaseException) -> str:
    text = str(e)
    if "WeightsUnpickler error:" in text:  # torch's refusal: keep the line that names the global
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    line = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return line[:300]


def _deepspeed_classes() -> list[type]:
    """DeepSpeed's plain-data classes (importing DeepSpeed), or [] where it is not installed."""
    if importlib.util.find_spec("deepspeed") is None:
        return []
    classes = []
    for dotted in DEEPSPEED_DATA_CLASSES:
        module, _, name = dotted.rpartition(".")
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: its files are refused
            pass
    return classes


def load_torch(path: str | Path | io.BytesIO, map_location: Any = None, **kwargs: Any) -> Any:
    """``torch.load`` of tensors and containers only (and DeepSpeed's plain-data classes, for a
    file that names them). A file that holds anything else, or is not a torch file at all,
    raises CheckpointError naming it; nothing in it runs. A file is memory-mapped (unless the
    caller says otherwise): its tensors take no memory beyond the page cache until written, so a
    rank holding its training state can load a second copy of it (DeepSpeed's optimiser file
    of DiS-H/2 on 2 CPU ranks was 5.4 GB per rank, and a resuming rank was killed for it)."""
    if not isinstance(path, io.IOBase):
        kwargs.setdefault("mmap", True)
    allowed: list[type] = []
    while True:
        try:
            with torch.serialization.safe_globals(allowed):
                return _torch_load(path, map_location=map_location, weights_only=True, **kwargs)
        except Exception as e:  # anything a damaged or hostile file makes the unpickler raise
            if not allowed and "GLOBAL deepspeed." in str(e) and (allowed := _deepspeed_classes()):
                if isinstance(path, io.IOBase):
                    path.seek(0)
                continue
            name = "an in-memory item" if isinstance(path, io.IOBase) else str(path)
            raise CheckpointError(f"{name} cannot be loaded as plain tensors and containers: {_reason(e)}") from None


@contextmanager
def torch_load_as_data() -> Iterator[None]:
    """Within it, every ``torch.load`` (DeepSpeed's, which asks for ``weights_only=False``,
    included) is :func:`load_torch`."""

    def load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("weights_only", None)
        kwargs.pop("pickle_module", None)
        return load_torch(f, map_location, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = _torch_load


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _DCP_METADATA_CLASSES.get(module, set())
        if name in allowed or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's checkpoint metadata")


class DataOnlyReader(FileSystemReader):
    """DCP's file reader, with its metadata pickle limited to DCP's metadata classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except Exception as e:
            raise CheckpointError(f"{path} is not plain DCP metadata: {_reason(e)}") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} is not DCP metadata (it holds a {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class DataOnlyPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with non-tensor items (optimiser hyperparameters, steps) read
    by :func:`load_torch` instead of an unrestricted ``torch.load``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        loaded = load_torch(value)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
