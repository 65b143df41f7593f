"""One logger for what hemaclip says while it works, and one log file per run.

* Every module logs through ``get_logger(__name__)`` (all under the ``hemaclip`` logger);
  :func:`setup_console` (called once by the CLI) prints those messages on stderr as they are, one line
  each, through ``tqdm.write`` so progress bars stay intact (warnings say "warning: ..." themselves).
  Results a command prints on stdout (tables, JSON) are not log messages and do not go through here.
* :func:`run_log` writes ``run.log`` into a run or report folder: a header with the command, the git
  SHA of the code, package versions and the machine, then every hemaclip log message of the run
  (DEBUG and up, with times). A resumed run appends a new header to the same file.
* :func:`progress_level`: messages that used to appear only with a progress display (a terminal) are
  logged at INFO then and at DEBUG otherwise, so the console stays as quiet as before while the run
  log keeps them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import inspect
import logging
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["RUN_LOG", "get_logger", "logged_run", "machine_info", "progress_level", "run_header", "run_log", "setup_console"]

ROOT = "hemaclip"
RUN_LOG = "run.log"
PACKAGES = ("hemaclip", "torch", "torchvision", "timm", "open_clip_torch", "transformers", "numpy", "scikit-learn", "scipy", "pillow", "faiss-cpu")
_FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def get_logger(name: str = ROOT) -> logging.Logger:
    """The logger of a hemaclip module (``get_logger(__name__)``); names outside hemaclip are put under it."""
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")


def progress_level(progress: bool | None) -> int:
    """INFO when a progress display was asked for, else DEBUG (shown in run logs, not on the console)."""
    return logging.INFO if progress else logging.DEBUG


class _ConsoleHandler(logging.Handler):
    """One line per message on stderr, written with tqdm.write so an active progress bar is redrawn below it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # a logging failure must never end a run
            self.handleError(record)


def setup_console(level: int = logging.INFO) -> None:
    """Print hemaclip's log messages of `level` and up on stderr (idempotent; the CLI calls it once)."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(logging.DEBUG)
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        handler = _ConsoleHandler(level)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    for handler in logger.handlers:
        if isinstance(handler, _ConsoleHandler):
            handler.setLevel(level)
    logger.propagate = False


def _git_sha() -> str | None:
    """The commit of the hemaclip source tree in use (with '+dirty' if it has uncommitted changes), or None."""
    source = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source, capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha


def _versions(packages: Sequence[str] = PACKAGES) -> dict[str, str]:
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def machine_info() -> dict[str, Any]:
    """Where a run ran: platform, Python, CPU count, torch threads, GPU (if torch is imported)."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def run_header(kind: str, command: str | None = None) -> list[str]:
    """The header lines of a run log: what ran, from which code, with which packages, where."""
    if command is None:
        argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
        if argv0.name == "hemaclip" or argv0.parent.name == "hemaclip":  # the entry point, or python -m hemaclip.cli
            program = "hemaclip"
        elif argv0.name == "__main__.py":
            program = f"python -m {argv0.parent.name}"
        else:
            program = argv0.name
        command = " ".join(shlex.quote(a) for a in [program, *sys.argv[1:]])
    versions = _versions()
    return [
        f"=== hemaclip {kind} run, {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}",
        f"command: {command}",
        f"git: {_git_sha() or 'unknown (not a git checkout)'}",
        "packages: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "machine: " + ", ".join(f"{k} {v}" for k, v in machine_info().items()),
    ]


def _existing_entries(folder: Path) -> set[str] | None:
    """Names in `folder` now (None when it does not exist): what a refused run must leave in place."""
    try:
        return {entry.name for entry in folder.iterdir()}
    except FileNotFoundError:
        return None


def _remove_new_entries(folder: Path, before: set[str] | None) -> None:
    """Undo what a refused run created in `folder`: the entries not in `before`, and the folder itself if
    it did not exist (run.log, config.json, splits/ of a run that never started)."""
    import shutil

    if before is None:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for entry in folder.iterdir():
        if entry.name not in before:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


@contextlib.contextmanager
def run_log(folder: str | Path, kind: str, command: str | None = None, keep_if: str | None = None) -> Iterator[Path]:
    """Log this run into ``folder/run.log`` (appended): a header (:func:`run_header`), then every hemaclip
    log message until the block ends. `kind` names the run ("train", "evaluate", "synth train", ...).

    A run refused with a `HemaclipError` (bad data, options, files) leaves the folder as it found it: what
    the run created there is removed, unless `keep_if` names a file the run wrote (e.g. a training
    checkpoint: work a fixed input can resume from). Interruptions and crashes keep everything."""
    from hemaclip.errors import HemaclipError
    from hemaclip.io import prepare_output_dir

    folder = Path(folder)
    before = _existing_entries(folder)
    prepare_output_dir(folder, "output folder")
    path = folder / RUN_LOG
    with path.open("a", encoding="utf-8") as handle:
        handle.write("\n".join(run_header(kind, command)) + "\n")
    logger = logging.getLogger(ROOT)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    previous = logger.level
    if logger.level == logging.NOTSET or logger.level > logging.DEBUG:
        logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield path
    except BaseException as exc:
        # Into the run log only: the console gets the CLI's one-line error.
        first = str(exc).splitlines()[0] if str(exc) else ""
        handler.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "run ended with %s: %s", (type(exc).__name__, first), None))
        refused = isinstance(exc, HemaclipError) and not (keep_if is not None and (folder / keep_if).exists())
        if refused:
            logger.removeHandler(handler)
            handler.close()
            _remove_new_entries(folder, before)
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(previous)


def logged_run(kind: str, folder: str = "out") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: run the function inside :func:`run_log` of its `folder` argument (its output folder)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            target = bound.arguments.get(folder)
            if target is None:  # the function says what is missing
                return fn(*args, **kwargs)
            with run_log(target, kind):
                return fn(*args, **kwargs)

        return run

    return decorate
