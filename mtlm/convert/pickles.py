"""Reading Megatron-LM's legacy checkpoint files (pickles) without letting them run code.

A `.pt` file is a pickle: a free `torch.load` executes whatever callable the file names. We load with
`torch.load(weights_only=True)`, torch's restricted unpickler (tensors, dtypes, containers and primitives),
and add an explicit allow-list of the few other types Megatron's files hold:

- `argparse.Namespace`: the run's `args` (later releases; the GPT-2 345M release has none);
- numpy's array reconstruction (`ndarray`, `dtype`, scalars): the numpy RNG state Megatron saves next to the
  weights (`np_rng_state`, a tuple holding a uint32 array). These rebuild plain data, never call user code.

Anything else (a Megatron class, `os.system`, ...) stops the load at that opcode, before it is called, and
is reported as one line naming the file and the type.
"""

from __future__ import annotations

import argparse
import io
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlm.errors import CheckpointError


class UnsafeCheckpointError(CheckpointError):
    """The file asks the unpickler for a type outside the allow-list; nothing from it was run."""


def _numpy_globals() -> list[Any]:
    """numpy's pickle entry points under the names both numpy 1.x (numpy.core) and 2.x (numpy._core) write."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    out: list[Any] = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    # numpy >= 1.25 pickles a dtype as its class, e.g. numpy.dtypes.UInt32DType.
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n),
                                                                                              type)]
    return out


def allowed_globals() -> list[Any]:
    """The allow-list handed to torch's weights-only unpickler, on top of what it allows by itself."""
    return [argparse.Namespace, *_numpy_globals()]


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_WHY = re.compile(r"WeightsUnpickler error: \s*(\S[^\n]*)")


def safe_load(source: str | Path | bytes, name: str | None = None, extra: list[Any] | None = None) -> Any:
    """`torch.load` of a file path (or its bytes) that refuses any type outside the allow-list.

    Raises UnsafeCheckpointError naming `name` (default: the path) and the refused type, or CheckpointError
    when the file is not a torch checkpoint at all."""
    label = name or str(source)
    f = io.BytesIO(source) if isinstance(source, bytes) else source
    if not hasattr(torch.serialization, "safe_globals"):
        raise CheckpointError(f"{label}: reading Megatron-LM pickles safely needs torch >= 2.6 (weights-only "
                              f"allow-lists); this is torch {torch.__version__}")
    try:
        with torch.serialization.safe_globals(extra if extra is not None else allowed_globals()):
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _GLOBAL.search(str(err))
        if found:
            raise UnsafeCheckpointError(f"{label}: refused to load: it asks for {found.group(1)}, which is not a "
                                        f"tensor, container or allowed type (argparse.Namespace, numpy arrays); "
                                        f"nothing from the file was run") from None
        detail = _WHY.search(str(err))
        raise CheckpointError(f"{label}: not a readable torch checkpoint "
                              f"({detail.group(1) if detail else 'the weights-only unpickler failed'})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{label}: not a readable torch checkpoint ({msg})") from None


# Megatron-LM's `args` (in a torch_dist checkpoint's common.pt) hold a few megatron-core enum members, e.g.
# attention_backend=AttnBackend.auto. A member pickles as "call the class with its value"; here that call only
# makes the string "Class.value", so nothing of megatron is imported or run.
_MEGATRON_ENUMS = {"megatron.core.enums": ("ModelType", "Fp8Recipe", "Fp4Recipe"),
                   "megatron.core.transformer.enums": ("ModelType", "LayerType", "AttnType", "AttnMaskType",
                                                       "AttnBackend", "CudaGraphScope")}


def _enum_standin(name: str) -> Any:
    def member(value: Any) -> str:
        return f"{name}.{value}"
    return member


def common_globals() -> list[Any]:
    """safe_load's allow-list plus stand-ins for the megatron-core enums Megatron-LM's args hold."""
    return [*allowed_globals(), *((_enum_standin(n), f"{m}.{n}") for m, names in _MEGATRON_ENUMS.items()
                                  for n in names)]


def load_common(path: str | Path) -> Any:
    """A Megatron-Core checkpoint's common.pt (args, iteration, ...) through safe_load's allow-list."""
    return safe_load(path, extra=common_globals())


# What torch.distributed.checkpoint's `.metadata` pickle holds (torch's own FileSystemReader unpickles it with
# no restriction at all): its metadata and save-plan dataclasses, sizes, dtypes and layouts.
_DCP = "torch.distributed.checkpoint."
_DCP_ALLOWED = {
    _DCP + "metadata": {"Metadata", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata",
                        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    _DCP + "planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    _DCP + "filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath"},  # StorageMeta.checkpoint_id when the saver was given a Path
}


class _DcpUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_ALLOWED.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                     torch.dtype)):
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


class _Refused(Exception):
    pass


def load_dcp_metadata(path: str | Path) -> Any:
    """A torch.distributed.checkpoint `.metadata` file, refusing any type outside what such files hold."""
    try:
        with open(path, "rb") as f:
            return _DcpUnpickler(f).load()
    except _Refused as err:
        raise UnsafeCheckpointError(f"{path}: refused to load: it asks for {err}, which is not a "
                                    f"torch.distributed.checkpoint metadata type; nothing from the file was run"
                                    ) from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: not a readable torch.distributed.checkpoint .metadata ({err})") from None
