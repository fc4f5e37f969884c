"""GPT-2's byte-level BPE (Radford et al., 2019), the vocabulary of the paper's GPT-2 models, loaded from the
`vocab.json` + `merges.txt` pair that OpenAI released and NVIDIA ships with its Megatron GPT-2 checkpoints.

Through Hugging Face's `tokenizers` (Rust): text is split by GPT-2's pre-tokenization regex, each piece's UTF-8
bytes are mapped to printable symbols, and the merges are applied by rank. Every byte has a symbol, so any text
round-trips: decode(encode(text)) == text.

The end-of-document token `<|endoftext|>` (50256 in GPT-2's vocabulary) is appended by the data pipeline, never
produced by encode(): a literal "<|endoftext|>" in a document is ordinary text, split into byte-level pieces, as
Megatron-LM's own GPT-2 tokenizer does (Hugging Face's GPT2Tokenizer instead turns it into the special id).
"""

from __future__ import annotations

import json
from pathlib import Path

from mtlm.data.hf_tokenizers import _tokenizers, _Wrapped
from mtlm.errors import DataError

EOD = "<|endoftext|>"


def bytes_to_symbols() -> dict[int, str]:
    """GPT-2's byte -> symbol table: printable Latin-1 bytes stand for themselves, the other 68 (controls,
    space, ...) are moved to the code points from U+0100 up, so every token is a string of visible symbols."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    moved = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + moved)
            moved += 1
    return table


class GPT2BPETokenizer(_Wrapped):
    """GPT-2 byte-level BPE from `vocab.json` (token -> id) and `merges.txt` (one merge per line, by rank)."""

    kind = "gpt2"

    def __init__(self, vocab_file: str | Path, merge_file: str | Path) -> None:
        t = _tokenizers()
        vocab_path = str(Path(vocab_file).expanduser().resolve())
        merges_path = str(Path(merge_file).expanduser().resolve())
        try:
            vocab, merges = t.models.BPE.read_file(vocab_path, merges_path)
        except Exception as err:  # the Rust side raises plain Exceptions
            raise DataError(f"data.tokenizer: cannot read the GPT-2 BPE files {vocab_path} + {merges_path} "
                            f"({str(err).splitlines()[0]})") from None
        missing = [s for s in bytes_to_symbols().values() if s not in vocab]
        if missing:
            raise DataError(f"data.tokenizer.vocab_file: {vocab_path} lacks {len(missing)} of the 256 byte "
                            "symbols of a byte-level BPE: not a GPT-2 vocab.json")
        tok = t.Tokenizer(t.models.BPE(vocab, merges))
        # GPT-2 adds no space before the first word, and splits with its own regex (use_regex).
        tok.pre_tokenizer = t.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = t.decoders.ByteLevel()
        self.merge_file = merges_path
        super().__init__(vocab_path, tok, EOD)

    def files(self) -> list[str]:
        return [self.path, self.merge_file]

    def entry(self) -> dict:
        """This tokenizer as a checkpoint's metadata `tokenizer` entry (`path` is the vocab.json)."""
        return {**super().entry(), "merge_file": self.merge_file}

    def __getstate__(self) -> dict:  # pickle by path, so it can travel to worker processes
        return {"vocab_file": self.path, "merge_file": self.merge_file}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["vocab_file"], state["merge_file"])


def write_bpe_files(directory: str | Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> tuple[Path, Path]:
    """Write a vocab.json + merges.txt pair in GPT-2's layout (tests and examples build small ones)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    merges_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return vocab_path, merges_path
