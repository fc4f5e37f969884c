"""What Hydra's typed schema lets through: keys added with `+`/`++`, library settings it cannot type, and the
default checkpoint folder (a digest of the model shape, so another shape never lands in the same folder).

Hydra keeps a struct config closed to unknown keys, except on request: `+key=v` and `++key=v` add a key to any
node, the typed one included (Hydra even suggests `+` when `trainer.max_step=10` is rejected). That key would
then be carried along and read by nothing, so a typo silently trains with the default. `check_known_keys`
compares the composed config with the dataclasses of mtlm/config.py, whatever added the key (an override, an
experiment file, a sweep), and `unknown_key_message` turns Hydra's own rejections into the same one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any

from omegaconf import DictConfig

from mtlm.config import Config
from mtlm.errors import ConfigError

# What wandb.init accepts as `mode` (wandb 0.17-0.31); online, offline and disabled are the documented ones.
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")



def schema_keys(schema: Any = None, prefix: str = "") -> list[str]:
    """Dotted names of every key a typed schema (default: train.py's, mtlm.config.Config) defines, nodes
    and leaves."""
    if schema is None:
        schema = Config
    keys = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        name = f"{prefix}{f.name}"
        keys.append(name)
        nested = _dataclass_in(hints.get(f.name))
        if nested is not None:
            keys += schema_keys(nested, f"{name}.")
    return keys


def _dataclass_in(hint: Any) -> Any:
    """The dataclass a field's type names, directly or as `X | None`; None for plain values."""
    if dataclasses.is_dataclass(hint):
        return hint
    found = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
    return found[0] if len(found) == 1 else None


def unknown_keys(cfg: DictConfig, schema: Any = None) -> list[str]:
    """Keys of the composed config (the `hydra` node aside) that the typed schema does not define."""
    known = set(schema_keys(schema))
    found = []

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node.keys():
            name = f"{prefix}{key}"
            if prefix == "" and key == "hydra":
                continue
            if name not in known:
                found.append(name)
                continue
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_none() and any(k.startswith(f"{name}.") for k in known):
                walk(child, f"{name}.")

    walk(cfg, "")
    return found


def closest_key(key: str, schema: Any = None) -> str | None:
    """The schema key a misspelled one most likely meant: a near-identical dotted name (trainer.max_step ->
    trainer.max_steps), else the same or a near name in another section (trainer.lr -> optimizer.lr)."""
    known = schema_keys(schema)
    leaves = [k for k in known if not any(other.startswith(f"{k}.") for other in known)]
    pool = leaves if "." in key else [k for k in known if "." not in k]
    match = difflib.get_close_matches(key, pool, n=1, cutoff=0.8)
    if match:
        return match[0]
    last = key.rsplit(".", 1)[-1]
    by_last: dict[str, list[str]] = {}
    for k in pool:
        by_last.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    match = difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.75)
    if match and len(by_last[match[0]]) == 1:
        return by_last[match[0]][0]
    match = difflib.get_close_matches(key, pool, n=1, cutoff=0.7)
    return match[0] if match else None


def unknown_key_line(key: str, where: str = "", schema: Any = None) -> str:
    guess = closest_key(key, schema)
    types = "mtlm/config.py" if schema is None else schema.__module__.replace(".", "/") + ".py"
    listing = "`python train.py --cfg job`" if schema is None else "`--cfg job`"
    hint = f"did you mean {guess}?" if guess else f"{listing} lists the keys"
    return f"not a config key{where} ({types} types them all); {hint}"


def check_known_keys(cfg: DictConfig, schema: Any = None) -> None:
    """Raise ConfigError for the first key the schema (default: train.py's) does not define, with the closest
    valid key. Another app (mtlm.evaluate, mtlm.generate) passes its own root dataclass. Only a composed
    config (DictConfig) is checked: any other object holds no added keys."""
    if not isinstance(cfg, DictConfig):
        return
    extra = unknown_keys(cfg, schema)
    if extra:
        raise ConfigError(extra[0], unknown_key_line(extra[0], schema=schema))


def unknown_key_message(err: BaseException, schema: Any = None) -> str | None:
    """Hydra's multi-line report of an unknown key (`trainer.max_stepz=3`, or one set by an experiment file)
    as our one line, or None when `err` is about something else."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    where = ""
    seen: BaseException | None = err
    while seen is not None:
        text = str(seen)
        if text.startswith("In '") and "':" in text:  # "In 'experiment/typo': ConfigKeyError raised ..."
            where = f", set in {text[4:text.index(chr(39), 4)]}"
        if isinstance(seen, ConfigKeyError | ConfigAttributeError) and getattr(seen, "full_key", None) \
                and " not in " in text:
            return f"{seen.full_key}: {unknown_key_line(seen.full_key, where, schema)}"
        seen = seen.__cause__ or seen.__context__
    return None


def sweep_jobs(overrides: list[str], limit: int = 32) -> list[list[str]]:
    """The override lists of the first `limit` jobs of a multirun (`a=1,2 b=x,y` -> 4 lists), expanded as
    Hydra's basic sweeper will, so train.py can check them before Hydra composes or launches anything.
    [] for a syntax only another sweeper knows (that sweeper reports it; each job is still validated)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        return BasicSweeper.split_arguments(parsed, None)[0][:limit]
    except HydraException:
        return []


def check_logger_mode(cfg: Any) -> None:
    """W&B's mode (logger.mode, else a non-blank $WANDB_MODE) must be one wandb accepts: checked here, so a typo
    is one line before anything starts instead of a pydantic traceback from inside wandb.init."""
    if cfg.logger.name != "wandb":
        return
    mode = cfg.logger.mode
    if mode is not None and mode not in WANDB_MODES:
        raise ConfigError("logger.mode", f"must be online, offline or disabled (or null: $WANDB_MODE, else "
                          f"offline), got {mode!r}")
    env = os.environ.get("WANDB_MODE", "").strip()
    if mode is None and env and env not in WANDB_MODES:
        raise ConfigError("logger.mode", f"null, so $WANDB_MODE decides, but WANDB_MODE={env!r} is not a W&B mode: "
                          "set it to online, offline or disabled, or unset it")


def check(cfg: Any) -> None:
    """validate()'s share from this module: unknown keys first (a typo explains any later complaint)."""
    check_known_keys(cfg)
    check_logger_mode(cfg)


def null_section_message(overrides: list[str], config_name: str = "config", schema: Any = None) -> str | None:
    """The one line for an override such as `+cluster.foo=1` that sets a key inside a section that is null
    in this config (train.py's `cluster` and `plan`), or None when no override does."""
    if schema is None:
        schema = Config
    hints = typing.get_type_hints(schema)
    nullable = {f.name for f in dataclasses.fields(schema)
                if f.default is None and _dataclass_in(hints.get(f.name)) is not None}
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        section = key.split(".", 1)[0]
        if "." not in key or section not in nullable:
            continue
        if config_name == "config" and section in ("cluster", "plan"):
            return f"{key}: {section} {NOT_IN_TRAIN}"
        return f"{key}: {section} is null in this config, so it holds no keys; select a {section} first"
    return None


NOT_IN_TRAIN = ("is python -m mtlm.plan's (docs/planner.md); train.py does not read it: drop it, or run "
                "python -m mtlm.plan with the same overrides")


def check_not_in_train(cfg: object) -> None:
    """train.py reads neither group: `+cluster=...` or `+plan.x=...` there would be a silently ignored setting."""
    for key in ("cluster", "plan"):
        if getattr(cfg, "get", lambda k: None)(key) is not None:
            raise ConfigError(key, NOT_IN_TRAIN)
