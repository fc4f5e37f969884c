"""`python -m mtlm.convert COMMAND ...`: one command line in front of every format's module.

    to-hf / from-hf        Hugging Face folders: GPT2LMHeadModel, MegatronBertForPreTraining, BloomForCausalLM
    from-megatron          Megatron-LM's legacy checkpoints (folders or NVIDIA's NGC zips), GPT-2 and BERT
    to-megatron            back to Megatron-LM (version 3.0 layout)
    from-mcore / to-mcore  Megatron-Core checkpoints (torch_dist: Megatron-LM and NeMo today), GPT
    from-nemo              NeMo's .nemo archives of Megatron-Core GPT models
    from-deepspeed         bigscience's Megatron-DeepSpeed BLOOM checkpoints

Every problem with the input is one line, `checkpoint error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mtlm.convert.deepspeed import from_deepspeed
from mtlm.convert.hf import from_hf, to_hf
from mtlm.convert.mcore import from_mcore, to_mcore
from mtlm.convert.megatron import from_megatron
from mtlm.convert.megatron_export import to_megatron
from mtlm.convert.nemo import from_nemo
from mtlm.data.gpt2_bpe import GPT2BPETokenizer
from mtlm.data.hf_tokenizers import JsonTokenizer, WordPieceTokenizer
from mtlm.errors import CheckpointError, DataError

# Megatron-LM's --tokenizer-type values, for the WordPiece case: does it lower-case?
WORDPIECE_TYPES = {"BertWordPieceLowerCase": True, "BertWordPieceCase": False}
TOKENIZER_TYPES = (*WORDPIECE_TYPES, "GPT2BPETokenizer")


def add_tokenizer_options(p: argparse.ArgumentParser) -> None:
    """The released tokenizer's files (Megatron-LM's own flag names): recorded in the checkpoint's metadata,
    and their vocabulary size checked against the checkpoint's embedding."""
    p.add_argument("--vocab-file", default=None, help="vocab.json (GPT-2 BPE, with --merge-file) or vocab.txt "
                                                      "(BERT WordPiece)")
    p.add_argument("--merge-file", default=None, help="merges.txt of the GPT-2 BPE")
    p.add_argument("--tokenizer-file", default=None, help="a tokenizer.json (BLOOM)")
    p.add_argument("--tokenizer-type", default=None, choices=TOKENIZER_TYPES,
                   help="WordPiece: lower-cased or not (default: inferred from vocab.txt, said on stderr)")


def open_tokenizer(args: argparse.Namespace) -> Any:
    """The tokenizer the options name, or None."""
    if args.tokenizer_file:
        return JsonTokenizer(args.tokenizer_file)
    if not args.vocab_file:
        if args.merge_file:
            raise DataError("--merge-file needs --vocab-file (the vocab.json of the same BPE)")
        return None
    if args.merge_file or args.tokenizer_type == "GPT2BPETokenizer":
        return _gpt2_bpe(args.vocab_file, args.merge_file)
    tok = WordPieceTokenizer(args.vocab_file, WORDPIECE_TYPES.get(args.tokenizer_type))
    if args.tokenizer_type is None:
        print(f"note: {args.vocab_file}: {'no' if tok.lowercase else 'upper-case'} letters in the vocabulary: "
              f"{'uncased (lower-casing)' if tok.lowercase else 'cased'} WordPiece; --tokenizer-type overrides",
              file=sys.stderr)
    return tok


def _gpt2_bpe(vocab_json: str, merges: str | None) -> Any:
    if not merges:
        raise DataError(f"--vocab-file {vocab_json}: a GPT-2 BPE needs --merge-file merges.txt too")

    return GPT2BPETokenizer(vocab_json, merges)


def _guard(fn):
    """Tokenizer-file problems (DataError) are reported like checkpoint problems: one line, exit status 2."""
    def run(args: argparse.Namespace) -> Path:
        try:
            return fn(args)
        except DataError as err:
            raise CheckpointError(str(err)) from None
    return run


@_guard
def _from_megatron(args: argparse.Namespace) -> Path:
    return from_megatron(args.src, args.out_dir, args.tensor, args.preset, args.num_attention_heads,
                         open_tokenizer(args))


@_guard
def _to_megatron(args: argparse.Namespace) -> Path:
    return to_megatron(args.checkpoint, args.out_dir, args.tensor)


@_guard
def _from_deepspeed(args: argparse.Namespace) -> Path:
    return from_deepspeed(args.src, args.out_dir, args.tensor, args.preset, args.num_attention_heads,
                          open_tokenizer(args))


