"""How every job starts and ends: Hydra's entry point, user errors as one line, the job log.

Kept light on purpose: ``--help`` imports only this module, Hydra and the job's own module,
so the library (torch, transformers, Ray) is imported inside each job's ``main``.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig

from attribution.errors import UserError

USER_ERROR_EXIT = 2
ALREADY_PRINTED = "already_printed"

CONF = Path(__file__).resolve().parents[1] / "conf"

Task = Callable[[DictConfig], None]
log = logging.getLogger("jobs")
# Without Hydra's logging (a test calling main.__wrapped__), logging's last resort would print errors twice.
log.addHandler(logging.NullHandler())


def job(config_name: str) -> Callable[[Task], Callable[[], None]]:
    """``@job("score")``: the Hydra app of ``conf/score.yaml`` whose user errors exit 2 with one line.

    A :class:`UserError` prints ``ERROR: <message>`` on stderr (the message names the key,
    file or row) and exits 2; with ``debug=true`` its traceback comes first, and with
    ``HYDRA_FULL_ERROR=1`` it is re-raised as Hydra does. So does an override the config
    does not have. Other exceptions are bugs and keep Hydra's traceback.
    ``main.__wrapped__(cfg)`` runs the job on a composed config.
    """

    def decorate(task: Task) -> Callable[[], None]:
        @functools.wraps(task)
        def run(cfg: DictConfig) -> None:
            # Before the library imports Ray: only its warnings reach the terminal, not its
            # "Started a local Ray instance" (it reads the level when first imported).
            os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")
            try:
                task(cfg)
            except UserError as error:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                if cfg.get("debug", False):
                    traceback.print_exc()
                fail(str(error))

        hydra_main = hydra.main(config_path="../conf", config_name=config_name, version_base="1.3")(run)

        @functools.wraps(task)
        def main() -> None:
            overrides = sys.argv[1:]
            # Flags (--help, --cfg, -m and its sweeps) are Hydra's business; plain overrides are
            # checked here first, so a misspelt key is one line and exit 2 like any user error.
            if not any(argument.startswith("-") for argument in overrides):
                problem = composition_problem(config_name, overrides)
                if problem is not None and os.environ.get("HYDRA_FULL_ERROR") != "1":
                    fail(problem)
            hydra_main()

        main.__wrapped__ = run  # type: ignore[attr-defined]
        return main

    return decorate


def composition_problem(config_name: str, overrides: list[str]) -> str | None:
    """Why the job's config does not compose with these overrides, in one line, or None."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            compose(config_name, overrides=overrides)
    except HydraException as error:
        return _one_line(config_name, error)
    finally:
        GlobalHydra.instance().clear()
    return None


def _one_line(config_name: str, error: Exception) -> str:
    message = str(error)
    unknown = re.match(r"Could not override '([^']+)'", message)
    if unknown:
        return f"{unknown.group(1)}: no such key in conf/{config_name}.yaml (every key: python -m jobs.{config_name} --cfg job)"
    lines = [line.strip() for line in message.split("Config search path")[0].splitlines() if line.strip()]
    text = ""
    for line in lines:
        text += (" " if text.endswith(":") else "; " if text else "") + line
    return text or type(error).__name__


def fail(message: str) -> None:
    """The one line a user's mistake gets, on stderr and in the job log, then exit 2."""
    line = " ".join(message.split())
    print(f"ERROR: {line}", file=sys.stderr, flush=True)
    log.error(line, extra={ALREADY_PRINTED: True})
    sys.exit(USER_ERROR_EXIT)


def say(text: str) -> None:
    """The job's printed summary: on stdout as it is, and in the job log."""
    print(text, flush=True)
    for line in text.splitlines():
        log.info(line, extra={ALREADY_PRINTED: True})


class NotPrinted(logging.Filter):
    """For the terminal's log handler: drops what :func:`fail` and :func:`say` printed already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, ALREADY_PRINTED, False)
