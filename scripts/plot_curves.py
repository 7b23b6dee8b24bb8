"""Plot a run's training loss and validation accuracy: python scripts/plot_curves.py --stat RUN.stat.

For GLoFA, also the adaptors' strengths at each validation (from the log) and in training, every episode:
alpha_task, alpha_cls, h(S) before the relu and the gradient norm reaching h (from the statistics file).

Instead of --stat, the run's own flags (those of train.py, e.g. --N 5 --K 1 --save_dir saves) name
the statistics file. The x axis counts training episodes: taken from the JSON-lines log beside the
statistics file when it has one entry per validation, else (i + 1) * --episode_gap.
A pretraining log of pretrain.py is plotted against epochs: --log <save_dir>/pretrained/NAME.log.jsonl.
"""
import argparse
import json
import os
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from harness import finding, runs  # noqa: E402
from arguments import parse_args  # noqa: E402
from harness.checkpoints import read_file  # noqa: E402
from base.console import UserError, exits_cleanly  # noqa: E402
from harness.outputs import PICTURE_FORMATS, check_output, save_figure  # noqa: E402

STAT_SUFFIX = '.stat'


def get_parser() -> argparse.ArgumentParser:
    """This script's own flags; every other flag is train.py's and picks the run."""
    p = argparse.ArgumentParser(
        description="Plot the training loss and validation accuracy of a run into one PNG.",
        epilog="Any other flag is one of train.py's (python train.py --help): without --stat, they "
               "name the run whose statistics are plotted, e.g. --N 5 --K 1 --save_dir saves.",
        allow_abbrev=False)
    p.add_argument('--stat', type=str, default=None,
                   help="statistics file written by train.py (saves/statistics/<run>.stat); default: the run's")
    p.add_argument('--episode_gap', type=int, default=None,
                   help="training episodes between two validations, for files without a log "
                        "(default: train.py's, 200)")
    p.add_argument('--log', type=str, default=None,
                   help="a pretraining log written by pretrain.py (<save_dir>/pretrained/<name>.log.jsonl): "
                        "training loss and validation accuracies against epochs")
    p.add_argument('--out', type=str, default=None,
                   help='PNG file to write (default: beside the statistics or the log, <file>.curves.png)')
    p.add_argument('--overwrite', action='store_true',
                   help='replace an existing picture at --out that this script did not write')
    return p


def picture_beside(path: str, suffix: str) -> str:
    """saves/statistics/<run>.stat -> saves/statistics/<run>.curves.png: the picture beside the run's files."""
    return (path[:-len(suffix)] if path.endswith(suffix) else path) + '.curves.png'


def log_path(stat_path: str) -> str:
    base = stat_path[:-len(STAT_SUFFIX)] if stat_path.endswith(STAT_SUFFIX) else stat_path
    return f'{base}.log.jsonl'


def load_statistics(path: str) -> tuple[list[float], list[float]]:
    """(training losses, validation accuracies in [0, 1]) of a statistics file; UserError when unusable."""
    try:
        record = read_file(path, 'statistics file')
    except UserError:
        if not os.path.isfile(path):
            raise
        raise UserError(f'statistics file {path} cannot be read by torch.load (expected the .stat file '
                        f'train.py writes in <save_dir>/statistics/)') from None
    keys = ('training_loss', 'validating_accuracy')
    if not isinstance(record, dict) or not all(isinstance(record.get(k), (list, tuple)) for k in keys):
        raise UserError(f"statistics file {path} is not a statistics record of train.py "
                        f"(expected a dict with lists 'training_loss' and 'validating_accuracy')")
    try:
        losses, accuracies = ([float(v) for v in record[k]] for k in keys)
    except (TypeError, ValueError):
        raise UserError(f'statistics file {path} holds values that are not numbers') from None
    if len(losses) != len(accuracies):
        raise UserError(f'statistics file {path} has {len(losses)} training losses but '
                        f'{len(accuracies)} validation accuracies')
    if not losses:
        raise UserError(f'statistics file {path} holds no validation yet (one is written every --episode_gap episodes)')
    return losses, accuracies


