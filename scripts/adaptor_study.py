"""Where GLoFA's adaptors switch on, what they buy, and why they die: python scripts/adaptor_study.py --out DIR [--quick].

The design was fixed before any of its results was seen; the seeds are the repository's (960402, 1, 3).

Feature level: a task where the right answer is known. The encoder is the identity on 64-d embeddings drawn
as follows. Two kinds of task: the classes of kind A differ only in dimensions 0-31 (class means N(0, 1) there,
0 in 32-63), those of kind B only in 32-63. An image is its class mean, plus within-class noise N(0, 1) in its
kind's 32 dimensions, plus per-image nuisance N(0, s^2) in the other 32: s is the knob of heterogeneity (0:
nothing to adapt away; the larger s, the more a task gains from weighting its own dimensions, which differ from
kind to kind). Every episode is of either kind with equal chance, 5-way 1-shot with 15 queries per class; the
training classes (64 a kind) and the test classes (16 a kind) are disjoint pools. For one seed, the pools, the
episodes and the unit noise are the same at every knob, and every head trains on the same episodes with
train.py's training step (runs.training_step) and optimiser (SGD, Nesterov momentum 0.9, weight decay 5e-4, the head's --lr 0.01;
no encoder, no schedule; the last weights are tested) and is tested on the same episodes. Heads: GLoFA
(--adaptor both, task, class, none), ProtoNet (Euclidean and cosine: nothing to train on a fixed encoder), FEAT,
and one named ablation that is not GLoFA: GLoFA --h_bias_init 1 (its strengths start above 0).

Image level: the mix-grained demo (--demo mixed) from the Conv-4 of pretrain.py --demo mixed, on the demo's
schedule (300 training episodes, 5-way 1-shot, 1000 test episodes), with the reference's rates for a pretrained
encoder (--lr_network 0.0001 --lr 0.01, as scripts/mixed_ablation.py): the encoder fine-tuned, against frozen
(--freeze_encoder: eval mode, so BatchNorm's statistics stay as pretrained; no backward pass; no update), for
GLoFA, GLoFA --adaptor none, ProtoNet (frozen: the pretrained encoder as it is, by test.py) and FEAT. The runs
use --channels_last, a speed option: the same numbers up to rounding, a training step 1.25x quicker on this CPU.

Every head reports test accuracy (mean over seeds ± 1.96 std / sqrt(seeds)), GLoFA's strengths on the test and
their share of episodes above 0, and whether the strengths died: 0 on every one of the last training episodes
(the last 10 % at feature level, the last interval of --episode_gap at image level), and since which episode.

Stages (one per knob and seed, the pretraining, one per image-level run) are skipped when their result exists:
an interrupted study, started again with the same command, continues. --jobs J (default 2) runs J feature-level
stages, then J image-level runs, at a time, each on cpu_count // J threads: on a 2-core CPU that is quicker than
one process on both cores, and it can move a figure's last decimal (float sums in another order).
DIR/results.md (tables, every command), DIR/results.json and DIR/study.png are written after every stage.
--quick: one seed, two knobs, 200 episodes at feature level; at image level GLoFA and ProtoNet only, one epoch
of pretraining, a few episodes: a check of the pipeline (minutes; its numbers answer nothing). --pretrained FILE:
the image level from these Conv-4 weights instead of its own pretraining (its runs then go to a folder of their own).
"""
import argparse
import hashlib
import json
import multiprocessing
import os
import shlex
import signal
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)

from arguments import parse_args  # noqa: E402
from checkpoints import atomic_save, read_file  # noqa: E402
from evaluation import (ACTING_STRENGTHS, ADAPTOR_RECORD, STRENGTHS, dead_since, episode_values,  # noqa: E402
                        training_diagnostics)
from models.glofa import GLoFA, query_targets  # noqa: E402
from runs import (PRETRAINED_RATES, build_optimizer, episode_loss, model_on, pretrained_encoder, run_paths,  # noqa: E402
                  run_stages, threads_per_job, training_step, variant_figures, variant_stage)
