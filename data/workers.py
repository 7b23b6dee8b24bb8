"""Loader worker processes (--n_workers above 0): a refusal or a note met in a worker reaches the main process
as data, and Ctrl-C and SIGTERM stop the workers without noise."""
import multiprocessing
import signal
import sys
from typing import Iterator, NamedTuple

from torch.utils.data import DataLoader, Dataset, default_collate

from data.splits import say_notes
from base.console import UserError


class Noted(NamedTuple):
    """An item and a note about it (``data.splits.small_image_note``), carried to the main process."""
    item: tuple
    key: str
    note: str


class Failure(NamedTuple):
    """A UserError met while reading an item, carried as data: a worker's exceptions reach the main process as
    traceback text, its results intact."""
    message: str


class Reported(Dataset):
    """What a worker reads: ``dataset``'s items, or the Failure of the first item that cannot be read."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        try:
            x, label, note = self.dataset.read(item)
        except UserError as error:
            return Failure(str(error))
        return Noted((x, label), self.dataset.location, note) if note else (x, label)


def collate(items: list):
    """The batch of ``items`` (with a third element, the notes, when any item has one), or the first Failure."""
    failure = next((item for item in items if isinstance(item, Failure)), None)
    if failure is not None:
        return failure
    notes = [(item.key, item.note) for item in items if isinstance(item, Noted)]
    batch = default_collate([item.item if isinstance(item, Noted) else item for item in items])
    return [*batch, notes] if notes else batch


def iterate(loader: DataLoader) -> Iterator:
    """The loader's batches; a Failure read in any process is raised here, as the UserError it was.

    Ctrl-C and SIGTERM are held back while worker processes start: they are delivered just after, to
    the main process (a KeyboardInterrupt raised during a fork can be lost). So is SIGCHLD, the news
    that another loader's worker died (torch's check raises on it, which inside a fork's callbacks
    only prints a traceback). The workers inherit the block; ``ignore_interrupts`` ignores Ctrl-C
    there and lets SIGTERM and SIGCHLD in again."""
    if not hasattr(signal, 'pthread_sigmask'):
        return RaiseFailures(iter(loader))
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGCHLD} if loader.worker_init_fn is ignore_interrupts \
        else {signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        return RaiseFailures(iter(loader))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class RaiseFailures:
    """The loader's iterator with each Failure raised. An object, not a generator: a generator stopped
    by Ctrl-C would drop the loader's iterator at once, whose workers' teardown then reports the same
    signal before the entry point's handler has quietened it."""

    def __init__(self, batches: Iterator):
        self.batches = batches

    def __iter__(self) -> 'RaiseFailures':
        return self

    def __next__(self):
        batch = next(self.batches)
        if isinstance(batch, Failure):
            raise UserError(batch.message)
        if len(batch) == 3:  # images, labels, notes
            say_notes(batch[2])
            batch = batch[:2]
        return batch


def ignore_interrupts(worker_id: int) -> None:
    """Workers leave Ctrl-C to the main process, which saves, stops them and exits cleanly. SIGTERM is
    let in again (torch's handler in the worker exits quietly when the main process stops it), and so
    is SIGCHLD, which ``iterate`` held back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, 'pthread_sigmask'):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGCHLD})
    sys.excepthook = quiet_when_the_main_process_exits


def quiet_when_the_main_process_exits(*exc_info) -> None:
    """A worker's helper thread (the one that hands a batch's memory to the main process) fails when the
    main process exits in the middle of a transfer, as it does after Ctrl-C or SIGTERM: nothing to
    report then. Any other uncaught error is printed as usual."""
    parent = multiprocessing.parent_process()
    if parent is None or not multiprocessing.connection.wait([parent.sentinel], timeout=1):
        sys.__excepthook__(*exc_info)