def read_log(path: str, key: str = 'episode') -> list[dict]:
    """The log's entries of the latest run: an entry whose episode (or epoch, ``key``) does not follow
    the previous one (a run started again, or an interval redone after --resume) replaces the entries
    it overlaps."""
    entries = []
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if not isinstance(entry, dict) or not isinstance(entry.get(key), int):
                continue
            while entries and entries[-1][key] >= entry[key]:
                entries.pop()
            entries.append(entry)
    return entries


def episodes_of(stat_path: str, n: int, episode_gap: int) -> tuple[list[int], Optional[list[dict]]]:
    """Episode of each of the n validations, and the matching log entries when the log has them."""
    path = log_path(stat_path)
    if os.path.isfile(path):
        entries = read_log(path)
        if len(entries) == n:
            return [e['episode'] for e in entries], entries
        print(f'note: {path} has {len(entries)} validations, the statistics {n}: episodes computed from '
              f'--episode_gap {episode_gap}')
    return [(i + 1) * episode_gap for i in range(n)], None


TRAINING_KEYS = ('episode', 'alpha_task', 'alpha_cls', 'h_task', 'h_cls', 'grad_h')


def training_episodes(path: str) -> Optional[dict]:
    """GLoFA's per-training-episode record in a statistics file (train.py's 'training_episodes': strengths,
    h(S) before the relu, gradient norm reaching h), or None when the file has none."""
    record = read_file(path, 'statistics file').get('training_episodes')
    if not isinstance(record, dict) or not all(isinstance(record.get(k), (list, tuple)) for k in TRAINING_KEYS):
        return None
    if not record['episode'] or len({len(record[k]) for k in TRAINING_KEYS}) != 1:
        return None
    return record


def draw_training(ax, record: dict) -> None:
    """The adaptors in training, per episode: the strengths, h(S) before the relu, and on a second axis the
    gradient norm reaching h (0 on a dead episode: relu passes none)."""
    episodes = record['episode']
    for key, h, colour in (('alpha_task', 'h_task', 'tab:green'), ('alpha_cls', 'h_cls', 'tab:purple')):
        ax.plot(episodes, record[key], color=colour, linewidth=1, label=f'{key} = relu(h)')
        ax.plot(episodes, record[h], color=colour, linewidth=1, linestyle=':', label=f'h before the relu ({key})')
    ax.axhline(0, color='black', linewidth=0.8)
    ax.set_title('adaptors in training, every episode')
    ax.set_xlabel('training episode')
    ax.set_ylabel('strength, h(S)')
    grad = ax.twinx()
    grad.plot(episodes, record['grad_h'], color='tab:red', linewidth=1, alpha=0.6, label='gradient norm reaching h')
    grad.set_ylabel('gradient norm reaching h')
    grad.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels(), grad.get_legend_handles_labels()
    legend_below(ax, lines[0][0] + lines[1][0], lines[0][1] + lines[1][1])


def legend_below(ax, *handles_labels) -> None:
    """The panel's legend under its axes, clear of the data whatever the curves do."""
    ax.legend(*handles_labels, loc='upper center', bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=7, frameon=False)


def draw_drops(ax_loss, ax_acc, drops: list[int]) -> None:
    """A dotted line at each learning-rate drop, on both panels (one legend entry)."""
    for i, at in enumerate(drops):
        for ax in (ax_loss, ax_acc):
            ax.axvline(at, color='grey', linestyle=':', linewidth=1,
                       label='learning-rate drop' if i == 0 and ax is ax_acc else None)


