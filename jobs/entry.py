"""How every job starts and ends: Hydra's entry point, checks before any work, user errors as
one line, SIGTERM as a clean stop, the job log.

Kept light on purpose: ``--help`` and the checks before a job starts import only this module,
Hydra, the settings and the job's own module, so a mistake is reported in well under a second;
the library (torch, transformers, Ray) is imported inside each job's ``main``.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import sys
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from attribution.errors import UserError, one_line, user_error_of
from attribution.termination import TERMINATED_EXIT, Terminated, raise_on_sigterm

USER_ERROR_EXIT = 2
ALREADY_PRINTED = "already_printed"

# An absolute path: Hydra resolves a relative one against the caller's package, which a console
# script (``attribution-score``) run from any directory does not provide.
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
                fail(str(user_error_of(error) or error))
            except Terminated as stop:
                stopped(str(stop))

        hydra_main = hydra.main(config_path=str(CONF), config_name=config_name, version_base="1.3")(run)

        @functools.wraps(task)
        def main() -> None:
            raise_on_sigterm()
            overrides = sys.argv[1:]
            # Flags (--help, --cfg, -m and its sweeps) are Hydra's business; plain overrides are
            # checked here first, so a misspelt key, a bad value, a missing input or an output
            # directory that cannot be written is one line and exit 2 before any work starts.
            if not any(argument.startswith("-") for argument in overrides) and os.environ.get("HYDRA_FULL_ERROR") != "1":
                problem = preflight_problem(config_name, overrides)
                if problem is not None:
                    fail(problem)
            try:
                hydra_main()
            except Terminated as stop:  # before the job's own handler is reached (Hydra's set-up)
                stopped(str(stop))

        main.__wrapped__ = run  # type: ignore[attr-defined]
        return main

    return decorate


def preflight_problem(config_name: str, overrides: list[str]) -> str | None:
    """Why the job cannot start, in one line, or None: the config does not compose with these
    overrides, a setting is invalid or names a missing input, or ``output_dir`` cannot be written."""
    from hydra.errors import HydraException

    from attribution.settings import SettingsError

    try:
        cfg = composed(config_name, overrides)
    except HydraException as error:
        return _one_line(config_name, error)
    try:
        check_settings(cfg)
    except SettingsError as error:
        return str(error)
    return output_dir_problem(cfg.get("output_dir"))


def composed(config_name: str, overrides: list[str]) -> DictConfig:
    """The job's config as Hydra composes it (without running the job)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def check_settings(cfg: DictConfig) -> None:
    """Build the typed settings of every group the job's config has: each one checks its values
    and that its input paths exist (:mod:`attribution.settings`), as the job will when it runs."""
    from attribution.report.settings import ReportSettings
    from attribution.settings import (
        ClusterSettings,
        DataSettings,
        FactorSettings,
        FinetuneSettings,
        ModelSettings,
        PrefilterSettings,
        QuerySettings,
        RefineSettings,
        ScoreSettings,
        from_mapping,
    )

    groups: dict[str, type] = {
        "model": ModelSettings, "data": DataSettings, "queries": QuerySettings, "factors": FactorSettings,
        "finetune": FinetuneSettings, "score": ScoreSettings, "prefilter": PrefilterSettings,
        "refine": RefineSettings, "cluster": ClusterSettings, "report": ReportSettings,
    }
    for group, kind in groups.items():
        values = cfg.get(group)
        if isinstance(values, DictConfig):
            from_mapping(kind, OmegaConf.to_container(values, resolve=True), group)  # type: ignore[arg-type]


def output_dir_problem(output_dir: Any) -> str | None:
    """Why ``output_dir`` (and the folders in it that jobs write to) cannot be written, or None.

    Tried by writing: permission bits say nothing for root, nor for a read-only mount.
    """
    if not isinstance(output_dir, str) or not output_dir.strip():
        return f"output_dir={output_dir!r}: expected a directory path"
    root = Path(output_dir)
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"output_dir={output_dir}: {existing} is a file, not a directory"
    for folder in _written_folders(root if root.exists() else existing):
        reason = _write_refused(folder)
        if reason is not None:
            where = "" if folder in (root, existing) else f" (its folder {folder.relative_to(root)}/)"
            return f"output_dir={output_dir}: cannot write to {folder}{where}: {reason}"
    return None


def _written_folders(root: Path) -> Iterator[Path]:
    """``root`` and the folders in it that earlier jobs made (scores/, runs/, factors/, ...)."""
    yield root
    if root.is_dir():
        yield from sorted(child for child in root.iterdir() if child.is_dir())


def _write_refused(folder: Path) -> str | None:
    probe = folder / f".write-check-{uuid.uuid4().hex}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as error:
        return error.strerror or type(error).__name__
    return None


def _one_line(config_name: str, error: Exception) -> str:
    message = str(error)
    unknown = re.match(r"Could not override '([^']+)'", message)
    if unknown:
        key = unknown.group(1)
        return (f"{key}: no such key in conf/{config_name}.yaml{_did_you_mean(config_name, key)} "
                f"(every key: python -m jobs.{config_name} --cfg job)")
    lines = [line.strip() for line in message.split("Config search path")[0].splitlines() if line.strip()]
    text = ""
    for line in lines:
        text += (" " if text.endswith(":") else "; " if text else "") + line
    return text or type(error).__name__


def _did_you_mean(config_name: str, key: str) -> str:
    """``; did you mean score.top_k?``: the job's keys closest to a misspelt one, if any are close."""
    keys = list(_dotted_keys(OmegaConf.to_container(composed(config_name, []), resolve=False)))
    close = difflib.get_close_matches(key, keys, n=2, cutoff=0.8)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _dotted_keys(tree: Any, prefix: str = "") -> Iterator[str]:
    if not isinstance(tree, dict):
        return
    for name, value in tree.items():
        if name == "hydra":
            continue
        yield prefix + str(name)
        yield from _dotted_keys(value, f"{prefix}{name}.")


def fail(message: str) -> None:
    """The one line a user's mistake gets, on stderr and in the job log, then exit 2."""
    line = one_line(message)
    _end_progress_bars()
    print(f"ERROR: {line}", file=sys.stderr, flush=True)
    log.error(line, extra={ALREADY_PRINTED: True})
    sys.exit(USER_ERROR_EXIT)


def stopped(reason: str) -> None:
    """A job stopped by SIGTERM after cleaning up: one line, and the exit status of that signal."""
    line = f"{reason}: locks released, finished work kept; rerun the same command to resume"
    _end_progress_bars()
    print(f"STOPPED: {line}", file=sys.stderr, flush=True)
    log.warning(line, extra={ALREADY_PRINTED: True})
    sys.exit(TERMINATED_EXIT)


def _end_progress_bars() -> None:
    """Close the bars still drawn, so the line that follows starts on a line of its own."""
    if "tqdm" not in sys.modules:
        return
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def say(text: str) -> None:
    """The job's printed summary: on stdout as it is, and in the job log."""
    print(text, flush=True)
    for line in text.splitlines():
        log.info(line, extra={ALREADY_PRINTED: True})


class NotPrinted(logging.Filter):
    """For the terminal's log handler: drops what :func:`fail` and :func:`say` printed already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, ALREADY_PRINTED, False)