from utils import (UserError, check_output_folder, exit_on_interrupt, exits_cleanly, interrupt_on_sigterm,  # noqa: E402
                   mean_ci, progress, save_figure)

SEEDS = (960402, 1, 3)
GROUP = 32                 # dimensions of each kind of task; the embedding has 2 * GROUP
WITHIN = 1.0               # within-class noise, in the kind's own dimensions
N_WAY, N_SHOT, N_QUERY = 5, 1, 15
POOLS = {'train': 64, 'test': 16}  # classes of each kind
FEATURE_HEADS = {  # name: train.py flags of the head
    'glofa': [], 'glofa-task': ['--adaptor', 'task'], 'glofa-class': ['--adaptor', 'class'],
    'glofa-none': ['--adaptor', 'none'], 'protonet': ['--model_name', 'protonet'],
    'protonet-cosine': ['--model_name', 'protonet', '--metric', 'cosine'], 'feat': ['--model_name', 'feat'],
    'ablation: glofa-hbias1': ['--h_bias_init', '1']}
IMAGE_MODELS = {'glofa': [], 'glofa-none': ['--adaptor', 'none'], 'protonet': ['--model_name', 'protonet'],
                'feat': ['--model_name', 'feat']}
IMAGE_ARMS = {'fine-tuned': [], 'frozen': ['--freeze_encoder']}
SCALES = {
    'full': dict(seeds=SEEDS, knobs=(0.0, 0.5, 1.0, 2.0, 4.0), train_episodes=3000, test_episodes=2000,
                 image_models=tuple(IMAGE_MODELS), image_extra=[], pretrain_extra=[]),
    'quick': dict(seeds=SEEDS[:1], knobs=(0.0, 2.0), train_episodes=200, test_episodes=200,
                  image_models=('glofa', 'protonet'),
                  image_extra=['--n_training_episodes', '4', '--episode_gap', '2', '--n_validating_episodes', '5',
                               '--n_testing_episodes', '20', '--Q', '3', '--n_workers', '0'],
                  pretrain_extra=['--epochs', '1', '--val_episodes', '10', '--n_workers', '0'])}


# ------------------------------------------------------------------ feature level
def class_means(generator: torch.Generator, n_classes: int, kind: int) -> torch.Tensor:
    """(n_classes, 2 * GROUP): N(0, 1) in the kind's own dimensions, 0 in the others."""
    means = torch.zeros(n_classes, 2 * GROUP)
    means[:, kind * GROUP:(kind + 1) * GROUP] = torch.randn(n_classes, GROUP, generator=generator)
    return means


def draw_episodes(generator: torch.Generator, pools: list, n_episodes: int) -> dict:
    """Episodes of random kinds from ``pools`` (a (classes, d) tensor of means per kind), shot-major: per episode
    its kind, the class means of its N*(K+Q) images, and their unit noise; ``embeddings`` scales it by a knob."""
    per_episode = N_WAY * (N_SHOT + N_QUERY)
    kinds = torch.randint(0, 2, (n_episodes,), generator=generator)
    means = torch.empty(n_episodes, per_episode, 2 * GROUP)
    for i, kind in enumerate(kinds.tolist()):
        classes = torch.randperm(len(pools[kind]), generator=generator)[:N_WAY]
        means[i] = pools[kind][classes].repeat(N_SHOT + N_QUERY, 1)  # position s*N + n: class n
    noise = torch.randn(n_episodes, per_episode, 2 * GROUP, generator=generator)
    own = torch.zeros(n_episodes, 1, 2 * GROUP, dtype=torch.bool)
    for kind in (0, 1):
        own[kinds == kind, :, kind * GROUP:(kind + 1) * GROUP] = True
    return {'kinds': kinds, 'means': means, 'noise': noise, 'own': own}


def embeddings(episodes: dict, knob: float) -> torch.Tensor:
    """(E, N*(K+Q), d): class mean + WITHIN * noise in the kind's dimensions + knob * noise in the others."""
    return episodes['means'] + episodes['noise'] * torch.where(episodes['own'], WITHIN, knob)


