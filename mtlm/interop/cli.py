"""The foreign-format commands of `python -m mtlm.convert` (mtlm/convert.py adds them to its parser)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _from_megatron(args: argparse.Namespace) -> Path:
    from mtlm.interop.megatron import from_megatron

    return from_megatron(args.src, args.out_dir, args.tensor, args.preset, args.num_attention_heads)


def _to_megatron(args: argparse.Namespace) -> Path:
    from mtlm.interop.megatron import to_megatron

    return to_megatron(args.checkpoint, args.out_dir, args.tensor)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add from-megatron / to-megatron; each sets `run` (args -> the folder written)."""
    p = sub.add_parser("from-megatron", help="Megatron-LM legacy checkpoint (folder or NGC zip) -> mtlm checkpoint")
    p.add_argument("src", help="checkpoint folder (with latest_checkpointed_iteration.txt), release/ or iter_*/ "
                               "folder, one .pt file, or the released zip")
    p.add_argument("out_dir")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree to write the shards for")
    p.add_argument("--preset", default=None, help="conf/model preset for what a file without args lacks "
                                                  "(attention heads, sequence length), e.g. gpt2_345m")
    p.add_argument("--num-attention-heads", type=int, default=None,
                   help="attention heads, for files without args (they cannot be read off the tensors)")
    p.set_defaults(run=_from_megatron)
    p = sub.add_parser("to-megatron", help="mtlm checkpoint -> Megatron-LM checkpoint (version 3.0, release/)")
    p.add_argument("checkpoint", help="a checkpoint folder (its latest) or one step_* folder")
    p.add_argument("out_dir", help="a new or empty folder")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree (mp_rank_* files) to write")
    p.set_defaults(run=_to_megatron)
