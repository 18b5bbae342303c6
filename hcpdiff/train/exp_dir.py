"""The experiment folder: `exps/<timestamp>/{cfg.yaml, ckpts/, tblog/, train.log}`, and its one-writer lock."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path

from hcpdiff.errors import ConfigError
from hcpdiff.folders import blocking_ancestor, make_folder, os_error_reason

logger = logging.getLogger("hcpdiff.train")

LOCK_NAME = ".hcpdiff.lock"  # {"pid": ..., "host": ...} of the process writing the folder
TEMP_NAME = re.compile(r"^.+\.tmp-(\d+)$")  # atomic writes in progress: <file>.tmp-<pid> (state_io, state)
OUTPUT_FOLDERS = ("ckpts", "state", "preview")  # what a run produces; the rest (cfg, logs) is set-up
MAX_SUFFIX = 10_000  # -1, -2, ... tried before giving up (a folder of 10k runs of one name is a mistake)


def claim_exp_dir(requested: str | os.PathLike, key: str = "exp_dir") -> Path:
    """Create and return a new experiment folder; an existing one is never reused (suffix -1, -2, ...)."""
    base = Path(requested)
    # The parent is made first, so a dangling link or a file in the way is one error and not an endless retry
    # of names (each mkdir of a child under a dangling link says "exists").
    make_folder(base.parent, key)
    for suffix in range(MAX_SUFFIX):
        candidate = base if suffix == 0 else base.with_name(f"{base.name}-{suffix}")
        try:
            candidate.mkdir(exist_ok=False)
            return candidate
        except FileExistsError:
            continue
        except OSError as err:
            raise ConfigError(f"{key}: cannot create folder '{candidate}': "
                              f"{blocking_ancestor(candidate) or os_error_reason(err)}") from err
    raise ConfigError(f"{key}: '{base}' and its {MAX_SUFFIX - 1} suffixed names all exist; choose another exp_dir")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def read_lock(lock: Path) -> dict:
    """The holder recorded in a lock file ({} when unreadable)."""
    try:
        holder = json.loads(lock.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def lock_exp_dir(exp_dir: Path) -> Path:
    """Make this process the folder's one writer: create its lock file atomically, or refuse naming the holder.

    A lock left by a process that is gone (same host, pid not running) is taken over with a warning.
    """
    lock = exp_dir / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for attempt in range(2):
        temp = exp_dir / f"{LOCK_NAME}.tmp-{os.getpid()}"
        try:
            temp.write_text(json.dumps(me))
            os.link(temp, lock)  # atomic: fails when a lock exists, and a lock is never seen half-written
            return lock
        except FileExistsError:
            pass
        except OSError as err:
            raise ConfigError(f"exp_dir: cannot write the lock file in '{exp_dir}': {os_error_reason(err)}") from err
        finally:
            temp.unlink(missing_ok=True)
        holder = read_lock(lock)
        pid, host = holder.get("pid"), holder.get("host")
        if attempt == 0 and host == me["host"] and isinstance(pid, int) and not pid_alive(pid):
            logger.warning("%s: taking over the lock of process %d, which is no longer running", exp_dir, pid)
            lock.unlink(missing_ok=True)
            continue
        where = f"process {pid} on {host}" if holder else "another process"
        raise ConfigError(f"exp_dir: '{exp_dir}' is being written by {where} (lock file '{lock}'); wait for it to "
                          "end, or delete the lock file if that run is gone")
    raise AssertionError("unreachable")  # pragma: no cover


def unlock_exp_dir(lock: Path) -> None:
    """Remove this process's lock file (one held by another process is left alone)."""
    if read_lock(lock).get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


def remove_stale_temp_files(exp_dir: Path) -> list[Path]:
    """Delete `*.tmp-<pid>` files left by killed runs (pid no longer running) in ckpts/ and state/."""
    removed = []
    for folder in (exp_dir / "ckpts", exp_dir / "state"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = TEMP_NAME.match(path.name)
            if match and path.is_file() and not pid_alive(int(match.group(1))):
                path.unlink(missing_ok=True)
                removed.append(path)
    if removed:
        logger.info("removed %d unfinished file(s) of a killed run: %s", len(removed),
                    ", ".join(str(p) for p in removed[:3]) + (", ..." if len(removed) > 3 else ""))
    return removed


def holds_outputs(exp_dir: Path) -> bool:
    """Whether a run wrote any checkpoint, state or preview into the folder."""
    return any(folder.is_dir() and any(folder.iterdir()) for folder in (exp_dir / sub for sub in OUTPUT_FOLDERS))


def remove_if_no_outputs(exp_dir: Path) -> bool:
    """Delete a folder this run created when it holds no outputs (a run that failed early); True if removed."""
    if not exp_dir.is_dir() or holds_outputs(exp_dir):
        return False
    shutil.rmtree(exp_dir, ignore_errors=True)
    return True
