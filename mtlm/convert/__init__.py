"""Checkpoints of other trainers <-> mtlm checkpoints, one module per foreign format:

    hf.py                          Hugging Face transformers folders: the table of their adapters (FORMATS)
    hf_gpt2.py, hf_bert.py, bloom.py   its adapters: GPT-2, Megatron-BERT, BLOOM, both ways
    mcore.py (+ _names, _torch), nemo.py   Megatron-Core torch_dist / per-rank files and NeMo archives
    megatron.py (+ _files, _export)  Megatron-LM's legacy layout (NVIDIA's 345M releases), both ways
    deepspeed.py                   Megatron-DeepSpeed's per-layer files (bigscience's BLOOM runs), import
    pickles.py                     loading those pickles without running code (weights-only + an allow-list)
    writer.py                      whole tensors -> an mtlm checkpoint at any tensor degree (every importer)
    common.py                      what every adapter shares: model section from ModelConfig's defaults, qkv
                                   reorder, tensor-rank join, vocabulary pad/cut, Hugging Face folder writer
    cli.py                         `python -m mtlm.convert COMMAND ...` in front of them all
"""

from mtlm.convert.cli import main
from mtlm.convert.hf import from_hf, to_hf

__all__ = ["from_hf", "main", "to_hf"]
