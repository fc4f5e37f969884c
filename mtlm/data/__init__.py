"""Data for mtlm: corpus -> tokenizer -> token files -> seeded fixed-length samples.

prepare_data() does the slow disk work once (in the launcher); build_data() is cheap and runs on every rank.
The names below load lazily, so the preprocessing workers (mtlm/data/preprocess.py) import no torch.
"""

from importlib import import_module

from mtlm.errors import DataError as DataError  # re-exported: `from mtlm.data import DataError`

_WHERE = {
    "DataBundle": "mtlm.data.build",
    "build_data": "mtlm.data.build",
    "prepare_data": "mtlm.data.build",
    "validate_data_config": "mtlm.data.build",
    "TokenDataset": "mtlm.data.dataset",
    "Tokenizer": "mtlm.data.tokenizer",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'mtlm.data' has no attribute {name!r}")


__all__ = sorted([*_WHERE, "DataError"])
