"""Small I/O helpers shared by every layer: atomic writes (nothing is ever half-written), report paths,
and the one reader of config files with the one unknown-key check of every dataclass config."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import tempfile
import types
import typing
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

T = TypeVar("T")


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files 0600; give them the usual permissions
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def display_path(path: str | Path) -> str:
    """How a path is written into reports: files of the installed package as ``hemaclip/...``, files
    under the working folder relative to it, anything else as given (reports then read the same on
    every machine and do not leak a home folder)."""
    text = str(path)
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError):
        return text
    package = Path(__file__).resolve().parent
    for base, prefix in ((package, "hemaclip/"), (Path.cwd().resolve(), "")):
        try:
            return prefix + resolved.relative_to(base).as_posix()
        except ValueError:
            continue
    return text


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files `atomic_write` leaves in `folder` when its process was killed (-9).

    Called when a run resumes: those files never became results, and nothing else writes that pattern.
    """
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def packaged_configs(kind: str) -> dict[str, Path]:
    """Name -> file of the configs shipped in ``hemaclip/configs/<kind>/`` (JSON or YAML)."""
    from importlib import resources

    folder = resources.files("hemaclip") / "configs" / kind
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith((".json", ".yaml", ".yml"))}


def read_config(name_or_path: str | Path, kind: str, what: str) -> tuple[Path, dict[str, Any]]:
    """A config by file path or by the name of a packaged one of `kind`, read as a mapping.

    The one reader of config files (model, training and GAN configs): JSON or YAML. One-line
    `HemaclipError` naming the file for a missing name, an unreadable file or a non-mapping; `what`
    names the config in those messages ("model config", "training config", "GAN config").
    """
    import yaml

    from hemaclip.errors import HemaclipError

    path = Path(name_or_path)
    if not path.is_file():
        packaged = packaged_configs(kind)
        if str(name_or_path) not in packaged:
            raise HemaclipError(f"{name_or_path}: no such {what} file or packaged config (packaged: {', '.join(sorted(packaged))})")
        path = packaged[str(name_or_path)]
    try:
        text = path.read_text(encoding="utf-8")
        payload = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise HemaclipError(f"{path}: cannot read {what} ({str(exc).splitlines()[0]})") from None
    if not isinstance(payload, dict):
        raise HemaclipError(f"{path}: a {what} must be a mapping of options")
    return path, payload


def check_keys(data: Mapping[str, Any], cls: type, what: str, source: str | None = None) -> None:
    """The one unknown-key check of every dataclass config: a key that is not a field of `cls` is a
    one-line `HemaclipError` naming it and the known ones (typos in files and --set are caught)."""
    from hemaclip.errors import HemaclipError

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        prefix = f"{source}: " if source else ""
        raise HemaclipError(f"{prefix}unknown {what} key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")


def config_from_dict(
    cls: type[T], data: Mapping[str, Any], what: str, source: str | None = None, nested: Mapping[str, type] | None = None
) -> T:
    """A dataclass config from a mapping: unknown keys checked (:func:`check_keys`), fields named in
    `nested` built from their own mappings the same way, and wrong value types (TypeError/ValueError
    of the constructor) turned into one-line `HemaclipError`s naming `source`."""
    from hemaclip.errors import HemaclipError

    check_keys(data, cls, what, source)
    values = dict(data)
    for name, sub in (nested or {}).items():
        if isinstance(values.get(name), Mapping):
            values[name] = config_from_dict(sub, values[name], f"{what} {name}", source)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        prefix = f"{source}: " if source else ""
        raise HemaclipError(f"{prefix}{what}: {exc}") from None


# ------------------------------------------------------------------------------------------------
# Value checks of dataclass configs: every field against its annotation, then the config's own rules
# ------------------------------------------------------------------------------------------------

Rule = tuple[str, Callable[[Any], bool]]  # (what is allowed, in words; test of a value of the right type)


def at_least(low: float) -> Rule:
    return (f">= {low}", lambda v: v >= low)


def greater_than(low: float) -> Rule:
    return (f"> {low}", lambda v: v > low)


def between(low: float, high: float) -> Rule:
    return (f"within [{low}, {high}]", lambda v: low <= v <= high)


