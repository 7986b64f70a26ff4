"""Output directories that cost the user nothing: a target is checked before any work (`check_target`), built
beside its final name and renamed into place (`atomic_output_dir`), and what an interrupted run left is cleaned
up or put back (`clean_leftovers`)."""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from .diskspace import free_bytes, is_no_space, no_space_message
from .hf_io import CheckpointError, _first_line

RUN_TAG = re.compile(r"global_step(\d+)$")  # a training checkpoint's directory name; group 1: its step
RUN_LOCK_FILE = ".run.lock"  # a training run's lock on its save_path (training.runlock)


def _as_target(path: Path) -> Path:
    """`path` absolute, with the symbolic links of its parents resolved but not one at `path` itself (an output
    replaces a link, never what it points to)."""
    p = Path(os.path.abspath(path))
    return p.parent.resolve() / p.name if p.name else p


def run_tags(directory: Path) -> list[str]:
    """The checkpoint directories (RUN_TAG) of a training save_path, oldest first."""
    found = [(int(m.group(1)), p.name) for p in directory.iterdir() if p.is_dir() and (m := RUN_TAG.match(p.name))]
    return [name for _, name in sorted(found)]


def run_marks(path: Path, lock: bool = True) -> list[str]:
    """What shows that `path` is a training run's save_path: its `latest`, metrics.jsonl, its run lock (`lock`) and
    its first checkpoint dir, those it holds ([] for any other path)."""
    if not path.is_dir():
        return []
    names = ("latest", *([RUN_LOCK_FILE] if lock else []), "metrics.jsonl")
    return [n for n in names if (path / n).is_file()] + run_tags(path)[:1]


def latest_tag(directory: Path) -> str:
    """The tag `directory/latest` names ("" for an empty file): its last path component, so "global_step3/" written
    by hand is that tag, and a path into another directory names a tag of this one, not the other run's."""
    return Path((directory / "latest").read_text(errors="replace").strip()).name  # (a byte not UTF-8: no tag named)


def check_target(path: Path, overwrite: bool, sources: Iterable[str | Path | None] = (), renamed: bool = False) -> None:
    """Refuse (CheckpointError, one line) a target that would cost the user something. Always: the target is one of
    `sources` (what the command reads: input dirs and files, symbolic links resolved) or a directory holding one, or,
    with `overwrite`, an existing file or link inside one (it may be one the command reads). A new entry inside an
    input dir is allowed: only that entry is written (or, with `overwrite`, replaced). Without `overwrite`: an
    existing file, symbolic link or non-empty directory. `renamed` (an output that a rename puts in place, as
    `atomic_output_dir`'s): the current directory or one holding it (`.`, `..`), which the rename would pull from
    under the user's shell, or a mount point (`docker -v host:/out`), which no rename replaces."""
    path = Path(path)
    dst = _as_target(path)
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current directory was removed
        cwd = None
    if renamed and cwd is not None and (dst == cwd or dst in cwd.parents):
        raise CheckpointError(f"{dst}: is the current directory (or contains it): give the new directory's path, "
                              "e.g. ./hf")
    if renamed and os.path.ismount(dst):  # the rename onto it would fail (EBUSY) only once the output is complete
        raise CheckpointError(f"{path}: is a mount point (the output is renamed into place): give a directory inside "
                              f"it, e.g. {path / 'model'}")
    for src in dict.fromkeys(Path(s).resolve() for s in sources if s is not None and os.path.lexists(s)):  # not a Hub id
        if dst == src:
            raise CheckpointError(f"{path}: is the input {src} itself; write the output somewhere else")
        if dst in src.parents:
            raise CheckpointError(f"{path}: holds the input {src} (replacing it would delete the input); write the "
                                  "output somewhere else")
        if overwrite and src in dst.parents and (dst.is_symlink() or dst.exists() and not dst.is_dir()):
            raise CheckpointError(f"{path}: a file of the input {src} (--overwrite would replace it); write the output "
                                  "somewhere else")
    above = next((p for p in dst.parents if os.path.lexists(p)), None)  # the nearest existing path above it
    if above is not None and not above.is_dir():
        raise CheckpointError(f"{path}: {above} is a file, not a directory; choose another path")
    if overwrite and not path.is_symlink() and (run := run_marks(path)):
        raise CheckpointError(f"{path}: is a training run's save_path (it holds {', '.join(run)}): --overwrite would "
                              "delete its checkpoints and metrics; write the output somewhere else")
    if overwrite or not os.path.lexists(path):
        return
    if path.is_symlink():
        raise CheckpointError(f"{path}: is a symbolic link (to {os.readlink(path)}); pass --overwrite to replace the "
                              "link itself (what it points to is left as it is)")
    if not path.is_dir() or any(path.iterdir()):
        raise CheckpointError(f"{path}: exists and is not empty (pass --overwrite to replace it)")


