"""Small helpers shared by the entry points: errors, seeding, devices, reporting."""
import codecs
import contextlib
import ctypes
import functools
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Callable, Optional, Sequence

import numpy as np
import torch


class UserError(Exception):
    """A mistake in the user's data, files or flags: reported in one line, exit code 2."""


class ProcessError(UserError):
    """A mistake that one process may meet and the others not: every process that meets it reports it
    (a mistake every process meets alike is reported by rank 0 alone)."""


class NonFiniteLoss(ProcessError):
    """The training loss became inf or nan: the run stops, its last good state kept."""


def exits_cleanly(main: Callable) -> Callable:
    """Turn UserError into 'error: <message>' on stderr and exit code 2, without a traceback; Ctrl-C (or
    SIGTERM, with interrupt_on_sigterm) anywhere else into one line and exit code 130. Output prints
    whatever the terminal's encoding (``printable_output``), and a closed pipe (``... | head -1``) ends the
    process quietly with exit code 141, as a program stopped by SIGPIPE.
    (A UserError met in a DataLoader worker reaches the main process as one too: see dataloader.iterate.)
    """
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        printable_output()
        try:
            try:
                try:
                    result = main(*args, **kwargs)
                    _unstarted.clear()  # started: nothing to take back
                    sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
                    return result
                except UserError as error:
                    print(f'error: {(str(error).strip().splitlines() or [type(error).__name__])[0]}', file=sys.stderr)
                    sys.exit(2)
                except KeyboardInterrupt:  # a phase without its own message (exit_on_interrupt gives the others)
                    quieten_teardown()
                    print('\ninterrupted; every file is written whole or not at all, so nothing half-written is left',
                          file=sys.stderr)
                    sys.exit(130)
            except SystemExit as stop:
                if stop.code not in (0, None):
                    undo_unstarted()
                sys.stdout.flush()
                raise
        except BrokenPipeError:
            undo_unstarted()
            for stream in (sys.stdout, sys.stderr):  # what is left to print goes nowhere, silently
                try:
                    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
                except (OSError, ValueError, AttributeError):
                    pass
            sys.exit(141)
    return wrapper


# characters of the output that an ASCII terminal lacks, and what it shows instead
ASCII_FALLBACK = {'±': '+-', '—': '-', '–': '-', '…': '...', '×': 'x', '≥': '>=', '≤': '<=', '→': '->', '·': '.'}


def _fallback(error: UnicodeEncodeError) -> tuple[str, int]:
    text = error.object[error.start:error.end]
    return ''.join(ASCII_FALLBACK.get(c, '?') for c in text), error.end


codecs.register_error('glofa-fallback', _fallback)


def printable_output() -> None:
    """Make stdout and stderr print every line whatever their encoding: where '±' cannot be encoded (an ASCII or
    legacy code-page terminal, PYTHONIOENCODING=ascii), it prints as '+-' (ASCII_FALLBACK), never an error."""
    for stream in (sys.stdout, sys.stderr):
        try:
            '±'.encode(getattr(stream, 'encoding', None) or 'ascii')
        except (UnicodeEncodeError, LookupError):
            if hasattr(stream, 'reconfigure'):
                stream.reconfigure(errors='glofa-fallback')


_unstarted: list = []  # what a start that fails takes back (an empty run identity file, see runs.RunLock)


def on_failed_start(undo: Callable[[], None]) -> None:
    """Register ``undo`` to run when the entry point ends in an error or an interrupt (exit code not 0)."""
    _unstarted.append(undo)


def undo_unstarted() -> None:
    while _unstarted:
        _unstarted.pop()()