def one_of(choices: Collection[Any]) -> Rule:
    return (f"one of {', '.join(str(c) for c in choices)}", lambda v: v in choices)


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # JSON 1.5 or true is not a count
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an int is a number too; NaN and infinity are not a setting
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    base = origin or hint
    if base in (dict, Mapping):
        return isinstance(value, Mapping)
    if base in (list, tuple):
        return isinstance(value, (list, tuple))
    return isinstance(value, base) if isinstance(base, type) else True


def _type_words(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_words(arg) for arg in typing.get_args(hint))
    base = typing.get_origin(hint) or hint
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
             dict: "a mapping", Mapping: "a mapping", list: "a list", tuple: "a list"}
    return words.get(base, f"a {getattr(base, '__name__', base)} mapping")


def check_values(config: Any, what: str, rules: Mapping[str, Rule] | None = None) -> None:
    """The one value check of dataclass configs, called from their ``__post_init__`` (so a config from a
    file, from ``--set`` or from code is checked before a run writes anything): each field against its
    type annotation (an int field takes no 1.5, "abc" or true; a float field takes ints but no NaN), then
    the config's `rules` (field -> :data:`Rule`, skipped for a None value). A one-line `HemaclipError`
    naming the field, what it must be and the value given; ints given for float fields become floats."""
    from hemaclip.errors import HemaclipError

    hints = typing.get_type_hints(type(config))
    for spec in dataclasses.fields(config):
        value, hint = getattr(config, spec.name), hints[spec.name]
        if not _type_ok(value, hint):
            raise HemaclipError(f"{what}: {spec.name} must be {_type_words(hint)}, got {value!r}")
        rule = (rules or {}).get(spec.name)
        if rule is not None and value is not None and not rule[1](value):
            raise HemaclipError(f"{what}: {spec.name} must be {rule[0]}, got {value!r}")
        floats = hint is float or (typing.get_origin(hint) in (typing.Union, types.UnionType) and float in typing.get_args(hint))
        if floats and isinstance(value, int):
            object.__setattr__(config, spec.name, float(value))
    for name in set(rules or {}) - {spec.name for spec in dataclasses.fields(config)}:
        raise TypeError(f"{type(config).__name__}: a rule names '{name}', which is not one of its fields")


def apply_overrides(payload: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """`--set` overrides on top of a config mapping, in place: ``key`` sets a top-level option,
    ``group.key`` an option of a nested block (e.g. ``augmentation.grey_p`` or ``model.g_channels``)."""
    for key, value in (overrides or {}).items():
        if "." in key:
            group, sub = key.split(".", 1)
            block = payload.setdefault(group, {})
            if not isinstance(block, dict):
                from hemaclip.errors import HemaclipError

                raise HemaclipError(f"--set {key}: '{group}' is not a block of options")
            block[sub] = value
        else:
            payload[key] = value
    return payload


def write_json(path: str | Path, payload: Any) -> None:
    """Write JSON atomically with stable key order and indentation (diff-friendly results)."""
    with atomic_write(path) as handle:
        json.dump(payload, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")


def check_output_dir(path: str | Path, option: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be one: `path` (or a folder above it) is an
    existing file. One-line `HemaclipError` naming `option` and the file; nothing is created."""
    from hemaclip.errors import HemaclipError

    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            break
        if candidate.exists() or candidate.is_symlink():
            what = "is" if candidate == path else f"lies under {candidate}, which is"
            raise HemaclipError(f"{option} {path}: {what} a file, not a folder; choose a folder")
    return path


def prepare_output_dir(path: str | Path, option: str = "--out") -> Path:
    """:func:`check_output_dir`, then create the folder (and its parents): the one way commands make
    the folder they write into, so a file in the way is one line, never a FileExistsError traceback."""
    path = check_output_dir(path, option)
    path.mkdir(parents=True, exist_ok=True)
    return path


def path_to_text(path: str | Path) -> str:
    """A file path as text any UTF-8 store (SQLite, JSON) accepts. Names that are valid UTF-8 are
    unchanged; bytes that are not (held by Python as surrogate escapes) are written as ``\\xNN``, so a
    lab's file named in another encoding is stored, shown and found again (:func:`text_to_path`)."""
    text = str(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


def text_to_path(text: str) -> Path:
    """The file a :func:`path_to_text` text names: the text itself when such a file exists (or it holds no
    escape), else the text with its ``\\xNN`` escapes turned back into the original bytes."""
    path = Path(text)
    if "\\x" not in text or path.exists():
        return path
    raw = re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8"))
    return Path(os.fsdecode(raw))
