"""Files in and out: strict JSON reading, and atomic writes whose failures are one line.

* :func:`read_json` reads a user's JSON file the way every rstr reader does (and the C++
  runtime's manifest reader too): UTF-8, standard JSON only (no ``NaN``/``Infinity``, no number
  that overflows a double; ``infinities=True`` admits ``-Infinity``/``Infinity`` for diffusers'
  scheduler configs, which hold them), integers beyond 64 bits read as floats (as C++ JSON readers do),
  at most :data:`MAX_JSON_DEPTH` levels of nesting and :data:`MAX_JSON_BYTES` bytes.  Any
  problem is one error line naming the file.
* :func:`atomic_path` / :func:`atomic_dir` write into a temporary sibling and rename it onto
  the target when complete, so outputs appear complete or not at all.  A write that fails for
  lack of space, a read-only file system or a permission is one :class:`RstrError` line naming
  the output and the fix; the temporary is removed.  Temporary names carry the host and
  process (``.NAME.HOST-PID.XXXX.tmp``), so the next write into the same folder removes what a
  killed process left behind (:func:`remove_stale`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rstr.errors import RstrError

MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 100  # nested arrays/objects; the C++ manifest reader has the same limit
_INT64 = (-(1 << 63), (1 << 64) - 1)  # what a C++ JSON reader keeps as an integer (int64 or uint64)

# Write failures that only a write can cause, and what to do about each.
_WRITE_FIXES = {
    errno.ENOSPC: "free some space or choose another location",
    errno.EDQUOT: "free some space (disk quota) or choose another location",
    errno.EFBIG: "the file system refuses a file this large; choose another location",
    errno.EROFS: "the file system is read-only; choose another location",
}
_PERMISSION = (errno.EACCES, errno.EPERM)


# ------------------------------------------------------------------------------------ reading
def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _integer(text: str) -> int | float:
    value = int(text)
    return value if _INT64[0] <= value <= _INT64[1] else float(value)


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _infinity(name: str) -> float:
    """``Infinity`` and ``-Infinity`` as floats (diffusers writes them in scheduler configs); ``NaN`` still refused."""
    if name == "NaN":
        _constant(name)
    return float(name.lower().replace("infinity", "inf"))


_SURROGATE = re.compile("[\ud800-\udfff]")


def json_depth(value: Any) -> int:
    """How deeply arrays and objects nest in ``value`` (a scalar: 0), without recursion; ``ValueError`` on a
    string holding a lone UTF-16 surrogate (``"\\ud800"``), which no UTF-8 text can carry."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str) and _SURROGATE.search(item):
            raise ValueError("a string holds a lone \\u surrogate escape")
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
    return deepest


def parse_json(text: str, infinities: bool = False) -> Any:
    """``text`` as strict JSON (see the module docstring); ``ValueError`` naming the problem otherwise.
    ``infinities`` also reads ``Infinity``/``-Infinity``, which Python's own writer (diffusers' configs) emits."""
    try:
        constant = _infinity if infinities else _constant
        value = json.loads(text, parse_float=_finite_float, parse_int=_integer, parse_constant=constant)
    except RecursionError:
        value = None
        depth = MAX_JSON_DEPTH + 1
    else:
        depth = json_depth(value)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def read_json(path: str | os.PathLike[str], error: type[RstrError] = RstrError, infinities: bool = False) -> Any:
    """The JSON document in ``path``, read strictly (``infinities``: see :func:`parse_json`); one ``error`` line
    naming the file otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_JSON_BYTES + 1)
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror or err}") from None
    if len(data) > MAX_JSON_BYTES:
        raise error(f"{path} is larger than {MAX_JSON_BYTES >> 20} MiB; it is not a JSON file rstr wrote")
    try:
        return parse_json(data.decode("utf-8"), infinities)
    except UnicodeDecodeError:
        raise error(f"{path} is not valid JSON (not UTF-8 text)") from None
    except ValueError as err:
        raise error(f"{path} is not valid JSON ({err})") from None


# ------------------------------------------------------------------------------------ writing
def _owner_tag() -> str:
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale(path: Path) -> list[Path]:
    """Remove the temporaries of ``path`` left by killed processes of this host; return what was removed.

    Only names this module writes (``.NAME.HOST-PID.XXXX.tmp``) with this host's name and a
    process id that no longer runs are touched; a live writer's temporary is left alone.
    """
    if os.name != "posix" or not path.parent.is_dir():
        return []
    host = _owner_tag().rsplit("-", 1)[0]
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.{re.escape(host)}-(\d+)\.[A-Za-z0-9_]+\.tmp$")
    removed = []
    for entry in path.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def write_error(target: Path, err: OSError, temporary: Path | None = None, *, preparing: bool = False) -> RstrError | None:
    """The one-line error for a failed write of ``target``, or None when ``err`` is not a write failure.

    Every error while ``preparing`` (making the folder, creating the temporary) is one; later,
    space, quota, size and read-only errors can only come from writing, and a permission error
    is one when it names the target, its temporary or a path inside it.
    """
    reason = err.strerror or str(err)
    if err.errno in _WRITE_FIXES:
        return RstrError(f"cannot write {target}: {reason}; {_WRITE_FIXES[err.errno]}")
    names = [Path(f) for f in (err.filename, err.filename2) if f]
    ours = [p for p in (target, target.parent, temporary) if p is not None]
    if preparing or (err.errno in _PERMISSION and any(n == p or p in n.parents for n in names for p in ours)):
        return RstrError(f"cannot write {target}: {reason}; choose a location you can write to")
    return None


@contextlib.contextmanager
def _converted(target: Path, temporary: Path | None = None, *, preparing: bool = False) -> Iterator[None]:
    try:
        yield
    except OSError as err:
        converted = write_error(target, err, temporary, preparing=preparing)
        if converted is None:
            raise
        raise converted from None


def _prepare(path: Path) -> str:
    with _converted(path, preparing=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)
    return f".{path.name}.{_owner_tag()}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    prefix = _prepare(path)
    with _converted(path, preparing=True):
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
    tmp_path = Path(tmp)
    try:
        with _converted(path, tmp_path):
            yield tmp_path
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it onto ``path`` when the block succeeds.

    With ``force`` an existing ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    prefix = _prepare(path)
    with _converted(path, preparing=True):
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    tmp.chmod(0o755)
    try:
        with _converted(path, tmp):
            yield tmp
            if path.exists() and force:
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