_interrupts: list = []  # the signals interrupt_on_sigterm's handler has turned into KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """Treat SIGTERM like Ctrl-C: raise KeyboardInterrupt in the main thread.

    Clusters stop a job with SIGTERM (preemption, time limit) and torchrun passes it on to its
    processes; an entry point that saves and exits cleanly on Ctrl-C then does the same on SIGTERM,
    so a requeued job can resume. Both signals are recorded, so that ``interrupted()`` tells the errors
    an interrupt causes in its wake (a collective whose peer has gone, a loader worker stopped by the
    same signal) from real ones. Only the main thread may set handlers: elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    _interrupts.clear()

    def handler(signum, frame):
        _interrupts.append(signum)
        quieten_teardown()  # from here on the process only saves what it has and exits
        raise KeyboardInterrupt(f'signal {signal.Signals(signum).name}')

    signal.signal(signal.SIGTERM, handler)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, handler)


def interrupted() -> bool:
    """Whether Ctrl-C or SIGTERM arrived since ``interrupt_on_sigterm``."""
    return bool(_interrupts)


def quieten_teardown() -> None:
    """While an interrupted process reports and exits: no second KeyboardInterrupt (a terminal and
    torchrun may both send one), and nothing from DataLoader workers stopped by the same signal (torch's
    SIGCHLD check, the teardown of loaders collected on the way out)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, 'SIGCHLD'):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sys.unraisablehook = lambda unraisable: None


@contextlib.contextmanager
def exit_on_interrupt(message: Callable[[], str], report: bool = True):
    """Ctrl-C or SIGTERM inside the block (or an error in its wake: a loader worker or a collective's peer
    stopped by the same signal) ends the process with exit code 130 and one line, ``message()``, on stderr
    (when ``report``: rank 0 of several processes). What was saved before stays as it is."""
    try:
        yield
    except BaseException as error:
        if isinstance(error, SystemExit) or not (isinstance(error, KeyboardInterrupt) or interrupted()):
            raise
        quieten_teardown()  # already done by the signal handler; not by a KeyboardInterrupt raised in-process
        if report:
            print('\n' + message(), file=sys.stderr)
        sys.exit(130)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices); make cuDNN deterministic."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def random_states() -> dict:
    """The global random states of Python, NumPy and torch (CPU and every CUDA device)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()  # NumPy's key as a tensor: weights_only loads it
    return {'python': random.getstate(), 'numpy': [kind, torch.from_numpy(keys.astype(np.int64)), int(position),
                                                   int(has_gauss), float(cached)],
            'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_random_states(states: dict) -> None:
    """Restore what ``random_states`` returned (the CUDA states when the machine has as many devices)."""
    random.setstate(states['python'])
    kind, keys, *rest = states['numpy']  # a tensor key, or an array in states saved before
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))
    torch.set_rng_state(states['torch'])
    if states['cuda'] and torch.cuda.is_available() and len(states['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states['cuda'])


@contextlib.contextmanager
def flag_hint(flags: str):
    """A UserError inside (a file, class or size at fault, from the data layer) gets the flags that
    choose it added, e.g. '...; see --data_path'."""
    try:
        yield
    except UserError as error:
        raise type(error)(f'{error}; see {flags}') from None


@contextlib.contextmanager
def writing(path: str):
    """A failure to write ``path`` (a full disk, a read-only folder) becomes one line naming it."""
    try:
        yield
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        if isinstance(error, RuntimeError) and not any(w in str(error).lower() for w in ('writ', 'inline_container', 'unexpected pos')):
            raise
        reason = error.strerror if isinstance(error, OSError) and error.strerror else 'the write was cut short'
        raise UserError(f'cannot write {path} ({reason}); is the disk full? Files written before are kept') from None


def too_large(error: Exception) -> Optional[str]:
    """PIL's refusal of an image whose header claims more pixels than its limit (a decompression bomb), in words."""
    from PIL import Image
    if isinstance(error, Image.DecompressionBombError):
        return f'its header claims more pixels than PIL reads ({str(error).split(" pixels")[0].split("(")[-1]} pixels)'
    return None


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


# Every JSON file and picture the programs write carries this mark (a CSV, its header): an existing file
# with it is theirs to replace; any other existing file is replaced only with --overwrite.
OUTPUT_MARK = 'GLoFA-reproduction'
FOLDER_MARK = '.glofa-output'  # in a folder of outputs (a study's --out): the folder is the programs'
PICTURE_FORMATS = {'.png': 'Software', '.pdf': 'Creator', '.svg': 'Creator'}  # and the metadata key of the mark


def carries_mark(path: str, mark: str = OUTPUT_MARK) -> bool:
    try:
        with open(path, 'rb') as f:
            return mark.encode() in f.read(1 << 24)
    except OSError:
        return False


def check_output(path: str, flag: str, inputs: Sequence[str] = (), overwrite: Optional[bool] = None,
                 formats: Optional[Sequence[str]] = None, mark: str = OUTPUT_MARK) -> None:
    """The one rule for a file a program writes, checked before any work (one line naming ``flag`` and the path
    otherwise): not one of the command's ``inputs`` (the same file by any name, a link too); a
    file name ending in one of ``formats`` when given; new, or written by these programs (it carries ``mark``), or
    ``overwrite`` (the command's --overwrite; None for a command without one); its folder writable."""
    if formats and os.path.splitext(path)[1].lower() not in formats:
        raise UserError(f'{flag} {path}: expected a file ending in {" or ".join(formats)}')
    if os.path.exists(path):  # the same file as an input, by any name (a link, a hard link)
        target = os.stat(path)
        for given in inputs:
            try:
                info = os.stat(given)
            except (OSError, TypeError, ValueError):
                continue
            if (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino):
                raise UserError(f'{flag} {path} is an input of this command ({given}): refused, nothing written '
                                f'(choose another file)')
    if os.path.isdir(path):
        raise UserError(f'{flag} {path} is a folder: give a file name, e.g. {os.path.join(path, "out" + (formats or [".json"])[0])}')
    if os.path.lexists(path) and not overwrite and not carries_mark(path, mark):
        instead = 'remove it first' if overwrite is None else 'add --overwrite'
        raise UserError(f'{flag} {path} exists and was not written by this program: refused, so nothing of yours is '
                        f'replaced (choose another file, or {instead})')
    check_output_folder(os.path.dirname(path) or '.', flag)


def claim_output_folder(path: str, flag: str) -> None:
    """Before any work: ``path`` is a new or empty folder, or one a program of this repository made (it holds
    FOLDER_MARK), and can be written; it is marked as theirs. Anything else is refused, naming it."""
    mark = os.path.join(path, FOLDER_MARK)
    if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(mark):
        raise UserError(f'{flag} {path} is not empty and was not made by this program (no {FOLDER_MARK} file): '
                        f'refused, so nothing of yours is replaced; choose a new or empty folder')
    check_output_folder(path, flag)
    if not os.path.isfile(mark):
        atomic_write(mark, lambda f: f.write(OUTPUT_MARK + '\n'), binary=False)


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


def write_json(path: str, obj: dict) -> None:
    """A JSON output, atomically, carrying OUTPUT_MARK (under 'written_by')."""
    atomic_write(path, lambda f: json.dump({**obj, 'written_by': OUTPUT_MARK}, f, indent=1), binary=False)


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


def keep_freed_memory() -> None:
    """Let the C allocator keep freed memory for the next tensors instead of handing it back to the system.

    glibc maps every block over 32 MiB afresh and unmaps it when it is freed, so on the CPU the activations of
    each episode (a Conv-4 episode's first layer alone is 100 MB) were faulted in page by page every time:
    40 % of a training step's CPU time went to the kernel. No number changes, only where memory comes from;
    the process keeps its peak memory until it ends. Nothing is done where the C library is not glibc."""
    try:
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-4, 0)          # M_MMAP_MAX: serve large blocks from the heap, which keeps them when freed
        libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: hand the heap's free top back only beyond 2 GiB
    except (OSError, AttributeError):
        pass


def select_device(device: str, devices: Sequence[int]) -> torch.device:
    """'auto' -> CUDA when present else the CPU; 'cuda' without a GPU is a user error."""
    if device == 'cpu' or (device == 'auto' and not torch.cuda.is_available()):
        return torch.device('cpu')
    if not torch.cuda.is_available():
        raise UserError('--device cuda was given but no CUDA GPU is available (use --device cpu or auto)')
    n = torch.cuda.device_count()
    bad = [d for d in devices if d < 0 or d >= n]
    if bad:
        raise UserError(f'--devices {bad[0]} does not exist: this machine has {n} CUDA device(s), ids 0..{n - 1}')
    return torch.device(f'cuda:{devices[0]}')


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width (1.96 * std / sqrt(n), population std) of the values."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return float('nan'), float('nan')
    return float(a.mean()), float(1.96 * a.std() / math.sqrt(a.size))


def accuracy_line(name: str, accuracies: Sequence[float], n_way: int, n_shot: int) -> str:
    """'test accuracy: 66.12 ± 0.20 % (5-way 1-shot, 10000 episodes)' from per-episode accuracies in [0, 1]."""
    mean, ci = mean_ci(accuracies)
    return (f'{name} accuracy: {100 * mean:.2f} ± {100 * ci:.2f} % '
            f'({n_way}-way {n_shot}-shot, {len(accuracies)} episodes)')


def git_revision() -> str:
    """Short git revision of the code, 'unknown' outside a checkout."""
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5)
        return out.stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def autocast(device: torch.device, enabled: bool):
    """Mixed precision on CUDA: bfloat16 where supported, else float16. A no-op when disabled."""
    if not enabled:
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type='cuda', dtype=dtype)


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      scaler: Optional['torch.amp.GradScaler'] = None, inspect: Optional[Callable[[], None]] = None) -> None:
    """One optimisation step from ``loss``: gradients zeroed, backward, step (through the grad scaler
    of float16 autocast when there is one). ``inspect()`` runs between backward and step, on the gradients
    of the loss (unscaled first under the grad scaler)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if inspect is not None:
            scaler.unscale_(optimizer)
            inspect()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if inspect is not None:
            inspect()
        optimizer.step()


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A batch of images on ``device`` (asynchronously from pinned memory), channels-last if asked."""
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


