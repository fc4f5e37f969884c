"""Tensor (intra-layer) model parallelism, §3 of the Megatron-LM paper: one small file per primitive."""

from mtlm.parallel.cross_entropy import vocab_parallel_cross_entropy
from mtlm.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, pad_vocab_size
from mtlm.parallel.mappings import copy_to_tensor_region, gather_last_dim, reduce_from_tensor_region
from mtlm.parallel.state import ParallelState

__all__ = [
    "ColumnParallelLinear", "ParallelState", "RowParallelLinear", "VocabParallelEmbedding",
    "copy_to_tensor_region", "gather_last_dim", "pad_vocab_size", "reduce_from_tensor_region",
    "vocab_parallel_cross_entropy",
]
