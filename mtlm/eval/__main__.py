"""`python -m mtlm.eval ARGS`: lm-evaluation-harness's command line with the `mtlm` model registered.

    python -m mtlm.eval --model mtlm --model_args checkpoint=DIR --tasks lambada_openai
    python -m mtlm.eval install-hook      # make the plain `lm_eval` command know `--model mtlm` too
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
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
    cli_evaluate()


if __name__ == "__main__":
    main()
