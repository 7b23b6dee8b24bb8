"""What the user sees: one-line errors and exit codes, output under any encoding, Ctrl-C and SIGTERM, progress bars."""
import codecs
import contextlib
import functools
import os
import signal
import sys
import threading
from typing import Callable, Optional


class UserError(Exception):
    """A mistake in the user's data, files or flags: reported in one line, exit code 2."""


class ProcessError(UserError):
    """A mistake that one process may meet and the others not: every process that meets it reports it
    (a mistake every process meets alike is reported by rank 0 alone)."""


class NonFiniteLoss(ProcessError):
    """The training loss became inf or nan: the run stops, its last good state kept."""


def exits_cleanly(main: Callable) -> Callable:
    """UserError -> 'error: <message>' on stderr, exit code 2, no traceback; Ctrl-C or SIGTERM -> one line, exit
    code 130; any terminal encoding prints (``printable_output``); a closed pipe (``| head -1``) exits 141 quietly.
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
    """Where '±' cannot be encoded (an ASCII terminal, PYTHONIOENCODING=ascii), print '+-' (ASCII_FALLBACK)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            '±'.encode(getattr(stream, 'encoding', None) or 'ascii')
        except (UnicodeEncodeError, LookupError):
            if hasattr(stream, 'reconfigure'):
                stream.reconfigure(errors='glofa-fallback')


_unstarted: list = []  # what a start that fails takes back (an empty run identity file, see runs.lock_run)


def on_failed_start(undo: Callable[[], None]) -> None:
    """Register ``undo`` to run when the entry point ends in an error or an interrupt (exit code not 0)."""
    _unstarted.append(undo)


def undo_unstarted() -> None:
    while _unstarted:
        _unstarted.pop()()


_interrupts: list = []  # the signals interrupt_on_sigterm's handler has turned into KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """SIGTERM (a cluster's preemption or time limit; torchrun passes it on) as Ctrl-C: a KeyboardInterrupt in the
    main thread, so a requeued job resumes. Both are recorded, so that ``interrupted()`` tells the errors in an
    interrupt's wake (a collective's peer gone, a stopped loader worker) from real ones."""
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
    """While an interrupted process reports and exits: no second KeyboardInterrupt (a terminal and torchrun may
    both send one), nothing from loader workers stopped by the same signal."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, 'SIGCHLD'):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sys.unraisablehook = lambda unraisable: None


@contextlib.contextmanager
def exit_on_interrupt(message: Callable[[], str], report: bool = True):
    """Ctrl-C or SIGTERM inside the block (or an error in its wake) ends the process: exit code 130 and
    ``message()`` on stderr when ``report`` (rank 0 of several processes)."""
    try:
        yield
    except BaseException as error:
        if isinstance(error, SystemExit) or not (isinstance(error, KeyboardInterrupt) or interrupted()):
            raise
        quieten_teardown()  # already done by the signal handler; not by a KeyboardInterrupt raised in-process
        if report:
            print('\n' + message(), file=sys.stderr)
        sys.exit(130)


@contextlib.contextmanager
def flag_hint(flags: str):
    """A UserError inside gets the flags that choose what it names: '...; see --data_path'."""
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


class _Lines:
    """Progress off a terminal (a log, a notebook, a cluster job): each refresh one plain line."""

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
    """A tqdm bar (rate, ETA) on stderr; off a terminal, one plain line per PLAIN_PROGRESS_INTERVAL, none before."""
    from tqdm import tqdm
    if not sys.stderr.isatty() and 'file' not in kwargs:
        kwargs.update(file=_Lines(sys.stderr), mininterval=PLAIN_PROGRESS_INTERVAL,
                      maxinterval=PLAIN_PROGRESS_INTERVAL, delay=PLAIN_PROGRESS_INTERVAL, dynamic_ncols=False, ncols=100)
    return tqdm(*args, **kwargs)
