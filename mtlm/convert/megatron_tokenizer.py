"""The tokenizer across a Megatron-LM round trip: `to-megatron` copies the checkpoint's tokenizer files into
`<out>/tokenizer/` and names them in the saved args the way Megatron-LM's command line does
(`tokenizer_type` and `tokenizer_model` / `vocab_file` / `merge_file`), so `--load` finds them; `from-megatron`
reads them back from those args when no tokenizer option is given (issue 25: a sentencepiece model came back
with no tokenizer at all).

    mtlm type        Megatron-LM --tokenizer-type                       files named in args
    sentencepiece    SentencePieceTokenizer                             tokenizer_model (the .model)
    gpt2             GPT2BPETokenizer                                   vocab_file, merge_file
    wordpiece        BertWordPieceLowerCase / BertWordPieceCase         vocab_file
    tokenizer.json   HuggingFaceTokenizer                               tokenizer_model (its folder)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from mtlm.data.text_tokenizer import TextTokenizer, tokenizer_from_entry
from mtlm.errors import CheckpointError, DataError

FOLDER = "tokenizer"
# (mtlm tokenizer type, lowercase) -> Megatron-LM's --tokenizer-type.
MEGATRON_TOKENIZERS = {("gpt2", None): "GPT2BPETokenizer", ("wordpiece", True): "BertWordPieceLowerCase",
                       ("wordpiece", False): "BertWordPieceCase", ("sentencepiece", None): "SentencePieceTokenizer",
                       ("tokenizer.json", None): "HuggingFaceTokenizer"}


def export_tokenizer(entry: dict | None, out: Path, label: str) -> dict[str, Any]:
    """Copy the tokenizer a checkpoint records into out/tokenizer/; the args that name it (absolute paths,
    as Megatron-LM's own args hold them). {} without one; a note when its files are gone."""
    if not entry:
        return {}
    kind = entry.get("type") or "sentencepiece"
    megatron_type = MEGATRON_TOKENIZERS.get((kind, entry.get("lowercase") if kind == "wordpiece" else None))
    files = {"gpt2": {"vocab_file": entry.get("path"), "merge_file": entry.get("merge_file")},
             "wordpiece": {"vocab_file": entry.get("path")}}.get(kind, {"tokenizer_model": entry.get("path")})
    missing = [p for p in files.values() if not p or not Path(p).is_file()]
    if missing:
        print(f"note: {label}: the tokenizer it records ({missing[0]}) is gone, so none is written beside the "
              "export; name it with Megatron-LM's tokenizer flags when loading", file=sys.stderr)
        return {"tokenizer_type": megatron_type}
    folder = out / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    args: dict[str, Any] = {"tokenizer_type": megatron_type}
    for key, path in files.items():
        copy = folder / Path(path).name
        shutil.copyfile(path, copy)
        args[key] = str(copy.resolve())
    if kind == "tokenizer.json":  # Hugging Face's loader takes the folder (and its special_tokens_map.json)
        extra = Path(entry["path"]).parent / "special_tokens_map.json"
        if extra.is_file():
            shutil.copyfile(extra, folder / extra.name)
        args["tokenizer_model"] = str(folder.resolve())
    return args


def _find(named: str | None, src: Path) -> str | None:
    """The file args name, else the same name in a tokenizer/ folder beside the checkpoint (moved since)."""
    if not named:
        return None
    if Path(named).exists():
        return named
    for root in (src, *src.parents[:3]):
        candidate = root / FOLDER / Path(named).name
        if candidate.exists():
            return str(candidate)
    return None


def import_tokenizer(args: Any, src: str | Path, label: str) -> TextTokenizer | None:
    """The tokenizer a Megatron checkpoint's args name (None when they name none, or its files are not found:
    said on stderr)."""
    kind = getattr(args, "tokenizer_type", None) if args is not None else None
    mtlm = {v: k for k, v in MEGATRON_TOKENIZERS.items()}.get(kind)
    if mtlm is None:
        return None
    src = Path(src).resolve()
    wanted = {"gpt2": ("vocab_file", "merge_file"), "wordpiece": ("vocab_file",)}.get(mtlm[0], ("tokenizer_model",))
    found = {key: _find(getattr(args, key, None), src) for key in wanted}
    if any(v is None for v in found.values()):
        named = ", ".join(f"{k}={getattr(args, k, None)}" for k in wanted)
        print(f"note: {label}: args name a {kind} tokenizer ({named}) that is not here; give its files "
              "(--vocab-file / --merge-file / --tokenizer-file) to record it", file=sys.stderr)
        return None
    path = found.get("vocab_file") or found["tokenizer_model"]
    if mtlm[0] == "tokenizer.json" and Path(path).is_dir():
        path = str(Path(path) / "tokenizer.json")
    entry = {"type": mtlm[0], "path": path, "merge_file": found.get("merge_file"), "lowercase": mtlm[1]}
    try:
        return tokenizer_from_entry(entry)
    except DataError as err:
        raise CheckpointError(f"{label}: the tokenizer its args name: {err}") from None