class _Lines:
    """Where progress bars write when stderr is not a terminal (a log file, a notebook, a cluster job): each
    refresh becomes one plain line instead of a carriage return."""

    def __init__(self, stream):
        self.stream = stream

    @property
    def encoding(self) -> Optional[str]:
        return getattr(self.stream, 'encoding', None)

    def write(self, text: str) -> None:
        text = text.replace('\r', '').strip()
        if text:
            self.stream.write(text + '\n')

    def flush(self) -> None:
        self.stream.flush()


# off a terminal, a bar shows after this many seconds and then at most once per interval
PLAIN_PROGRESS_INTERVAL = 30.0


def progress(*args, **kwargs):
    """A tqdm progress bar (rate, ETA) on stderr. When stderr is not a terminal, a few plain lines instead:
    none for a bar that ends within PLAIN_PROGRESS_INTERVAL seconds, then one line per interval."""
    from tqdm import tqdm
    if not sys.stderr.isatty() and 'file' not in kwargs:
        kwargs.update(file=_Lines(sys.stderr), mininterval=PLAIN_PROGRESS_INTERVAL,
                      maxinterval=PLAIN_PROGRESS_INTERVAL, delay=PLAIN_PROGRESS_INTERVAL, dynamic_ncols=False, ncols=100)
    return tqdm(*args, **kwargs)


def save_figure(figure, path: str) -> None:
    """Write a matplotlib figure to ``path`` atomically, carrying OUTPUT_MARK in its metadata (matplotlib is
    imported by the caller); its format is that of the name's extension (PICTURE_FORMATS)."""
    extension = os.path.splitext(path)[1].lower()
    key = PICTURE_FORMATS.get(extension, 'Software')
    atomic_write(path, lambda f: figure.savefig(f, format=extension[1:] or 'png', metadata={key: OUTPUT_MARK}))
