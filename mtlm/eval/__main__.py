"""`python -m mtlm.eval ARGS`: lm-evaluation-harness's command line with the `mtlm` model registered.

    python -m mtlm.eval --model mtlm --model_args checkpoint=DIR --tasks lambada_openai
    python -m mtlm.eval --model mtlm --model_args checkpoint=DIR --include_path my_tasks --tasks my_task
    python -m mtlm.eval install-hook      # make the plain `lm_eval` command know `--model mtlm` too

Failures are one line, as `python -m mtlm.evaluate`'s: a bad checkpoint or tokenizer (exit 2), and a task
whose data is neither in the local cache nor reachable. Standard tasks download their data from the Hugging
Face Hub on first use; when the Hub cannot be reached (or HF_HUB_OFFLINE is set) the run goes offline at once,
so a cached task still runs and an uncached one fails in seconds, not after the datasets library's retries.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from urllib.parse import urlparse

from mtlm.errors import ERROR_KINDS, error_kind
from mtlm.eval.loading import read_checkpoint
from mtlm.parallel.denormals import flush_denormals

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
PROBE_TIMEOUT_S = 3.0


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can a TCP connection to the Hub (HF_ENDPOINT, else huggingface.co) be opened within `timeout`? The name
    lookup has no timeout of its own, so the whole attempt runs in a thread that is given up on."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    ok: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def go_offline_unless_reachable() -> bool:
    """True when the run is offline: set by the user, or the Hub did not answer (then set here, before the
    Hugging Face libraries read it at import, with a note)."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS):
        return True
    if hub_reachable():
        return False
    for var in OFFLINE_VARS:
        os.environ[var] = "1"
    print("note: the Hugging Face Hub is not reachable: running offline (tasks whose data is in the local cache "
          "run; others stop at once)", file=sys.stderr, flush=True)
    return True


def _hub_error(err: BaseException) -> bool:
    """A failure to fetch task data: the datasets library's ConnectionError, or huggingface_hub's offline and
    not-in-cache errors (by module, as the classes move between versions)."""
    chain = [err, err.__cause__, err.__context__]
    return any(isinstance(e, ConnectionError) or type(e).__module__.startswith(("huggingface_hub", "requests"))
               for e in chain if e is not None)


def check_checkpoint(argv: list[str]) -> None:
    """`--model mtlm --model_args checkpoint=DIR,...`: DIR is a complete GPT checkpoint (CheckpointError)."""
    def value(flag: str) -> str | None:
        for i, arg in enumerate(argv):
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
        return None

    if value("--model") != "mtlm":
        return
    pairs = dict(kv.split("=", 1) for kv in (value("--model_args") or "").split(",") if "=" in kv)
    if "checkpoint" in pairs:
        read_checkpoint(pairs["checkpoint"])


def main(argv: list[str] | None = None) -> None:
    flush_denormals()  # before lm-eval or torch start a thread pool (mtlm/parallel/denormals.py)
    argv = sys.argv[1:] if argv is None else argv
    offline = False if argv[:1] == ["install-hook"] else go_offline_unless_reachable()
    try:
        # deferred: lm-eval is optional (the [eval] extra); importing it registers "mtlm" as an lm_eval model
        import mtlm.eval.harness as harness
    except ImportError as err:
        print(f"lm-eval is not installed ({err}); pip install -e \".[eval]\"", file=sys.stderr)
        sys.exit(2)
    if argv[:1] == ["install-hook"]:
        path = harness.install_hook(argv[1] if len(argv) > 1 else None)
        print(f"wrote {path}: the plain `lm_eval --model mtlm ...` now finds mtlm's model")
        return
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    try:
        check_checkpoint(argv)  # before lm-eval spends its ~20 s indexing every task
        cli_evaluate()
    except tuple(ERROR_KINDS) as err:  # a bad checkpoint or tokenizer: mtlm.evaluate's one line
        print(f"{error_kind(err)} error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        if not _hub_error(err):
            raise
        why = "offline" if offline else "the Hub did not answer"
        print(f"lm-eval error: a task's data could not be fetched ({why}: {str(err).splitlines()[0]}); standard "
              "tasks download their data from the Hugging Face Hub on first use: run once with network access, or "
              "run a local task file (--include_path DIR --tasks NAME, docs/evaluation.md)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
