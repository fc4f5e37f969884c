"""megatron-core on a CPU, for tests only: stand-ins for its CUDA-only helpers, a one-rank (or gloo) model
parallel world, and a GPTModel of the local (non-Transformer-Engine) layer spec.

megatron-core assumes CUDA in a few helpers that the CPU forward and save/load reach; each stand-in below does
what the helper does, on the CPU:
- `get_default_causal_mask` builds its mask with device="cuda";
- the CUDA RNG tracker's `fork` (attention dropout's RNG stream; dropout is 0 here) needs CUDA RNG state;
- the global memory buffer allocates the attention-score buffer on `torch.cuda.current_device()`;
- `torch.cuda.synchronize` after the save's (no-op) device-to-host copy, and `torch.cuda.current_device`
  for the device of the save's all-reduce of write failures;
- the torch_dist writer's fork-per-file worker processes and spawned results manager (a worker that fails
  hangs the save): the same per-bucket writer runs in this process instead; its memory log needs psutil.
Nothing here is imported by mtlm.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

mcore = pytest.importorskip("megatron.core", reason="megatron-core (test dependency) is not installed")

from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.dist_checkpointing.strategies import filesystem_async  # noqa: E402
from megatron.core.fusions import fused_softmax  # noqa: E402

MCORE_VERSION = mcore.__version__


class _NoCudaRng:
    def fork(self, *args, **kwargs):
        return contextlib.nullcontext()


class _CpuBuffer:
    def get_tensor(self, shape, dtype, name, mem_alloc_context=None):
        return torch.empty(shape, dtype=dtype)


def _write_in_process(transform_list, use_msc, rank, write_buckets, global_results_queue) -> None:
    writer = filesystem_async.FileSystemWriterAsync
    results, count, out = queue.Queue(), queue.Queue(), {}
    for i, bucket in enumerate(write_buckets):
        count.put(i)
        writer.write_preloaded_data(transform_list, i, bucket, results, count, True)
        idx, written = results.get()
        if isinstance(written, Exception):
            raise written
        out[idx] = written
    global_results_queue.put(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mcore_world(monkeypatch: pytest.MonkeyPatch, tensor: int = 1, pipeline: int = 1):
    """megatron-core's parallel state over gloo (one rank unless run under the tests' multi-process helper,
    tests/distributed.py, whose process group it then joins)."""
    warnings.filterwarnings("ignore", message=".*Apex.*")
    monkeypatch.setattr(fused_softmax, "get_default_causal_mask",
                        lambda sq: torch.triu(torch.ones(sq, sq), diagonal=1).bool())
    monkeypatch.setattr(tensor_parallel.random, "get_cuda_rng_tracker", lambda *a, **k: _NoCudaRng())
    monkeypatch.setattr(tensor_parallel, "get_cuda_rng_tracker", lambda *a, **k: _NoCudaRng())
    monkeypatch.setattr(parallel_state, "get_global_memory_buffer", lambda: _CpuBuffer())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # the save's all-reduce of failures
    monkeypatch.setattr(filesystem_async, "_get_write_results_queue", queue.Queue)
    monkeypatch.setattr(filesystem_async, "_process_memory", lambda: 0)  # a debug log's figure; needs psutil
    monkeypatch.setattr(filesystem_async.FileSystemWriterAsync, "write_preloaded_data_multiproc",
                        staticmethod(_write_in_process))
    owned = not dist.is_initialized()
    if owned:
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # undone with the other stand-ins
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor, pipeline)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if owned:
            dist.destroy_process_group()


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def mcore_gpt(layers: int, hidden: int, heads: int, vocab: int, positions: int, eps: float = 1e-5,
              activation: str = "gelu_tanh", tied: bool = True, tensor: int = 1, pipeline: int = 1):
    """megatron-core's GPTModel, local layer spec, learned absolute positions, dropout 0, fp32.

    Megatron-LM's GPT-2 GeLU is the tanh approximation (its fused bias-GeLU); exact GeLU is F.gelu."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, layernorm_epsilon=eps,
        activation_func=gelu_tanh if activation == "gelu_tanh" else F.gelu, bias_activation_fusion=False,
        masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
        pipeline_dtype=torch.float32)
    return GPTModel(config, get_gpt_layer_local_spec(), vocab_size=vocab, max_sequence_length=positions,
                    position_embedding_type="learned_absolute", share_embeddings_and_output_weights=tied,
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage()).eval()


def mcore_bert(layers: int, hidden: int, heads: int, vocab: int, positions: int, activation: str = "gelu",
               binary_head: bool = True):
    """megatron-core's BertModel, local layer spec (pre-LN), 2 token types, tied output layer, dropout 0."""
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.models.bert.bert_model import BertModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, layernorm_epsilon=1e-5,
        activation_func=gelu_tanh if activation == "gelu_tanh" else F.gelu, bias_activation_fusion=False,
        masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False)
    return BertModel(config, 2, bert_layer_local_spec, vocab_size=vocab, max_sequence_length=positions,
                     add_binary_head=binary_head, share_embeddings_and_output_weights=True).eval()
