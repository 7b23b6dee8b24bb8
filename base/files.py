"""Files written whole or not at all (temporary file, fsync, rename), the output folder, the JSON-lines logs."""
import contextlib
import json
import os
import tempfile
from typing import Callable

from base.console import UserError, writing


def check_output_folder(path: str, flag: str) -> None:
    """Before any work: ``path`` is a folder this process can write into (created if missing)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f'{flag} {path} is a file, not a folder')
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix='.write-test-')
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        raise UserError(f'{flag} {path} cannot be written ({error.strerror or error})') from None


_UMASK = os.umask(0)

os.umask(_UMASK)


def atomic_write(path: str, write: Callable, binary: bool = True) -> None:
    """Write ``path`` whole or not at all: ``write(file)`` fills a new temporary file of an unpredictable name in
    the same folder (created exclusively: a planted link is never followed), which is fsynced, then renamed over
    ``path`` (a link at ``path`` is replaced, never written through)."""
    folder = os.path.dirname(os.path.abspath(path))
    with writing(path):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.part')
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # as an ordinary new file
            with os.fdopen(fd, 'wb') if binary else os.fdopen(fd, 'w', encoding='utf-8', newline='') as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


def write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def append_log(path: str, entry: dict) -> None:
    """One JSON line more in the run's log."""
    with writing(path), open(path, 'a') as log:
        log.write(json.dumps(entry) + '\n')


def trim_log(path: str, key: str, last: int) -> None:
    """Keep the lines of a JSON-lines log whose ``key`` is at most ``last`` (none for a new run);
    a line cut short by a crash is dropped."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get(key, 0) <= last:
                    kept.append(line)
            except (ValueError, AttributeError):
                pass
    with open(path, 'w') as f:
        f.writelines(kept)
