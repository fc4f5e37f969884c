"""Data for mtlm: corpus -> sentencepiece tokenizer -> cached token files -> seeded fixed-length samples.

prepare_data() does the slow disk work once (in the launcher); build_data() is cheap and runs on every rank.
"""

from mtlm.data.build import DataBundle, build_data, prepare_data, validate_data_config
from mtlm.data.dataset import TokenDataset
from mtlm.data.errors import DataError
from mtlm.data.tokenizer import Tokenizer

__all__ = [
    "DataBundle",
    "DataError",
    "TokenDataset",
    "Tokenizer",
    "build_data",
    "prepare_data",
    "validate_data_config",
]