def draw_curves(x: list, unit: str, losses: list[float], loss_title: str, curves: list[tuple], best: tuple,
                drops: list, title: str, out: str, panels: tuple = ()) -> None:
    """The one figure of both kinds of run, two panels a row: the training loss; the accuracies (``curves``: label,
    values in %, 95 % CI in % or None, colour, line style), the best one starred (``best``: x, value, label), the
    learning-rate drops on both; then each of ``panels`` (a function drawing an axis). Every legend under its panel,
    clear of the data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_axes = 2 + len(panels)
    rows = (n_axes + 1) // 2
    fig = Figure(figsize=(12, 5 * rows), dpi=120, layout='constrained')
    FigureCanvasAgg(fig)
    grid = fig.subplots(rows, 2, squeeze=False).flatten()
    for ax in grid[n_axes:]:
        ax.axis('off')
    ax_loss, ax_acc = grid[:2]
    marker = 'o' if len(x) <= 60 else None
    ax_loss.plot(x, losses, marker=marker, markersize=3, color='tab:blue')
    ax_loss.set_title(loss_title)
    ax_loss.set_ylabel('cross-entropy')
    for label, values, ci, colour, style in curves:
        if ci is not None:
            ax_acc.fill_between(x, [v - c for v, c in zip(values, ci)], [v + c for v, c in zip(values, ci)],
                                color=colour, alpha=0.2)
        ax_acc.plot(x, values, marker=marker if style == '-' else None, markersize=3, color=colour, linestyle=style,
                    label=label)
    ax_acc.plot([best[0]], [best[1]], marker='*', markersize=14, color='tab:red', linestyle='none', label=best[2])
    ax_acc.set_title('accuracy')
    ax_acc.set_ylabel('accuracy (%)')
    draw_drops(ax_loss, ax_acc, drops)
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel(unit)
    for draw_panel, ax in zip(panels, grid[2:]):
        draw_panel(ax, marker)
    for ax in grid[:n_axes]:
        ax.grid(alpha=0.3)
    legend_below(ax_acc)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, out)


def draw(losses: list[float], accuracies: list[float], episodes: list[int], entries: Optional[list[dict]],
         title: str, out: str, training: Optional[dict] = None) -> None:
    """A meta-training run: training loss and validation accuracy (%) against episodes, the adaptors' strengths at
    each validation when the log has them, and their record in training (``training``, per episode) when given."""
    percent = [100 * a for a in accuracies]
    ci = ([100 * e['validating_ci'] for e in entries] if entries is not None
          and all(isinstance(e.get('validating_ci'), (int, float)) for e in entries) else None)
    best = max(range(len(percent)), key=lambda i: (percent[i], -i))  # the first best, as train.py keeps it
    # 'lr' is the rate after the validation's scheduler step: it dropped at e's episode
    drops = [e['episode'] for prev, e in zip(entries, entries[1:]) if e.get('lr') != prev.get('lr')] if entries else []
    panels = []
    if entries is not None and all(isinstance(e.get('alpha_task'), (int, float)) for e in entries):
        def strengths(ax, marker):
            for key, colour in (('alpha_task', 'tab:green'), ('alpha_cls', 'tab:purple')):
                ax.plot(episodes, [e[key] for e in entries], marker=marker, markersize=3, color=colour,
                        label=f'{key} (mean over the validation episodes)')
            ax.set_title('adaptor strengths relu(h(S)); 0 = adaptor switched off')
            ax.set_xlabel('training episode')
            ax.set_ylabel('strength')
            legend_below(ax)
        panels.append(strengths)
    if training is not None:
        panels.append(lambda ax, marker: draw_training(ax, training))
    draw_curves(episodes, 'training episode', losses, 'training loss (mean over each interval)',
                [('validation accuracy (95 % CI shaded)', percent, ci, 'tab:orange', '-')],
                (episodes[best], percent[best], f'best {percent[best]:.2f} % (episode {episodes[best]})'), drops,
                title, out, tuple(panels))


PRETRAINING_KEYS = ('loss', 'train_accuracy', 'val_cosine', 'val_euclidean')


def read_pretraining_log(path: str) -> list[dict]:
    """The validations of pretrain.py's log (latest run), each with epoch, loss and accuracies."""
    if not os.path.isfile(path):
        raise UserError(f'log {path} not found')
    entries = [e for e in read_log(path, 'epoch') if all(isinstance(e.get(k), (int, float)) for k in PRETRAINING_KEYS)]
    if not entries:
        raise UserError(f"log {path} holds no validation of pretrain.py (expected JSON lines with 'epoch', "
                        f"{', '.join(repr(k) for k in PRETRAINING_KEYS)})")
    return entries


