"""Optional hook for an external paraphraser (an LLM script, a rewriting service); off by default.

Paraphrases add linguistic variety beyond the built-in templates, but a paraphraser may drop or change
a morphological fact ("pink" -> "red"). `checked_paraphrases` therefore keeps only paraphrases from
which `parse_caption` recovers exactly the annotated attributes, and records how many it rejected.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from hemaclip.errors import HemaclipError
from hemaclip.text.captions import parse_caption

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0


class VerbalizerError(HemaclipError):
    """The external paraphraser failed (non-zero exit, timeout, or it could not be started)."""


@runtime_checkable
class Verbalizer(Protocol):
    """Anything that turns one caption into zero or more paraphrases."""

    def paraphrase(self, caption: str) -> list[str]: ...


def _clean(lines: Iterable[str], caption: str) -> list[str]:
    """Strip, drop empty lines and exact copies of the input, de-duplicate keeping order."""
    out = (line.strip() for line in lines)
    return list(dict.fromkeys(line for line in out if line and line != caption.strip()))


class CommandVerbalizer:
    """Runs a command with the caption on stdin; its stdout holds one paraphrase per line.

    A string command runs through the shell (pipes, environment variables); a list runs directly.
    """

    def __init__(self, cmd: str | Sequence[str], timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.cmd = cmd
        self.timeout = timeout

    def _name(self) -> str:
        return self.cmd if isinstance(self.cmd, str) else shlex.join(self.cmd)

    def paraphrase(self, caption: str) -> list[str]:
        try:
            result = subprocess.run(
                self.cmd,
                input=caption,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                shell=isinstance(self.cmd, str),
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise VerbalizerError(f"paraphrase command timed out after {self.timeout:g} s: {self._name()}") from err
        except OSError as err:
            reason = err.strerror or err
            raise VerbalizerError(f"paraphrase command could not start ({reason}): {self._name()}") from err
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no error output"])[-1]
            raise VerbalizerError(f"paraphrase command exited with status {result.returncode} ({last}): {self._name()}")
        return _clean(result.stdout.splitlines(), caption)


class CallableVerbalizer:
    """Wraps a Python function returning paraphrases (a list, or one string with one per line)."""

    def __init__(self, fn: Callable[[str], Iterable[str] | str]) -> None:
        self.fn = fn

    def paraphrase(self, caption: str) -> list[str]:
        produced = self.fn(caption)
        lines = produced.splitlines() if isinstance(produced, str) else produced
        return _clean(lines, caption)


class CheckedParaphrases(list[str]):
    """The faithful paraphrases (a plain list of strings) plus the ones that were rejected."""

    def __init__(self, kept: Iterable[str], rejected: Iterable[str]) -> None:
        super().__init__(kept)
        self.rejected: list[str] = list(rejected)

    @property
    def n_rejected(self) -> int:
        return len(self.rejected)


def checked_paraphrases(verbalizer: Verbalizer, caption: str, attributes: Mapping[str, str]) -> CheckedParaphrases:
    """Paraphrases of `caption` that still state exactly `attributes`; `.rejected` holds the others."""
    expected = dict(attributes)
    kept: list[str] = []
    rejected: list[str] = []
    for text in verbalizer.paraphrase(caption):
        (kept if parse_caption(text) == expected else rejected).append(text)
    if rejected:
        total = len(kept) + len(rejected)
        log.info("rejected %d of %d paraphrases that changed or dropped attributes", len(rejected), total)
    return CheckedParaphrases(kept, rejected)