def _remove(path: Path) -> None:
    """Remove a file, a symbolic link (never what it points to) or a directory tree; what is gone is fine."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host is running (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_namespace() -> str:
    """This process's PID namespace (its inode; "" where there is no /proc): containers that share a host name (and
    a disk) number their processes apart, so a PID names a process only within one namespace."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def owner_name() -> str:
    """HOST-PID[.NAMESPACE]: the process a temporary dir belongs to, as its name ends."""
    ns = pid_namespace()
    return f"{socket.gethostname()}-{os.getpid()}{'.' + ns if ns else ''}"


def _owner_alive(name: str) -> bool:
    """Whether the process named in a temporary dir's name (`...tmp-HOST-PID[.NAMESPACE]`) may still be writing it:
    one of another host or PID namespace (another container of the same host name) may; one of this namespace (or
    of no recorded namespace) while its PID runs."""
    host, _, owner = name.rpartition("-")
    host = host.rpartition(".tmp-")[2] if ".tmp-" in host else host.rpartition(".old-")[2]
    pid, _, ns = owner.partition(".")
    if host != socket.gethostname() or not pid.isdigit():
        return host != socket.gethostname() and bool(host)  # another host's: it may be alive
    if ns and ns != pid_namespace():
        return True
    return pid_alive(int(pid))


_SAID_ALIVE: set[Path] = set()  # temporary dirs of a live (or another host's) conversion, already said


def clean_leftovers(path: Path, say: Callable[[str], None]) -> None:
    """Remove the temporary dirs an interrupted conversion into `path` left beside it (`.NAME.tmp-HOST-PID`),
    and put back a previous output an interrupted `--overwrite` had moved aside (`.NAME.old-HOST-PID`)."""
    for tmp in sorted(path.parent.glob(f".{glob.escape(path.name)}.tmp-*")):
        if _owner_alive(tmp.name):
            if tmp not in _SAID_ALIVE:  # checked before the work and again when the output is built: said once
                _SAID_ALIVE.add(tmp)
                say(f"note: {tmp} may belong to a conversion still running ({tmp.name.rpartition('.tmp-')[2]}): "
                    "left alone")
            continue
        _remove(tmp)
        say(f"removed {tmp}: left by an interrupted conversion")
    for old in sorted(path.parent.glob(f".{glob.escape(path.name)}.old-*")):
        if _owner_alive(old.name):
            continue
        if not os.path.lexists(path):
            os.replace(old, path)
            say(f"restored {path} from {old}: an interrupted --overwrite had moved it aside")
        else:
            _remove(old)  # a symbolic link target was moved aside as the link: only the link goes
            say(f"removed {old}: the previous output an interrupted --overwrite had replaced")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare_target(path: str | Path, overwrite: bool, sources: Iterable[str | Path | None] = (),
                   say: Callable[[str], None] = _stderr) -> Path:
    """`path` made absolute, with an interrupted conversion's leftovers beside it cleaned up (said) and
    `check_target` passed for a renamed output: before any heavy work, and again in `atomic_output_dir` (a refused
    run cleans the leftovers too, which no one else would)."""
    given, path = Path(path), Path(os.path.abspath(path))  # `.` or `..` has no name to build a sibling's from
    clean_leftovers(path, say)
    check_target(given, overwrite, sources, renamed=True)  # its lines name the path as the user gave it
    return path


