"""--tensorboard: TensorBoard's writer (an optional package), opened only when the flag is given."""
from base.console import UserError


def tensorboard_writer_class():
    """torch's SummaryWriter, or one line with the install command when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError('--tensorboard needs the tensorboard package: pip install tensorboard (or drop --tensorboard; '
                        'the JSON log and scripts/plot_curves.py have the same figures)') from None
    except Exception as error:  # noqa: BLE001 (an install that breaks on import: a version that does not fit)
        raise UserError(f'--tensorboard: the tensorboard package fails on import ({type(error).__name__}: '
                        f'{str(error).strip().splitlines()[0] if str(error).strip() else ""}); reinstall it with pip '
                        f'install --upgrade tensorboard, or drop --tensorboard') from None
    return SummaryWriter


def open_writer(save_dir: str, name: str, done: int):
    """A writer under <save_dir>/tensorboard/<name> that continues after the saved state: events of later steps,
    written by an interrupted process after its last save, are dropped (purge_step), so a resumed run has each
    step once."""
    import os
    folder = os.path.join(save_dir, 'tensorboard', name)
    writer = tensorboard_writer_class()(folder, purge_step=done + 1)
    print(f'TensorBoard: tensorboard --logdir {os.path.join(save_dir, "tensorboard")} (this run: {folder})')
    return writer
