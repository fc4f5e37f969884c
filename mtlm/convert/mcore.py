"""Megatron-Core checkpoints (Megatron-LM / NeMo today, `--ckpt-format torch_dist`) <-> mtlm, GPT models.

    python -m mtlm.convert from-mcore CKPT_DIR checkpoints/mine [--tensor N] [--vocab-file ... --merge-file ...]
    python -m mtlm.convert to-mcore checkpoints/mine megatron/mine

A torch_dist checkpoint is a torch.distributed.checkpoint folder (`.metadata`, `__R_I.distcp` files) with
Megatron's `metadata.json` ({"sharded_backend": "torch_dist", ...}) and `common.pt` (args, iteration); a
Megatron-LM run folder holds `latest_checkpointed_iteration.txt` and `iter_NNNNNNN/` folders. Its tensors are
stored whole (global shapes), whatever tensor and pipeline degrees saved them: torch.distributed.checkpoint
joins the shards, and the layers are one stacked tensor per parameter (mtlm/convert/mcore_names.py).
This is the adapter shape every format follows: the name map both ways (mcore_names.LOCAL / TE, a
common.NameMap), the tensor transforms both ways (stack/unstack the layers here, join per-rank files in
mcore_torch.py with common.join_ranks, pad/cut the vocabulary with common.pad_vocab / cut_vocab), and the model
section from the args through the shared builder (megatron.model_section -> common.model_section).
The pickles (`.metadata`, `common.pt`) are read through allow-lists (mtlm/convert/pickles.py); tensors are
read with torch's weights-only loader, and nothing else (optimizer state, RNG objects) is read at all.
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from mtlm.checkpoint.format import CheckpointError
from mtlm.config import BERT_TARGET, GPT_TARGET
from mtlm.convert.common import pad_vocab
from mtlm.convert.mcore_names import GLOBAL, LAYER, OUTPUT_LAYER, mtlm_name
from mtlm.convert.mcore_torch import is_torch_format, read_mcore_torch
from mtlm.convert.megatron import _check_args, cut_to_real_vocab
from mtlm.convert.megatron import model_section as megatron_model_section
from mtlm.convert.megatron_export import megatron_args
from mtlm.convert.megatron_files import TRACKER
from mtlm.convert.megatron_tokenizer import export_tokenizer, import_tokenizer
from mtlm.convert.pickles import load_common, load_dcp_metadata
from mtlm.convert.writer import read_checkpoint, write_checkpoint
from mtlm.parallel.layers import pad_vocab_size

CONFIG = "metadata.json"
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
           "common_backend_version": 1}
_STACKED, _BERT_STACKED = "decoder.layers.", "encoder.layers."


class _SafeReader(FileSystemReader):
    """torch's folder reader, its `.metadata` pickle read through the allow-list instead of pickle.load."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        return load_dcp_metadata(Path(self.path) / ".metadata")


