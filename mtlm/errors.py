"""The error types every entry point turns into one line and exit status 2 (the ground layer: imports nothing
of mtlm, so any module may raise them; docs/architecture.md).

Each message is a single line that names the config key or file and says what to do, so a validator or a CLI
prints it as is instead of a traceback."""


class ConfigError(ValueError):
    """A bad config value. `str(err)` is the one line shown to the user."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class DataError(ValueError):
    """A bad data setting or input file (a tokenizer, a corpus, a token file)."""


class CheckpointError(ValueError):
    """A missing, damaged or mismatched checkpoint. `str(err)` is one line that names the file."""


# The word each entry point prints before the line ("config error: ..."), by type.
ERROR_KINDS: dict[type[Exception], str] = {ConfigError: "config", DataError: "data", CheckpointError: "checkpoint"}


def error_kind(err: BaseException) -> str:
    """"config", "data" or "checkpoint" for one of the errors above (or a subclass)."""
    for cls, kind in ERROR_KINDS.items():
        if isinstance(err, cls):
            return kind
    raise TypeError(f"not an mtlm input error: {type(err).__name__}")
