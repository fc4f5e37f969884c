"""Train mtlm's lossless sentencepiece BPE on your text, for `python -m mtlm.data.preprocess`.

    python -m mtlm.data.train_tokenizer --input data/*.jsonl.gz --vocab-size 32000 --output data/tok.model

The same model train.py trains by itself on raw text (mtlm/data/tokenizer.py): byte fallback, no normalisation,
[CLS] [SEP] [MASK] reserved; corpora over 64 MB are sampled evenly.
"""

from __future__ import annotations

import argparse
import sys

from mtlm.data.corpus import BadDocuments, corpus_bytes, iter_documents
from mtlm.data.tokenizer import train_tokenizer
from mtlm.errors import DataError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtlm.data.train_tokenizer", description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help=".txt / .jsonl files (optionally .gz / .zst)")
    p.add_argument("--vocab-size", type=int, required=True, help="pieces, e.g. 32000")
    p.add_argument("--output", required=True, help="the .model file to write")
    p.add_argument("--json-key", default="text", help="the text field of each .jsonl line (default: text)")
    p.add_argument("--bad-documents", choices=("skip", "fail"), default="skip")
    args = p.parse_args(argv)
    bad = BadDocuments(args.bad_documents, "--bad-documents ")
    try:
        tok = train_tokenizer(iter_documents(args.input, args.json_key, bad), args.output, args.vocab_size,
                              corpus_bytes(args.input))
    except DataError as err:
        print(f"error: {str(err).replace('data.vocab_size', '--vocab-size').replace('data.paths', '--input')}",
              file=sys.stderr)
        return 2
    if bad.count:
        print(bad.report(), file=sys.stderr)
    print(f"wrote {tok.path}: {tok.vocab_size} pieces")
    return 0


if __name__ == "__main__":
    sys.exit(main())