@contextlib.contextmanager
def _one_process() -> Iterator[None]:
    """torch.distributed.checkpoint in this one process: without its warning that no process group is set up."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def checkpoint_dir(src: str | Path) -> Path:
    """The checkpoint folder SRC names: itself, or the iteration its run folder's tracker names; torch_dist, or
    per-rank `torch` files with megatron-core names (mtlm/convert/mcore_torch.py)."""
    src = Path(src)
    if (src / TRACKER).is_file():
        tracker = (src / TRACKER).read_text(encoding="utf-8").strip()
        src = src / ("release" if tracker == "release" else f"iter_{int(tracker):07d}") \
            if tracker == "release" or tracker.isdigit() else src
    if not (src / CONFIG).is_file():
        if is_torch_format(src):
            return src
        raise CheckpointError(f"{src}: no {CONFIG} and no mp_rank_* folders: not a Megatron-Core checkpoint folder")
    backend = json.loads((src / CONFIG).read_text(encoding="utf-8")).get("sharded_backend")
    if backend != "torch_dist":
        raise CheckpointError(f"{src / CONFIG}: sharded_backend {backend!r}; mtlm reads 'torch_dist' (Megatron-LM "
                              "--ckpt-format torch_dist, its default)")
    return src


def read_mcore(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(model tensors by megatron-core key, whole and unstacked per layer, common.pt's dict)."""
    common = load_common(folder / "common.pt") if (folder / "common.pt").is_file() else {}
    metadata = load_dcp_metadata(folder / ".metadata")
    wanted = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.state_dict_metadata.items()
              if isinstance(m, TensorStorageMetadata) and k.removeprefix("model.").split(".")[0] in
              ("embedding", "decoder", "output_layer", "encoder", "lm_head", "pooler", "binary_head")}
    if not wanted:
        raise CheckpointError(f"{folder}: no embedding.* / decoder.* tensors: not a Megatron-Core GPT checkpoint "
                              "(mtlm imports GPT models from Megatron-Core checkpoints)")
    with _one_process():
        dcp.load(wanted, storage_reader=_SafeReader(folder), no_dist=True)
    out: dict[str, torch.Tensor] = {}
    for key, value in wanted.items():
        key = key.removeprefix("model.")
        stack = next((p for p in (_STACKED, _BERT_STACKED) if key.startswith(p)), None)
        if stack and not key[len(stack)].isdigit():  # stacked: [layers, ...]
            for i, layer in enumerate(value.unbind(0)):
                out[f"{stack}{i}.{key[len(stack):]}"] = layer.clone()
        else:
            out[key] = value
    return out, common if isinstance(common, dict) else {}


