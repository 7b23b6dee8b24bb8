"""Files written whole or not at all (temporary file, fsync, rename), the output folder, the JSON-lines logs."""
import contextlib
import json
import os
import stat
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


TEMPORARY_SUFFIX = len('..') + 8 + len('.part')  # what atomic_write's temporary name adds to the file name


def check_file_name(path: str, flag: str) -> None:
    """Before any work, that ``path`` can be written as a file here (one line naming ``flag`` otherwise): a file
    name, not a folder or a name ending in a separator; short enough for its temporary name (``atomic_write``);
    nothing there, or a regular file (a pipe or a device is never read or replaced); '-' is not standard output."""
    if path == '-':
        raise UserError(f'{flag} -: the output is written to a file, not to standard output; give a file name')
    if path.endswith(('/', os.sep)) or os.path.isdir(path):
        raise UserError(f'{flag} {path} is a folder, not a file name: give a file name, e.g. '
                        f'{os.path.join(path, "out.json")}')
    name = os.path.basename(path)
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        limit = os.pathconf(folder, 'PC_NAME_MAX')
    except (OSError, ValueError, AttributeError):
        limit = 255
    if len(os.fsencode(name)) + TEMPORARY_SUFFIX > limit:
        raise UserError(f'{flag} {path}: the file name is {len(os.fsencode(name))} bytes long, and this folder takes '
                        f'{limit - TEMPORARY_SUFFIX} at most (the file is first written under a longer temporary '
                        f'name): choose a shorter name')
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise UserError(f'{flag} {path} is not a regular file (a pipe, a device or a socket): the output is written '
                        f'whole to a file; give a file name')


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
