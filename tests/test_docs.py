"""README is the front door, docs/ the house (issue 25): the site builds with --strict, README's links lead
somewhere, and every example names the checkpoint folder the quick start really makes."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from markdown.extensions.toc import slugify

from mtlm.config import register_configs
from mtlm.errors import ConfigError
from tests.compose import compose_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def _slug(heading: str) -> str:
    """A heading's anchor as MkDocs makes it (Python-Markdown's toc slugify), after dropping inline markup."""
    return slugify(re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading), "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def test_readme_is_a_front_door_whose_links_all_lead_somewhere() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200, "README is the front door: move detail into a docs/ page"
    targets = LINK.findall(FENCE.sub("", text))
    local = [t for t in targets if not re.match(r"[a-z]+:", t)]
    assert len(local) >= 10, local  # one link per docs page at least
    for target in local:
        path, _, anchor = target.partition("#")
        page = (ROOT / path) if path else README
        assert page.exists(), f"README links to {target}, which does not exist"
        if anchor:
            assert page.suffix == ".md" and anchor in _anchors(page), f"README links to {target}: no such heading"
    assert "docs/index.md" in local, "README leads into the docs site"


def test_docs_site_builds_strict(tmp_path: Path) -> None:
    """mkdocs build --strict: a broken link or anchor, a page missing from the nav or a missing picture fails.
    Offline: mkdocs.yml turns off Material's web fonts, and no plugin fetches anything."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    site = tmp_path / "site"
    for page in _pages():
        out = site / ("index.html" if page.stem == "index" else f"{page.stem}/index.html")
        assert out.is_file(), f"{page.name} was not built"
    pictures = {p.name for p in (DOCS / "img").glob("*.png")}
    assert pictures and pictures == {p.name for p in (site / "img").glob("*.png")}
    scaling = (site / "scaling" / "index.html").read_text(encoding="utf-8")
    assert all(f"img/{name}" in scaling for name in pictures), "the scaling plots appear on the scaling page"
    assert "fonts.googleapis.com" not in (site / "index.html").read_text(encoding="utf-8")


def test_examples_name_the_checkpoint_the_quick_start_makes() -> None:
    """Issue 25's papercut: README's evaluate / generate / lm-eval examples named checkpoints/gpt2_tiny-07501b,
    which no quick start makes (copy-paste failed). The folder is derived from the code: the quick start is
    `train.py` with no overrides, so it saves into the default config's checkpoint.dir."""
    readme = README.read_text(encoding="utf-8")
    assert re.search(r"^python3 -m venv .*&& \.venv/bin/python train\.py$", readme, re.M), \
        "the quick start trains the default config (no overrides); update this test if it changes"
    made = compose_config().checkpoint.dir
    assert re.fullmatch(r"checkpoints/gpt2_tiny-[0-9a-f]{6}", made), made
    named: dict[str, set[str]] = {}
    for page in [README, *_pages()]:
        for name in re.findall(r"checkpoints/gpt2_tiny-[0-9a-f]+", page.read_text(encoding="utf-8")):
            named.setdefault(name, set()).add(page.name)
    assert set(named) == {made}, f"examples must name {made}, the quick start's folder: {named}"
    evaluation = (DOCS / "evaluation.md").read_text(encoding="utf-8")
    for command in ("python -m mtlm.evaluate", "python -m mtlm.generate", "python -m mtlm.eval --model mtlm"):
        assert re.search(re.escape(command) + r" .*" + re.escape(made), evaluation), command


def _train_commands() -> list[tuple[str, list[str]]]:
    """Every `python train.py ...` on README and the docs pages: the lines of ```bash blocks (continuations
    joined, comments dropped) and inline `code`. Commands with shell variables or placeholders are left out."""
    found = []
    for page in [README, *_pages()]:
        text = page.read_text(encoding="utf-8")
        lines = [ln for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
                 for ln in re.sub(r"\\\n\s*", " ", block).splitlines()]
        lines += re.findall(r"`(python train\.py[^`]*)`", text)
        for line in lines:
            command = re.split(r"\s+#\s", line.strip())[0]
            if command.startswith("python train.py") and not re.search(r"[$<\[]\S*\.\.\.|\$|<\w+>|\.\.\.", command):
                found.append((page.name, shlex.split(command)[2:]))
    return found


def _grid(args: list[str]) -> list[list[str]]:
    """The jobs of a `-m` command: every combination of the comma-separated values (a list in [] is one value)."""
    choices = [[a] if a.startswith("-") or "=" not in a or "[" in a else
               [f"{a.split('=', 1)[0]}={v}" for v in a.split("=", 1)[1].split(",")] for a in args]
    return [list(job) for job in itertools.product(*choices)]


def test_documented_train_commands_compose_and_validate() -> None:
    """Each train.py command on the pages composes (Hydra rejects a key outside the schema or a wrong type) and
    passes every semantic check, as a user copying it would find (the user's own files aside). Hydra's own keys
    are left to Hydra (the SLURM commands: tests/test_report.py)."""
    commands = _train_commands()
    assert len(commands) >= 25 and {page for page, _ in commands} >= {"README.md", "configuration.md", "data.md",
                                                                      "training.md", "bert.md", "scaling.md"}
    jobs = {}  # overrides -> the first command that has them (pages repeat commands)
    for page, args in commands:
        for job in _grid([a for a in args if a not in ("-m", "--cfg", "job")]):
            overrides = tuple(a for a in job if not a.startswith(("hydra.", "hydra/")))
            jobs.setdefault(overrides, (page, args))
    jobs = [(page, args, list(overrides)) for overrides, (page, args) in jobs.items()]
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf"), job_name="docs"):
        for _, _, overrides in jobs:
            compose(config_name="config", overrides=["logger=none", *overrides])  # unknown keys, types
    for page, args, overrides in jobs:
        # A user's own files (a corpus, tokenizer files, a checkpoint) do not exist here: run the checks with and
        # without them; either run may stop only at one of those keys, because its file is missing or needed.
        files = {a.split("=", 1)[0].lstrip("+") for a in overrides if "/" in a.split("=", 1)[-1]}
        for subset in (overrides, [a for a in overrides if a.split("=", 1)[0].lstrip("+") not in files]):
            try:
                compose_config(*subset)
            except ConfigError as err:
                assert err.key in files, f"{page}: python train.py {' '.join(args)}: {err}"


def _ignored_folders() -> set[str]:
    lines = (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    return {ln.strip().strip("/") for ln in lines if ln.strip().endswith("/") and ln.strip().count("/") <= 2}


def test_every_folder_the_documented_commands_write_is_git_ignored() -> None:
    """Issue 25's papercut: to-megatron's `megatron/` (docs/converting.md) was not in .gitignore while hf/,
    checkpoints/ and outputs/ were. The folders: each convert command's output, each checkpoint.dir and sweep dir
    the pages name, Hydra's outputs/ and multirun/, and the built site."""
    written = {"outputs", "multirun", "checkpoints", "site"}
    for page in [README, *_pages()]:
        text = page.read_text(encoding="utf-8")
        written |= {m.split("/")[0] for m in re.findall(r"python -m mtlm\.convert \S+ \S+ ([\w.-]+/\S+)", text)}
        written |= {m.split("/")[0] for m in re.findall(r"(?:checkpoint\.dir|hydra\.sweep\.dir)=([\w-]+/\S+)", text)}
    assert {"megatron", "hf", "checkpoints"} <= written, written
    assert written <= _ignored_folders(), f"not in .gitignore: {sorted(written - _ignored_folders())}"