def _to_mtlm(tensors: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    full, unknown = {}, []
    output = tensors.pop(OUTPUT_LAYER, None)
    for key, value in tensors.items():
        name = mtlm_name(key)
        if name is None:
            unknown.append(key)
        else:  # Megatron keeps the model's own bf16/fp16 copy; mtlm's checkpoints hold fp32 (exact upcast)
            full[name] = value.float() if value.is_floating_point() else value
    if unknown:
        raise CheckpointError(f"{label}: {unknown[0]} (and {len(unknown) - 1} more) has no place in mtlm's GPT "
                              "(pre-LN, learned positions, GeLU MLP, biases)")
    if output is not None and not torch.equal(output, full.get("wte.weight", output)):
        raise CheckpointError(f"{label}: an untied output layer (--untie-embeddings-and-output-weights): mtlm's "
                              "GPT ties its output layer to the word embeddings")
    return full


def _bert_parts(full: dict[str, torch.Tensor], model: dict, args: Any, label: str) -> None:
    """A megatron-core BertModel: its LM head's GeLU is always the exact one, mtlm's BERT uses the blocks' GeLU
    there too, so only exact-GeLU blocks (--no-bias-gelu-fusion) are the same model. Without a binary head
    mtlm's starts at zero, as from-megatron does."""
    if model["activation"] != "gelu":
        raise CheckpointError(f"{label}: a BERT with the tanh GeLU in its layers (args.bias_gelu_fusion or "
                              "openai_gelu) and megatron-core's exact GeLU in its LM head: mtlm's BERT uses one "
                              "GeLU for both, so it would not give this model's outputs")
    if "sop_head.weight" not in full:  # megatron-core builds the pooler only for the binary head
        print(f"note: {label}: no binary head (trained without sentence-order prediction); mtlm's pooler and "
              "binary head start at zero", file=sys.stderr)
        h = model["hidden_size"]
        full.update({"sop_head.weight": torch.zeros(2, h), "sop_head.bias": torch.zeros(2),
                     "pooler.weight": torch.zeros(h, h), "pooler.bias": torch.zeros(h)})


def from_mcore(src: str | Path, out_dir: str | Path, tensor: int = 1, tokenizer: Any = None,
               args: Any = None, origin: str | None = None) -> Path:
    """Import a Megatron-Core torch_dist GPT checkpoint (any saved tensor / pipeline degree) at `tensor`.

    `args`: the run's arguments when common.pt has none (a NeMo archive's model_config.yaml, mtlm/convert/nemo.py);
    `origin`: what to record as the source (default: the folder)."""
    folder = checkpoint_dir(src)
    label = origin or str(folder)
    tensors, common = read_mcore_torch(folder) if not (folder / CONFIG).is_file() else read_mcore(folder)
    args = common.get("args", args)
    if args is None:
        raise CheckpointError(f"{folder / 'common.pt'}: no args: the model's shape is unknown")
    _check_args(args, label)
    if tokenizer is None:  # none given: the one its args name (to-mcore writes it beside the files)
        tokenizer = import_tokenizer(args, folder, label)
    full = _to_mtlm(tensors, label)
    for needed in ("wte.weight", "wpe.weight", "ln_f.weight"):
        if needed not in full:
            raise CheckpointError(f"{label}: no {needed} tensor (mtlm needs learned positions and a final norm)")
    heads = getattr(args, "num_attention_heads", None)
    if heads is None:
        raise CheckpointError(f"{label}: common.pt has no args.num_attention_heads: the heads are unknown")
    # Shapes from the (whole) tensors, the rest from the args, as for Megatron-LM's legacy files.
    model = megatron_model_section(full, 1, args, {}, heads, Path(out_dir).name)
    if model["_target_"] == BERT_TARGET:
        _bert_parts(full, model, args, label)
    saved_tensor = getattr(args, "tensor_model_parallel_size", 1) or 1
    extra = cut_to_real_vocab(full, model, tokenizer, args, saved_tensor, label)
    source = {"megatron_core": origin or str(folder.resolve()), "iteration": common.get("iteration"),
              "tensor": saved_tensor, "pipeline": getattr(args, "pipeline_model_parallel_size", 1)}
    return write_checkpoint(out_dir, model, full, tensor, source, extra)


def _extra_state(keys: list[str], layers: int) -> dict[str, list]:
    """megatron-core's per-layer `_extra_state` objects (None without Transformer Engine / FP8), which its
    loader expects beside the weights, keyed `<name>/shard_<layer>_<layers>`; each is saved as megatron-core
    saves it, a list of that key's objects (torch.distributed.checkpoint torch.save's non-tensor values)."""
    return {f"{key}/shard_{i}_{layers}": [None] for key in keys for i in range(layers)}


def to_mcore(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write an mtlm GPT checkpoint as a Megatron-Core torch_dist checkpoint (`release`, tied output layer)."""
    meta, full = read_checkpoint(checkpoint)
    model = meta["model"]
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: not empty; to-mcore writes into a new or empty folder")
    if model.get("_target_", GPT_TARGET) != GPT_TARGET or model.get("layernorm_order", "pre") != "pre" or \
            model.get("position_embedding", "learned") != "learned" or model.get("embedding_layernorm"):
        raise CheckpointError(f"{checkpoint}: to-mcore writes pre-LN GPT models with learned positions")
    padded = pad_vocab_size(model["vocab_size"], model["make_vocab_size_divisible_by"], 1)
    pad_vocab(full, padded)
    layers = model["num_layers"]
    state: dict[str, Any] = {GLOBAL[n]: full[n] for n in GLOBAL}
    for ours, (_, dist_name) in LAYER.items():  # stacked over layers, TE names for the norms (as saved)
        state[_STACKED + dist_name] = torch.stack([full[f"blocks.{i}.{ours}"] for i in range(layers)])
    modules = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
    state.update(_extra_state([f"{_STACKED}{m}._extra_state" for m in modules], layers))
    folder = out / "release"
    folder.mkdir(parents=True)
    # Flat keys already: no planner_data (megatron-core's loader would unflatten its objects by it and miss them).
    with _one_process():
        dcp.save(state, storage_writer=FileSystemWriter(str(folder)), no_dist=True,
                 planner=DefaultSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False))
    args = megatron_args(model, 1, padded, meta.get("tokenizer"))
    vars(args).update(export_tokenizer(meta.get("tokenizer"), out, str(checkpoint)))  # files beside, named in args
    for key, value in {"position_embedding_type": "learned_absolute", "normalization": "LayerNorm",
                       "untie_embeddings_and_output_weights": False, "add_bias_linear": True, "swiglu": False,
                       "group_query_attention": False, "ckpt_format": "torch_dist"}.items():
        setattr(args, key, value)
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": meta["step"]}, folder / "common.pt")
    (folder / CONFIG).write_text(json.dumps(BACKEND), encoding="utf-8")
    (out / TRACKER).write_text("release\n", encoding="utf-8")
    return out