def draw_pretraining(entries: list[dict], title: str, out: str) -> None:
    """A pretraining: training loss, and training and validation accuracies (%) against epochs."""
    epochs = [e['epoch'] for e in entries]
    curves = [(f'validation, {key[4:]} prototypes (95 % CI shaded)', [100 * e[key] for e in entries],
               [100 * e.get(f'{key}_ci', 0.0) for e in entries], colour, '-')
              for key, colour in (('val_cosine', 'tab:orange'), ('val_euclidean', 'tab:green'))]
    curves.append(('training batches (augmented)', [100 * e['train_accuracy'] for e in entries], None, 'tab:grey',
                   '--'))
    best = max(range(len(entries)), key=lambda i: (entries[i]['val_cosine'], -i))  # the first best, as kept
    # 'lr' is the rate an epoch trained with: it dropped after prev's epoch, at the latest before e's
    drops = [prev['epoch'] for prev, e in zip(entries, entries[1:]) if e.get('lr') != prev.get('lr')]
    draw_curves(epochs, 'epoch', [e['loss'] for e in entries], 'training loss (mean over the epoch)', curves,
                (epochs[best], 100 * entries[best]['val_cosine'],
                 f"best {100 * entries[best]['val_cosine']:.2f} % (epoch {epochs[best]})"), drops, title, out)


def plot_pretraining(path: str, out: str) -> str:
    entries = read_pretraining_log(path)
    draw_pretraining(entries, os.path.basename(path), out)
    best = max(entries, key=lambda e: e['val_cosine'])
    print(f"wrote {out}: {len(entries)} validations up to epoch {entries[-1]['epoch']}, best validation accuracy "
          f"(cosine) {100 * best['val_cosine']:.2f} % at epoch {best['epoch']}, last training loss "
          f"{entries[-1]['loss']:.4f}")
    return out


@exits_cleanly
def main(argv: Optional[list[str]] = None) -> str:
    own, rest = get_parser().parse_known_args(argv)
    if own.log is not None:
        if rest or own.stat is not None:
            raise UserError(f'--log names the file; {" ".join(rest) or "--stat"} would be ignored: give one or the other')
        out = own.out or picture_beside(own.log, '.log.jsonl')
        check_output(out, '--out', [own.log], own.overwrite, list(PICTURE_FORMATS))
        return plot_pretraining(own.log, out)
    if own.stat is not None:
        if rest:
            raise UserError(f'--stat names the file; the run flags {" ".join(rest)} would be ignored: give one or the other')
        stat_path, episode_gap = own.stat, own.episode_gap or 200
    else:
        # --episode_gap is also one of the run's flags: it names the run as well
        args = parse_args(rest + (['--episode_gap', str(own.episode_gap)] if own.episode_gap else []))
        stat_path, episode_gap = runs.run_paths(args).stat, args.episode_gap
        if not os.path.isfile(stat_path):
            raise UserError(finding.missing_run_message('statistics file', stat_path, args.save_dir, STAT_SUFFIX, '--stat'))
    if episode_gap < 1:
        raise UserError(f'--episode_gap must be at least 1, got {episode_gap}')
    own.out = own.out or picture_beside(stat_path, STAT_SUFFIX)
    check_output(own.out, '--out', [stat_path], own.overwrite, list(PICTURE_FORMATS))
    losses, accuracies = load_statistics(stat_path)
    episodes, entries = episodes_of(stat_path, len(losses), episode_gap)
    name = os.path.basename(stat_path)
    draw(losses, accuracies, episodes, entries, name[:-len(STAT_SUFFIX)] if name.endswith(STAT_SUFFIX) else name,
         own.out, training_episodes(stat_path))
    best = max(accuracies)
    print(f'wrote {own.out}: {len(losses)} validations up to episode {episodes[-1]}, best validation accuracy '
          f'{100 * best:.2f} % at episode {episodes[accuracies.index(best)]}, last training loss {losses[-1]:.4f}')
    return own.out


if __name__ == '__main__':
    main(sys.argv[1:])