@contextmanager
def atomic_output_dir(path: Path, overwrite: bool, needed: int | None = None, say: Callable[[str], None] = _stderr,
                      sources: Iterable[str | Path | None] = ()):
    """Yield a temporary sibling directory (`.NAME.tmp-HOST-PID`); on success it replaces `path`, on failure it is
    removed. Leftovers of an interrupted run are removed first (said); `path` is checked with `check_target`
    (`sources`: what the command reads); a full disk is one CheckpointError line (`needed`: the bytes the output
    takes, about).

    Without `overwrite` the finished output is renamed into place only if `path` is still absent or an empty
    directory (one atomic rename): a target created meanwhile is left as it is, and the output is kept beside it
    (`NAME.new-HOST-PID`, named in the CheckpointError). With `overwrite` an existing target is moved aside first and
    deleted only once the new one is in place; a symbolic link is replaced itself, what it points to is untouched."""
    path = prepare_target(path, overwrite, sources, say)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot create its directory {path.parent} ({_first_line(e)})") from None
    if needed and free_bytes(path.parent) < needed:
        raise CheckpointError(no_space_message(str(path), path.parent, needed))
    me = owner_name()
    tmp = path.parent / f".{path.name}.tmp-{me}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as e:
        inside = (f"; the output is built beside {path.name} and renamed into place, so give a directory inside "
                  f"it, e.g. {path / 'model'}" if path.is_dir() and os.access(path, os.W_OK | os.X_OK) else "")
        raise CheckpointError(f"{path}: cannot write in {path.parent} ({_first_line(e)}){inside}") from None
    try:
        yield tmp
    except BaseException as e:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
        except KeyboardInterrupt:  # pressed again
            raise Interrupted(f"{path} was not written (nothing of it changed; its partial output {tmp.name} is "
                              "removed by the next conversion into it)") from None
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(f"{path} was not written (nothing of it changed; its partial output is removed)") from None
        if isinstance(e, Exception) and not isinstance(e, CheckpointError) and is_no_space(e, path.parent):
            raise CheckpointError(no_space_message(str(path), path.parent, needed)) from None
        raise
    if not overwrite:
        try:
            os.replace(tmp, path)  # fails unless the target is absent or an empty directory: nothing of it is lost
            return
        except OSError as e:
            if not os.path.lexists(path):
                shutil.rmtree(tmp, ignore_errors=True)
                raise CheckpointError(f"{path}: cannot move the finished output into place ({_first_line(e)})") from None
        kept = path.parent / f"{path.name}.new-{me}"  # not a `.NAME.tmp-*` name, which the next run would remove
        try:
            os.replace(tmp, kept)
        except OSError:
            kept = tmp
        raise CheckpointError(f"{path}: was created while the conversion ran and is not empty: left as it is; the "
                              f"finished output is in {kept} (move it, or convert again with --overwrite)")
    old, interrupted = None, False
    try:
        if os.path.lexists(path):
            old = path.parent / f".{path.name}.old-{me}"
            os.replace(path, old)
        os.replace(tmp, path)
    except KeyboardInterrupt:  # (once the second rename returned, the new output is in place: gone on below)
        if os.path.lexists(tmp) or not os.path.lexists(path):
            _put_back(path, old, tmp)
            raise Interrupted(f"{path} was not replaced (the previous output is back in place; the new one is "
                              "removed)") from None
        interrupted = True
    except BaseException as e:  # OSError (or another failure) in the renames
        _put_back(path, old, tmp)
        if not isinstance(e, OSError):
            raise
        raise CheckpointError(f"{path}: cannot move the finished output into place ({_first_line(e)})") from None
    if old is not None:
        try:
            _remove(old)
        except KeyboardInterrupt:
            raise Interrupted(f"{path} is written (the new output is in place; what is left of the previous one, "
                              f"{old.name}, is removed by the next conversion into it)") from None
    if interrupted:
        raise Interrupted(f"{path} is written (the new output is in place"
                          f"{'; the previous one is removed' if old is not None else ''})")


def _put_back(path: Path, old: Path | None, tmp: Path) -> None:
    """After a failed swap: the previous output back in place (else the next run's clean-up puts it back), the new
    one removed."""
    if old is not None and os.path.lexists(old) and not os.path.lexists(path):
        try:
            os.replace(old, path)
        except OSError:
            pass
    shutil.rmtree(tmp, ignore_errors=True)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C inside `atomic_output_dir`; its message says what became of the output (one line)."""
