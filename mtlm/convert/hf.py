"""Hugging Face transformers folders <-> mtlm checkpoints, one adapter per architecture, picked from FORMATS:

    gpt2           GPT2LMHeadModel               mtlm's GPT, learned positions     mtlm/convert/hf_gpt2.py
    megatron-bert  MegatronBertForPreTraining    mtlm's BERT                       mtlm/convert/hf_bert.py
    bloom          BloomForCausalLM              mtlm's GPT with ALiBi (BLOOM)     mtlm/convert/bloom.py

    python -m mtlm.convert to-hf checkpoints/gpt2_tiny hf/gpt2_tiny          # config.json + model.safetensors
    python -m mtlm.convert from-hf hf/gpt2 checkpoints/gpt2_hf --tensor 2 --vocab-file hf/gpt2/vocab.json \
        --merge-file hf/gpt2/merges.txt                                      # an mtlm checkpoint at degree 2

Each adapter says which config.json it reads and which mtlm model section it writes, and converts its names
and layouts both ways over the shared pieces (mtlm/convert/common.py). Tokenizer files given to from-hf are
checked against the vocabulary and recorded in the checkpoint, so the tools use them. Nothing is unpickled:
HF weights are read from safetensors only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtlm.checkpoint.format import CheckpointError, find_checkpoint, read_metadata
from mtlm.convert import bloom, hf_bert, hf_gpt2


@dataclass(frozen=True)
class HFFormat:
    """One transformers architecture: which folders and checkpoints are its, and the two conversions."""
    model_type: str
    reads: Callable[[dict], bool]  # a config.json is this architecture's
    writes: Callable[[dict], bool]  # an mtlm model section converts to it
    from_hf: Callable[[Path, dict, str | Path, int, Any], Path]  # (hf_dir, config, out_dir, tensor, tokenizer)
    to_hf: Callable[[str | Path, str | Path], Path]  # (checkpoint, out_dir)


FORMATS = (
    HFFormat("bloom", bloom.is_bloom, bloom.is_bloom_model, bloom.from_hf_bloom, bloom.to_hf_bloom),
    HFFormat("megatron-bert", hf_bert.reads, hf_bert.writes, hf_bert.from_hf, hf_bert.to_hf),
    HFFormat("gpt2", hf_gpt2.reads, hf_gpt2.writes, hf_gpt2.from_hf, hf_gpt2.to_hf),
)


def to_hf(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write a transformers folder (config.json, model.safetensors) from an mtlm checkpoint: GPT2LMHeadModel,
    MegatronBertForPreTraining or BloomForCausalLM, as its model section says."""
    model = read_metadata(find_checkpoint(checkpoint))["model"]
    fmt = next((f for f in FORMATS if f.writes(model)), None)
    if fmt is None:
        raise CheckpointError(f"{checkpoint}: model {model.get('_target_')} has no transformers equivalent here")
    return fmt.to_hf(checkpoint, out_dir)


def _config(hf_dir: Path) -> dict:
    config_path = hf_dir / "config.json"
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_path}: cannot read a Hugging Face config ({err})") from None


def from_hf(hf_dir: str | Path, out_dir: str | Path, tensor: int = 1, tokenizer: Any = None) -> Path:
    """Import a GPT2LMHeadModel (or MegatronBertForPreTraining, BloomForCausalLM) folder as an mtlm checkpoint
    folder (latest -> step_00000000) at `tensor`. `tokenizer`: checked against the vocabulary and recorded."""
    hf_dir = Path(hf_dir)
    config = _config(hf_dir)
    fmt = next((f for f in FORMATS if f.reads(config)), None)
    if fmt is None:
        names = ", ".join(f.model_type for f in FORMATS)
        raise CheckpointError(f"{hf_dir / 'config.json'}: model_type is {config.get('model_type')!r}, only "
                              f"{names} convert")
    return fmt.from_hf(hf_dir, config, out_dir, tensor, tokenizer)