def feature_data(seed: int, train_episodes: int, test_episodes: int) -> tuple[dict, dict]:
    """The training and test episodes of one seed (the same at every knob)."""
    generator = torch.Generator().manual_seed(seed)
    pools = {split: [class_means(generator, n, kind) for kind in (0, 1)] for split, n in POOLS.items()}
    return (draw_episodes(generator, pools['train'], train_episodes),
            draw_episodes(generator, pools['test'], test_episodes))


def head(name: str, seed: int):
    """The head on the identity encoder, initialised from ``seed``, and its train.py arguments."""
    args = parse_args([*FEATURE_HEADS[name], '--N', str(N_WAY), '--K', str(N_SHOT), '--Q', str(N_QUERY),
                       '--pretrained', 'none', '--seed', str(seed)])
    torch.manual_seed(seed)
    return model_on(args, nn.Identity(), 2 * GROUP), args


def train_head(model, args, features: torch.Tensor) -> Optional[dict]:
    """train.py's step on each training episode in turn; GLoFA's per-episode record (None for other heads)."""
    if not model.head_parameters():
        return None  # ProtoNet on a fixed encoder: nothing to train
    model.train()
    optimizer = build_optimizer(args, model)
    targets = query_targets(N_WAY, N_QUERY)
    record = {key: [] for key in ADAPTOR_RECORD} if isinstance(model, GLoFA) else None
    for episode in features:
        loss, adaptation = episode_loss(model, episode, targets, N_WAY, N_SHOT)
        if not torch.isfinite(loss):
            raise UserError(f'the training loss of {args.model_name} became {loss.item()}')
        training_step(model, loss, adaptation, optimizer, None, record)
    return record


@torch.no_grad()
def test_head(model, features: torch.Tensor, batch: int = 250) -> np.ndarray:
    """(E, 6) episode_values of each test episode: accuracy, alpha_task, alpha_cls, masks, finite."""
    model.eval()
    targets = query_targets(N_WAY, N_QUERY)
    return np.concatenate([episode_values(*model.episode(features[i:i + batch], N_WAY, N_SHOT), targets).numpy()
                           for i in range(0, len(features), batch)])


INITIAL_EPISODES = 100  # training episodes on which the untrained GLoFA's pull on its strengths is measured


def initial_pull(features: torch.Tensor, seed: int) -> dict:
    """Which way the loss pulls GLoFA's strengths before any training: on the first training episodes where both
    are above 0, the share where d loss / d alpha > 0 (a step lowers the strength), and the share where its sign
    for alpha_task equals that of d loss / d c for the logits scaled by c (the strength acting as a temperature)."""
    model, _ = head('glofa', seed)
    model.train()
    targets = query_targets(N_WAY, N_QUERY)
    down, agrees, accuracies = [], [], []
    for episode in features[:INITIAL_EPISODES]:
        logits, adaptation = model.episode(episode, N_WAY, N_SHOT)
        if not (adaptation.alpha > 0).all():
            continue
        pull = torch.autograd.grad(F.cross_entropy(logits, targets), adaptation.alpha)[0]
        scale = torch.ones((), requires_grad=True)
        temperature = torch.autograd.grad(F.cross_entropy(scale * logits.detach(), targets), scale)[0]
        down.append((pull > 0).tolist())
        agrees.append(bool((pull[0] > 0) == (temperature > 0)))
        accuracies.append((logits.argmax(dim=1) == targets).float().mean().item())
    down = np.array(down, dtype=float).reshape(-1, 2)
    return {'episodes': len(agrees), 'accuracy': 100 * float(np.mean(accuracies)) if agrees else float('nan'),
            'alpha_task_pushed_down': float(down[:, 0].mean()) if agrees else float('nan'),
            'alpha_cls_pushed_down': float(down[:, 1].mean()) if agrees else float('nan'),
            'agrees_with_logit_scale': float(np.mean(agrees)) if agrees else float('nan')}