@_guard
def _from_mcore(args: argparse.Namespace) -> Path:
    return from_mcore(args.src, args.out_dir, args.tensor, open_tokenizer(args))


@_guard
def _from_nemo(args: argparse.Namespace) -> Path:
    return from_nemo(args.src, args.out_dir, args.tensor, open_tokenizer(args))


def _to_mcore(args: argparse.Namespace) -> Path:
    return to_mcore(args.checkpoint, args.out_dir)


def _to_hf(args: argparse.Namespace) -> Path:
    return to_hf(args.checkpoint, args.out_dir)


@_guard
def _from_hf(args: argparse.Namespace) -> Path:
    return from_hf(args.hf_dir, args.out_dir, args.tensor, open_tokenizer(args))


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add every command; each sets `run` (args -> the folder written)."""
    p = sub.add_parser("to-hf", help="mtlm checkpoint -> transformers folder (GPT-2, Megatron-BERT or BLOOM)")
    p.add_argument("checkpoint", help="a checkpoint folder (its latest) or one step_* folder")
    p.add_argument("out_dir")
    p.set_defaults(run=_to_hf)
    p = sub.add_parser("from-hf", help="transformers folder (GPT-2, Megatron-BERT or BLOOM) -> mtlm checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree to write the shards for")
    add_tokenizer_options(p)
    p.set_defaults(run=_from_hf)
    p = sub.add_parser("from-megatron", help="Megatron-LM legacy checkpoint (folder or NGC zip) -> mtlm checkpoint")
    p.add_argument("src", help="checkpoint folder (with latest_checkpointed_iteration.txt), release/ or iter_*/ "
                               "folder, one .pt file, or the released zip")
    p.add_argument("out_dir")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree to write the shards for")
    p.add_argument("--preset", default=None, help="conf/model preset for what a file without args lacks "
                                                  "(attention heads, sequence length), e.g. gpt2_345m")
    p.add_argument("--num-attention-heads", type=int, default=None,
                   help="attention heads, for files without args (they cannot be read off the tensors)")
    add_tokenizer_options(p)
    p.set_defaults(run=_from_megatron)
    p = sub.add_parser("to-megatron", help="mtlm checkpoint -> Megatron-LM checkpoint (version 3.0, release/)")
    p.add_argument("checkpoint", help="a checkpoint folder (its latest) or one step_* folder")
    p.add_argument("out_dir", help="a new or empty folder")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree (mp_rank_* files) to write")
    p.set_defaults(run=_to_megatron)
    p = sub.add_parser("from-deepspeed", help="Megatron-DeepSpeed BLOOM checkpoint (global_step*/layer_*) -> mtlm")
    p.add_argument("src", help="checkpoint folder (with `latest`) or one global_step* folder")
    p.add_argument("out_dir")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree to write the shards for")
    p.add_argument("--preset", default=None, help="conf/model preset giving the attention heads, e.g. bloom_560m")
    p.add_argument("--num-attention-heads", type=int, default=None, help="attention heads (not in the files)")
    add_tokenizer_options(p)
    p.set_defaults(run=_from_deepspeed)
    p = sub.add_parser("from-mcore", help="Megatron-Core checkpoint (torch_dist: Megatron-LM, NeMo), GPT -> mtlm")
    p.add_argument("src", help="a Megatron-LM checkpoint folder (with latest_checkpointed_iteration.txt) or one "
                               "iter_*/ folder holding metadata.json, common.pt and .distcp files")
    p.add_argument("out_dir")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree to write the shards for")
    add_tokenizer_options(p)
    p.set_defaults(run=_from_mcore)
    p = sub.add_parser("from-nemo", help="NeMo .nemo archive of a Megatron-Core GPT (torch_dist weights) -> mtlm")
    p.add_argument("src", help="the .nemo file (a tar holding model_config.yaml and model_weights/)")
    p.add_argument("out_dir")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree to write the shards for")
    add_tokenizer_options(p)
    p.set_defaults(run=_from_nemo)
    p = sub.add_parser("to-mcore", help="mtlm GPT checkpoint -> Megatron-Core checkpoint (torch_dist, release/)")
    p.add_argument("checkpoint", help="a checkpoint folder (its latest) or one step_* folder")
    p.add_argument("out_dir", help="a new or empty folder")
    p.set_defaults(run=_to_mcore)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtlm.convert", description=__doc__.split("\n\n")[0])
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        print(f"wrote {args.run(args)}")
    except CheckpointError as err:
        print(f"checkpoint error: {err}", file=sys.stderr)
        return 2
    return 0