def feature_stage(knob: float, seed: int, data: tuple[dict, dict], heads: list) -> dict:
    """Every head trained and tested at one knob and seed: {head: figures}."""
    train_features, test_features = embeddings(data[0], knob), embeddings(data[1], knob)
    found = {'initial_pull': initial_pull(train_features, seed)}
    for name in heads:
        start = time.perf_counter()
        model, args = head(name, seed)
        record = train_head(model, args, train_features)
        values = test_head(model, test_features)
        accuracy, ci = mean_ci(100 * values[:, 0])
        figures = {'accuracy': accuracy, 'ci95': ci}
        if record is not None:
            last = max(1, len(train_features) // 10)
            history = {'episode': list(range(1, len(train_features) + 1)), **record}
            alphas = values[:, 1:3]
            figures.update(alpha_task=float(alphas[:, 0].mean()), alpha_cls=float(alphas[:, 1].mean()),
                           alpha_task_active=float((alphas[:, 0] > 0).mean()),
                           alpha_cls_active=float((alphas[:, 1] > 0).mean()),
                           acting=[STRENGTHS[i][0] for i in ACTING_STRENGTHS[args.adaptor]],
                           training_first=training_diagnostics({k: v[:last] for k, v in record.items()}),
                           training_last=training_diagnostics({k: v[-last:] for k, v in record.items()}))
            if figures['acting']:  # --adaptor none acts through no strength: nothing to die
                figures['died_at'] = dead_since(history, last, args.adaptor)
        figures['seconds'] = time.perf_counter() - start
        found[name] = figures
    return found


def feature_worker(threads: int) -> None:
    """A process of the feature level: its share of the cores; Ctrl-C is for the study's own process."""
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def feature_job(job: tuple) -> tuple[float, int]:
    """One stage of the feature level, in a process of its own: every head at one knob and seed, saved to path."""
    knob, seed, train_episodes, test_episodes, path = job
    atomic_save(feature_stage(knob, seed, feature_data(seed, train_episodes, test_episodes), list(FEATURE_HEADS)), path)
    return knob, seed


# ------------------------------------------------------------------ tables
def over_seeds(runs: list) -> dict:
    """Mean over seeds ± 1.96 std / sqrt(seeds) of each run's accuracy, the mean strengths, and the deaths."""
    accuracy, ci = mean_ci([r['accuracy'] for r in runs])
    row = {'accuracy': accuracy, 'ci_over_seeds': ci, 'seeds': len(runs)}
    if runs and 'alpha_task' in runs[0]:
        for key in ('alpha_task', 'alpha_cls', 'alpha_task_active', 'alpha_cls_active'):
            row[key] = float(np.mean([r[key] for r in runs]))
        row['acting'] = runs[0]['acting']
    if runs and all('died_at' in r for r in runs):
        row['died'] = sum(r['died_at'] is not None for r in runs)
        row['died_at'] = [r['died_at'] for r in runs]
    return row


def accuracy_text(row: dict) -> str:
    return f"{row['accuracy']:.2f} ± {row['ci_over_seeds']:.2f}" if row['seeds'] > 1 else f"{row['accuracy']:.2f} (1 seed)"


def strength_text(row: dict) -> str:
    if 'alpha_task' not in row:
        return ''
    if not row['acting']:
        return 'none acts'
    return ' / '.join(f"{row[key]:.3f} (> 0 in {100 * row[key + '_active']:.0f} %)" if key in row['acting'] else '-'
                      for key in ('alpha_task', 'alpha_cls'))


def died_text(row: dict) -> str:
    if 'died' not in row:
        return ''
    at = ', '.join('-' if e is None else str(e) for e in row['died_at'])
    return f"{row['died']} of {row['seeds']} (since episode {at})" if row['died'] else f"0 of {row['seeds']}"


def write_results(out: str, scale: str, settings: dict, feature: dict, image: dict, commands: list) -> dict:
    """results.md, results.json and study.png from every stage done so far."""
    seeds = settings['seeds']
    table = {'scale': scale, 'seeds': list(seeds), 'knobs': list(settings['knobs']), 'feature': {}, 'image': {}}
    lines = [f'# What the adaptors do{" (--quick: a check of the pipeline; its numbers answer nothing)" if scale == "quick" else ""}',
             '', 'Design: scripts/adaptor_study.py (its docstring). Accuracy in %, 5-way 1-shot, mean over seeds ± 95 % '
             f'CI over seeds (seeds {", ".join(map(str, seeds))}); strengths: GLoFA\'s alpha_task / alpha_cls on the '
             'test episodes, mean, and the share of episodes where each is above 0; died: the strengths the head acts '
             'through were 0 on every one of the last training episodes (the last 10 %), in how many seeds and since '
             'which episode.', '',
             f"## Feature level ({settings['train_episodes']} training episodes, {settings['test_episodes']} test episodes "
             'a seed)', '']
    knobs = [k for k in settings['knobs'] if any((k, s) in feature for s in seeds)]
    if knobs:  # the summary: accuracy of every head against the knob, and what GLoFA's strengths did
        rows = {k: {name: over_seeds([feature[(k, s)][name] for s in seeds if (k, s) in feature])
                    for name in FEATURE_HEADS} for k in knobs}
        lines += ['| head | ' + ' | '.join(f's = {k:g}' for k in knobs) + ' |', '|---|' + '---|' * len(knobs)]
        lines += [f'| {name} | ' + ' | '.join(accuracy_text(rows[k][name]) for k in knobs) + ' |' for name in FEATURE_HEADS]
        for name in ('glofa', 'ablation: glofa-hbias1'):
            lines.append(f'| {name} minus glofa-none, paired by seed | ' + ' | '.join(
                '{:+.2f} ± {:.2f}'.format(*mean_ci([feature[(k, s)][name]['accuracy'] - feature[(k, s)]['glofa-none']['accuracy']
                                                    for s in seeds if (k, s) in feature])) for k in knobs) + ' |')
            lines.append(f'| {name}: alpha_task / alpha_cls on the test | ' + ' | '.join(
                f"{rows[k][name]['alpha_task']:.2f} / {rows[k][name]['alpha_cls']:.2f}" for k in knobs) + ' |')
            lines.append(f'| {name}: died in training | ' + ' | '.join(
                f"{rows[k][name]['died']} of {rows[k][name]['seeds']}" for k in knobs) + ' |')
        pulls = {k: [feature[(k, s)]['initial_pull'] for s in seeds if (k, s) in feature] for k in knobs}
        for key, text in (('accuracy', 'accuracy (%)'),
                          ('alpha_task_pushed_down', 'share of episodes where d loss / d alpha_task > 0'),
                          ('alpha_cls_pushed_down', 'share where d loss / d alpha_cls > 0'),
                          ('agrees_with_logit_scale', 'share where d loss / d alpha_task has the sign of d loss / d (a '
                                                      'scale on the logits)')):
            lines.append(f'| untrained glofa, first {INITIAL_EPISODES} training episodes: {text} | ' + ' | '.join(
                f"{np.mean([p[key] for p in pulls[k]]):.2f}" for k in knobs) + ' |')
        lines += ['', 'Each knob in full:', '']
    for knob in knobs:
        runs = [feature[(knob, s)] for s in seeds if (knob, s) in feature]
        lines += [f'Nuisance s = {knob:g} ({len(runs)} of {len(seeds)} seeds):', '',
                  '| head | accuracy | strengths on the test | died in training |', '|---|---|---|---|']
        for name in FEATURE_HEADS:
            row = over_seeds([r[name] for r in runs])
            table['feature'].setdefault(f'{knob:g}', {})[name] = {**row, 'runs': [r[name] for r in runs]}
            lines.append(f"| {name} | {accuracy_text(row)} | {strength_text(row)} | "
                         f"{died_text(row)} |")
        lines.append('')
    lines += ['## Image level (the mix-grained demo, Conv-4 pretrained by pretrain.py --demo mixed)', '',
              '| encoder | model | accuracy | seeds | strengths on the test | died in training |', '|---|---|---|---|---|---|']
    for arm in IMAGE_ARMS:
        for model in settings['image_models']:
            runs = [image[(arm, model, s)] for s in seeds if (arm, model, s) in image]
            if not runs:
                lines.append(f'| {arm} | {model} | not run yet | | | |')
                continue
            row = over_seeds(runs)
            table['image'].setdefault(arm, {})[model] = {**row, 'runs': runs}
            each = ', '.join(f"{r['accuracy']:.2f} ± {r['ci95']:.2f}" for r in runs)
            lines.append(f"| {arm} | {model} | {accuracy_text(row)} | {each} | "
                         f"{strength_text(row)} | {died_text(row)} |")
    lines += ['', '(image level, seeds: each seed\'s test accuracy ± its per-episode 95 % CI)', '',
              'Commands (the feature level runs inside this script):', '',
              *[f'- `{c}`' for c in commands]]
    with open(os.path.join(out, 'results.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    with open(os.path.join(out, 'results.json'), 'w') as f:
        json.dump(table, f, indent=1)
    draw(table, os.path.join(out, 'study.png'))
    return table


def draw(table: dict, path: str) -> None:
    """Feature level: accuracy, and its difference to GLoFA without adaptors, and GLoFA's strengths against the
    knob; image level: accuracy per model and arm."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 10), dpi=100, layout='constrained')
    FigureCanvasAgg(fig)
    (ax_acc, ax_gain), (ax_alpha, ax_image) = fig.subplots(2, 2)
    knobs = sorted(table['feature'], key=float)
    x = [float(k) for k in knobs]
    for name in FEATURE_HEADS:
        rows = [table['feature'][k][name] for k in knobs]
        style = dict(marker='o', markersize=3, capsize=2, label=name, linestyle='--' if 'ablation' in name else '-')
        ax_acc.errorbar(x, [r['accuracy'] for r in rows], yerr=[r['ci_over_seeds'] for r in rows], **style)
        # per seed, then over seeds: the same episodes, so the seeds' differences are paired
        gains = [[a['accuracy'] - b['accuracy'] for a, b in zip(r['runs'], table['feature'][k]['glofa-none']['runs'])]
                 for r, k in zip(rows, knobs)]
        ax_gain.errorbar(x, [mean_ci(g)[0] for g in gains], yerr=[mean_ci(g)[1] for g in gains], **style)
    ax_acc.set_title('feature level: test accuracy (mean over seeds, 95 % CI)')
    ax_acc.set_ylabel('accuracy (%)')
    ax_gain.axhline(0, color='black', linewidth=0.8)
    ax_gain.set_title("feature level: accuracy minus glofa-none's, paired by seed")
    ax_gain.set_ylabel('difference (points)')
    ax_gain.legend(fontsize=7)
    for name, style in (('glofa', '-'), ('ablation: glofa-hbias1', '--')):
        for key, colour in (('alpha_task', 'tab:green'), ('alpha_cls', 'tab:purple')):
            ax_alpha.plot(x, [table['feature'][k][name][key] for k in knobs], marker='o', markersize=3, color=colour,
                          linestyle=style, label=f'{name}: {key}')
    ax_alpha.set_title("feature level: GLoFA's strengths relu(h(S)) on the test (0 = adaptors off)")
    ax_alpha.set_ylabel('strength (mean over episodes and seeds)')
    ax_alpha.legend(fontsize=7)
    for ax in (ax_acc, ax_gain, ax_alpha):
        ax.set_xlabel("nuisance s in the other kind's dimensions (0 = homogeneous tasks)")
    width = 0.38
    models = [m for m in IMAGE_MODELS if any(m in arm for arm in table['image'].values())]
    for j, arm in enumerate(IMAGE_ARMS):
        rows = table['image'].get(arm, {})
        present = [m for m in models if m in rows]
        ax_image.bar([models.index(m) + (j - 0.5) * width for m in present], [rows[m]['accuracy'] for m in present],
                     width, yerr=[rows[m]['ci_over_seeds'] for m in present], capsize=3, label=f'encoder {arm}')
    ax_image.set_xticks(range(len(models)), models)
    accuracies = [r['accuracy'] for arm in table['image'].values() for r in arm.values()]
    if accuracies:
        ax_image.set_ylim(max(0.0, min(accuracies) - 5), min(100.0, max(accuracies) + 3))
        ax_image.legend(fontsize=8)
    else:
        ax_image.text(0.5, 0.5, 'not run yet', ha='center', va='center', transform=ax_image.transAxes)
    ax_image.set_title('image level, mix-grained demo: test accuracy (95 % CI over seeds)')
    ax_image.set_ylabel('accuracy (%)')
    for ax in (ax_acc, ax_gain, ax_alpha, ax_image):
        ax.grid(alpha=0.3)
    save_figure(fig, path)


# ------------------------------------------------------------------ the study
def image_flags(save_dir: str, arm: str, model: str, seed: int, weights: str, extra: list) -> tuple[str, list]:
    """The base path of one image-level run's files and its train.py flags."""
    return (os.path.join(save_dir, f'{arm}-{model}-seed{seed}'),
            ['--demo', 'mixed', '--seed', str(seed), *IMAGE_MODELS[model], '--pretrained', weights,
             *PRETRAINED_RATES, *IMAGE_ARMS[arm], '--channels_last', '--save_dir', save_dir, *extra])


def frozen_protonet(flags: list, base: str) -> list:
    """Frozen ProtoNet has nothing to train: test.py on the pretrained encoder as it is."""
    return ['test.py', *[f for f in flags if f != '--freeze_encoder'], '--model_path', 'none', '--json', base + '.test.json']


def image_stage(base: str, flags: list, arm: str, model: str) -> Optional[tuple[list, str]]:
    """What one image-level run still has to run: (command, log), or None when its figures exist."""
    if arm == 'frozen' and model == 'protonet':
        return None if os.path.isfile(base + '.test.json') else (frozen_protonet(flags, base), base + '.log')
    return variant_stage(base, flags)


def image_figures(base: str, flags: list, arm: str, model: str) -> dict:
    """One image-level run's test figures, what the adaptors did in training, and its command."""
    if arm == 'frozen' and model == 'protonet':
        with open(base + '.test.json') as f:
            return {**json.load(f)['settings'][0], 'command': shlex.join(['python', *frozen_protonet(flags, base)])}
    figures = variant_figures(base, flags)
    figures['command'] = shlex.join(['python', 'train.py', *flags])
    args = parse_args(flags)
    history = read_file(run_paths(args).stat, 'statistics file').get('training_episodes')
    if 'alpha_task' in figures:
        figures['acting'] = [STRENGTHS[i][0] for i in ACTING_STRENGTHS[args.adaptor]]
    if history and ACTING_STRENGTHS[args.adaptor]:
        figures['died_at'] = dead_since(history, args.episode_gap, args.adaptor)
        figures['training'] = training_diagnostics({k: v for k, v in history.items() if k != 'episode'})
    return figures


@exits_cleanly
def main(argv: Optional[list[str]] = None) -> dict:
    interrupt_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=os.path.join('saves', 'adaptor_study'),
                   help='folder of results.md, results.json, study.png, the stages and the runs')
    p.add_argument('--quick', action='store_true', help='one seed, two knobs, short runs: a check of the pipeline')
    p.add_argument('--levels', nargs='+', default=['feature', 'image'], choices=['feature', 'image'])
    p.add_argument('--pretrained', default=None,
                   help="the image level's Conv-4 weights (FEAT's format, as pretrain.py --demo mixed writes them); "
                        "default: pretrain them in DIR/image")
    p.add_argument('--jobs', type=int, default=min(2, os.cpu_count() or 1),
                   help='feature-level stages and image-level runs at a time, each on cpu_count // JOBS threads '
                        '(default: 2, or 1 on a one-core machine); with 1, image runs show their output as it comes')
    opts = p.parse_args(argv)
    if opts.jobs < 1:
        p.error(f'--jobs {opts.jobs}: expected a whole number of runs at a time, at least 1')
    scale = 'quick' if opts.quick else 'full'
    settings = SCALES[scale]
    out = os.path.abspath(opts.out)
    check_output_folder(out, '--out')
    if opts.pretrained is not None and not os.path.isfile(opts.pretrained):  # before the feature level's minutes
        raise UserError(f'--pretrained {opts.pretrained}: no such file (expected Conv-4 weights in FEAT\'s format, '
                        f'as pretrain.py --demo mixed writes them)')
    os.makedirs(os.path.join(out, 'feature'), exist_ok=True)
    feature, image, done, order = {}, {}, [], []
    command = shlex.join(['python', 'scripts/adaptor_study.py', '--out', opts.out, *(['--quick'] if opts.quick else [])])
    commands = [f'{command} (the whole study)']

    def stage_path(knob: float, seed: int) -> str:
        return os.path.join(out, 'feature', f'{scale}-s{knob:g}-seed{seed}.pt')

    def results() -> dict:
        return write_results(out, scale, settings, feature, image, commands + [image[k]['command'] for k in order if k in image])

    current = ['start-up']
    stages = len(settings['seeds']) * (len(settings['knobs']) + len(IMAGE_ARMS) * len(settings['image_models'])) + 1
    with exit_on_interrupt(lambda: f'interrupted during {current[0]}: {os.path.join(out, "results.md")} holds every '
                                   f'result so far ({len(feature) + len(image)} of {stages} stages); run the same command '
                                   f'again to continue'):
        if 'feature' in opts.levels:
            current[0] = 'the feature level'
            keys = [(knob, seed) for seed in settings['seeds'] for knob in settings['knobs']]
            jobs = [(*key, settings['train_episodes'], settings['test_episodes'], stage_path(*key)) for key in keys
                    if not os.path.isfile(stage_path(*key))]
            if jobs:  # each stage in a process of its own, opts.jobs at a time
                with progress(total=len(jobs), desc=f'feature level, {opts.jobs} at a time', unit='stage') as bar, \
                        multiprocessing.get_context('spawn').Pool(min(opts.jobs, len(jobs)), feature_worker,
                                                                  (threads_per_job(opts.jobs),)) as pool:
                    for key in pool.imap_unordered(feature_job, jobs):
                        feature[key] = read_file(stage_path(*key), 'stage result')
                        results()
                        bar.update(1)
            for key in keys:
                feature[key] = read_file(stage_path(*key), 'stage result')
            results()
        if 'image' in opts.levels:
            current[0] = 'the pretraining'
            save_dir = os.path.join(out, 'image' if scale == 'full' else 'image-quick')
            if opts.pretrained is None:
                weights = pretrained_encoder(save_dir, settings['pretrain_extra'], done)
                commands.append(shlex.join(['python', 'pretrain.py', '--demo', 'mixed', '--save_dir', save_dir, '--out',
                                            weights, *settings['pretrain_extra']]) + ' (the pretraining)')
            else:  # runs from other weights go to a folder of their own
                weights = os.path.abspath(opts.pretrained)
                save_dir += '-' + hashlib.sha1(weights.encode()).hexdigest()[:8]
            keys = [(arm, model, seed) for arm in IMAGE_ARMS for model in settings['image_models']
                    for seed in settings['seeds']]
            runs = {key: image_flags(save_dir, *key, weights, settings['image_extra']) for key in keys}
            order.extend(keys)

            def collect(key: tuple) -> None:
                image[key] = image_figures(*runs[key], *key[:2])
                results()
            to_run = {key: image_stage(*runs[key], *key[:2]) for key in keys}
            pending = [key for key in keys if to_run[key] is not None]
            for key in keys:
                if to_run[key] is None:
                    collect(key)
            current[0] = f'the image level ({len(pending)} runs to go when it started)'
            run_stages([to_run[key] for key in pending], done, opts.jobs, finished=lambda i: collect(pending[i]))
    table = results()
    print(f'\nwrote {os.path.join(out, "results.md")}, results.json and study.png ({len(done)} command'
          f'{"s" if len(done) != 1 else ""} run now)')
    return table


if __name__ == '__main__':
    main(sys.argv[1:])
