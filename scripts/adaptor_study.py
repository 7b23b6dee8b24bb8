"""Where GLoFA's adaptors pay, where they die, where they cost: python scripts/adaptor_study.py --out DIR [--quick].

The design, the grid and the seeds (960402, 1, 3) were fixed before any of its results was seen.

Feature level: tasks where the right answer is known. The encoder is the identity on 64-d embeddings drawn as
follows. Two kinds of task: the classes of kind A differ only in dimensions 0-31 (class means N(0, 1) there, 0 in
32-63), those of kind B only in 32-63. An image is its class mean, plus within-class noise N(0, sigma^2) in its
kind's 32 dimensions, plus per-image nuisance N(0, s^2) in the other 32. Every episode is of either kind with equal
chance, 5-way 1-shot with 15 queries per class; the training classes (64 a kind) and the test classes (16 a kind)
are disjoint pools. For one seed, the pools, the episodes and the unit noise are the same in every cell, and every
head of a cell trains on the same episodes with train.py's training step (train.train_one_gap) and optimiser (SGD,
Nesterov momentum 0.9, weight decay 5e-4, the head's --lr 0.01; no encoder, no schedule; the last weights are
tested) and is tested on the same episodes.

The grid (a cell is one sigma, s and tau; 3 seeds each):
  within-class noise sigma in {0.3, 0.5, 1}; nuisance s in {0, 0.5, 1, 1.5, 2, 3, 4};
  GLoFA's temperature tau in {1, 2} (1 is the method's default, the first reading; 2 only divides the logits).
Heads: GLoFA (--adaptor both) and GLoFA --adaptor none in every cell: their difference, paired by seed, is the
question. Added for the second map, before it was run: in every cell also GLoFA --strengths constant (both
strengths held at 1, h unused: the masks alone) and the strength rule chosen by --choose, --strengths
mix-direction (sigmoid(h(S)), learning only from what the strengths do to the logits' direction). --choose ran the
candidates mix and mix-direction on sigma 0.5, s in {0.5, 1, 2, 3}, tau in {1, 2} at seeds 11 and 12, which no
result reports, and kept the one meeting the map's goal in the most of those cells (half of a perfect mask's room
kept where the room is 15 points or more, at most 1 point lost where it is 5 or less): mix-direction. The
published map (docs/baselines.md) predates these heads. On the sigma = 1, tau = 1 row also GLoFA --adaptor task and class, ProtoNet (Euclidean and cosine), FEAT,
and one named ablation that is not GLoFA: GLoFA --h_bias_init 1 (its strengths start above 0). --adaptor none and
ProtoNet have no parameter their logits depend on once the encoder is fixed: they are tested, not trained.
Every cell also measures, on the same test episodes:
  the ceiling: GLoFA's logits (its tau) with an oracle task mask: the episode's kind's 32 dimensions scaled by
    ORACLE_SCALE = 10 (m_task = delta = 1 there and alpha_task = 9), the others by 1, no class masks; its
    accuracy minus --adaptor none's is the room a perfect task mask has;
  readability: the share of test episodes whose kind a simple statistic of the N*K support vectors tells: the
    half of the dimensions with the larger mean square is the kind's own (or the smaller, whichever was right on
    more training episodes): what a set function can hope to read from a support set;
  the untrained GLoFA's pull on its strengths on the first 100 training episodes: its accuracy and confidence
    (mean largest softmax probability), and the share of episodes where d loss / d alpha > 0 (a step lowers it);
    added after the map above was run, so its published cells lack it: the mean pull split into the part through
    the logits' size and through their direction, and into the part from right and from wrong queries
    (``pull_parts``).

Image level: the mix-grained demo (--demo mixed) from the Conv-4 of pretrain.py --demo mixed, on the demo's
schedule (300 training episodes, 5-way 1-shot, 1000 test episodes), with the reference's rates for a pretrained
encoder (--lr_network 0.0001 --lr 0.01, as scripts/mixed_ablation.py), encoder fine-tuned and frozen
(--freeze_encoder: eval mode, so BatchNorm's statistics stay as pretrained; no backward pass; no update): GLoFA
and GLoFA --adaptor none at --tau 1 and 2, 3 seeds; in an arm where GLoFA died at tau 2 in at least one seed, both
also at tau 4. Added for the second run, before it was run: GLoFA --strengths constant and the chosen rule, at
--tau 1 (the method's default), 3 seeds, in both arms. ProtoNet and FEAT on this data: scripts/mixed_ablation.py. The runs use --channels_last, a speed
option: the same numbers up to rounding.

Every head reports test accuracy (mean over seeds ± 1.96 std / sqrt(seeds)), GLoFA's strengths on the test and
their share of episodes above 0, and whether the strengths died: 0 on every one of the last training episodes
(the last 10 % at feature level, the last interval of --episode_gap at image level), and since which episode.

Stages (one per cell and seed, the pretraining, one per image-level run) are skipped when their result exists:
an interrupted study, started again with the same command, continues. --jobs J (default 2) runs J stages at a
time, each on cpu_count // J threads (which can move a figure's last decimal: float sums in another order).
DIR/results.md (tables, every command), DIR/results.json (every cell with its sigma, s and tau) and DIR/study.png
are written after every stage. --quick: one seed, two sigmas, two knobs, 200 episodes at feature level; at image
level GLoFA alone, a few episodes: a check of the pipeline (minutes; its numbers answer nothing). --pretrained FILE:
the image level from these Conv-4 weights instead of its own pretraining (its runs then go to a folder of their own).
"""
import argparse
import hashlib
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
from harness.checkpoints import atomic_save, build_optimizer, read_file  # noqa: E402
from harness.evaluation import EpisodeResults, mean_ci  # noqa: E402
from models.diagnostics import episode_values  # noqa: E402
from models.diagnostics import (ACTING_STRENGTHS, ADAPTOR_RECORD, STRENGTHS, dead_since, record_episode,  # noqa: E402
                                training_diagnostics)
from dataloader import query_targets  # noqa: E402
from models.glofa import Adaptation, GLoFA  # noqa: E402
from harness.runs import run_paths  # noqa: E402
from harness.stages import (PRETRAINED_RATES, pretrained_encoder, run_stages, threads_per_job, variant_figures,
                            variant_stage)  # noqa: E402
from models import model_on  # noqa: E402
from base.console import UserError, exit_on_interrupt, exits_cleanly, interrupt_on_sigterm, progress  # noqa: E402
from base.files import write_text  # noqa: E402
from harness.outputs import claim_output_folder, save_figure, write_json  # noqa: E402

SEEDS = (960402, 1, 3)
GROUP = 32                 # dimensions of each kind of task; the embedding has 2 * GROUP
N_WAY, N_SHOT, N_QUERY = 5, 1, 15
POOLS = {'train': 64, 'test': 16}  # classes of each kind
FEATURE_HEADS = {  # name: train.py flags of the head
    'glofa': [], 'glofa-task': ['--adaptor', 'task'], 'glofa-class': ['--adaptor', 'class'],
    'glofa-none': ['--adaptor', 'none'], 'protonet': ['--model_name', 'protonet'],
    'protonet-cosine': ['--model_name', 'protonet', '--metric', 'cosine'], 'feat': ['--model_name', 'feat'],
    'ablation: glofa-hbias1': ['--h_bias_init', '1'],
    'glofa-constant': ['--strengths', 'constant'], 'glofa-mix': ['--strengths', 'mix'],
    'glofa-mix-direction': ['--strengths', 'mix-direction']}
# in every cell (every head on the FULL_ROW): the reference, the same head without adaptors, the strengths held
# constant, and the strength rule chosen by --choose (CHOSEN_RULE)
CHOSEN_RULE = 'glofa-mix-direction'
MAP_HEADS = ('glofa', 'glofa-none', 'glofa-constant', CHOSEN_RULE)
FULL_ROW = (1.0, 1.0)  # (sigma, tau)
ORACLE_SCALE = 10.0  # the ceiling's factor on the kind's own dimensions: 1 + alpha_task * m_task, alpha_task = 9
INITIAL_EPISODES = 100  # training episodes on which the untrained GLoFA's pull on its strengths is measured
IMAGE_MODELS = {'glofa': [], 'glofa-none': ['--adaptor', 'none'], 'glofa-constant': ['--strengths', 'constant'],
                'glofa-mix-direction': ['--strengths', 'mix-direction']}
IMAGE_LABELS = {'glofa': 'GLoFA', 'glofa-none': 'the same head without adaptors',
                'glofa-constant': 'strengths held at 1', 'glofa-mix-direction': 'the chosen strength rule'}
IMAGE_ARMS = {'fine-tuned': [], 'frozen': ['--freeze_encoder']}
LARGER_TAU = 4.0  # at image level, in an arm where GLoFA died at tau 2 in at least one seed
SCALES = {
    'full': dict(seeds=SEEDS, sigmas=(0.3, 0.5, 1.0), knobs=(0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0), taus=(1.0, 2.0),
                 train_episodes=3000, test_episodes=2000, image_models=('glofa', 'glofa-none'), image_taus=(1.0, 2.0),
                 image_rules=('glofa-constant', CHOSEN_RULE),
                 image_extra=[], pretrain_extra=[]),
    'quick': dict(seeds=SEEDS[:1], sigmas=(0.5, 1.0), knobs=(0.0, 2.0), taus=(1.0, 2.0), train_episodes=200,
                  test_episodes=200, image_models=('glofa',), image_taus=(1.0, 2.0), image_rules=(CHOSEN_RULE,),
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
    its kind, the class means of its N*(K+Q) images, and their unit noise; ``embeddings`` scales it per cell."""
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


def embeddings(episodes: dict, knob: float, sigma: float) -> torch.Tensor:
    """(E, N*(K+Q), d): class mean + sigma * noise in the kind's dimensions + knob * noise in the others."""
    return episodes['means'] + episodes['noise'] * torch.where(episodes['own'], sigma, knob)


def feature_data(seed: int, train_episodes: int, test_episodes: int) -> tuple[dict, dict]:
    """The training and test episodes of one seed (the same in every cell)."""
    generator = torch.Generator().manual_seed(seed)
    pools = {split: [class_means(generator, n, kind) for kind in (0, 1)] for split, n in POOLS.items()}
    return (draw_episodes(generator, pools['train'], train_episodes),
            draw_episodes(generator, pools['test'], test_episodes))


def head(name: str, seed: int, tau: float):
    """The head on the identity encoder, initialised from ``seed``, and its train.py arguments (GLoFA at ``tau``)."""
    glofa = '--model_name' not in FEATURE_HEADS[name]
    args = parse_args([*FEATURE_HEADS[name], *(['--tau', f'{tau:g}'] if glofa else []), '--N', str(N_WAY),
                       '--K', str(N_SHOT), '--Q', str(N_QUERY), '--pretrained', 'none', '--seed', str(seed)])
    torch.manual_seed(seed)
    return model_on(args, nn.Identity(), 2 * GROUP), args


def train_head(model, args, features: torch.Tensor) -> Optional[dict]:
    """train.py's step on each training episode in turn; GLoFA's per-episode record (None for other heads, and
    for a head that is not trained)."""
    if not model.head_parameters() or getattr(model, 'adaptor', None) == 'none':
        return None  # on a fixed encoder, no parameter of ProtoNet or --adaptor none reaches the logits
    model.train()
    optimizer = build_optimizer(args, model)
    targets = query_targets(N_WAY, N_QUERY)
    record = {key: [] for key in ADAPTOR_RECORD} if isinstance(model, GLoFA) else None
    for episode in features:
        loss, adaptation = model.loss(episode, targets, N_WAY, N_SHOT)
        if not torch.isfinite(loss):
            raise UserError(f'the training loss of {args.model_name} became {loss.item()}')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if record is not None:
            record_episode(record, model, adaptation)
        optimizer.step()
    return record


@torch.no_grad()
def test_head(model, features: torch.Tensor, batch: int = 250) -> np.ndarray:
    """(E, 6) episode_values of each test episode: accuracy, alpha_task, alpha_cls, masks, finite."""
    model.eval()
    targets = query_targets(N_WAY, N_QUERY)
    return np.concatenate([episode_values(*model.episode(features[i:i + batch], N_WAY, N_SHOT), targets).numpy()
                           for i in range(0, len(features), batch)])


@torch.no_grad()
def ceiling(features: torch.Tensor, own: torch.Tensor, tau: float) -> np.ndarray:
    """Per test episode, the accuracy of GLoFA's logits at ``tau`` with the oracle task mask: the episode's kind's
    dimensions (``own``, (E, 1, d)) scaled by ORACLE_SCALE, the others by 1, no class masks."""
    model = GLoFA(nn.Identity(), 2 * GROUP, tau=tau)
    support, query = features[:, :N_WAY * N_SHOT], features[:, N_WAY * N_SHOT:]
    scale = torch.where(own, ORACLE_SCALE, 1.0).expand(-1, N_WAY, -1)  # (E, N, d)
    mean_support = support.unflatten(1, (N_SHOT, N_WAY)).mean(dim=1)
    logits = model.logits(query, mean_support, Adaptation(None, None, None, scale, None))
    return (logits.argmax(dim=-1) == query_targets(N_WAY, N_QUERY)).double().mean(dim=1).numpy()


def support_moments(features: torch.Tensor) -> torch.Tensor:
    """(E, 2): the mean square of each half of the dimensions over an episode's N*K support vectors."""
    support = features[:, :N_WAY * N_SHOT]
    return support.pow(2).unflatten(-1, (2, GROUP)).mean(dim=(1, 3))


def readability(train_features: torch.Tensor, train_kinds: torch.Tensor, test_features: torch.Tensor,
                test_kinds: torch.Tensor) -> dict:
    """How often the support set tells its episode's kind: the half with the larger mean square is read as the
    kind's own, or the smaller, whichever rule was right on more training episodes; its share on the test."""
    larger = lambda features: support_moments(features).argmax(dim=1)  # noqa: E731
    right = (larger(train_features) == train_kinds).double().mean().item()
    rule = 'larger' if right >= 0.5 else 'smaller'
    read = larger(test_features) if rule == 'larger' else 1 - larger(test_features)
    return {'rule': rule, 'share': 100 * (read == test_kinds).double().mean().item()}


PULL_PARTS = ('total', 'size', 'direction', 'right', 'wrong')


def pull_parts(model: GLoFA, episode: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """d loss / d (alpha_task, alpha_cls) of one episode at the head's strengths (its masks held), and its parts: a
    (5, 2) array, rows PULL_PARTS. A logit is <q * s_n, p_n> / tau = |q * s_n| cos(q * s_n, p_n) / tau, and the
    strengths move both factors: 'size' is the part through the adapted query's length (the logits' size, as a
    temperature would), 'direction' the part through the cosine (the adapted query's and the prototype's
    directions); size + direction = total (the product rule). 'right' and 'wrong' split the total by the queries the
    head classifies right and wrong; right + wrong = total."""
    support, query = episode[:N_WAY * N_SHOT], episode[N_WAY * N_SHOT:]
    adaptation = model.masks_and_strengths(support, N_WAY, N_SHOT)
    alpha = adaptation.alpha.detach().clone().requires_grad_(True)
    scale = GLoFA.scale(adaptation.m_task.detach(), adaptation.m_cls.detach(), alpha)  # (N, d), the masks held
    prototypes = F.normalize(support.unflatten(0, (N_SHOT, N_WAY)).mean(dim=0) * scale, dim=-1)  # (N, d)
    adapted = query[:, None, :] * scale  # (M, N, d): q * s_n
    length = adapted.norm(dim=-1)  # (M, N)
    cosine = (adapted / length[..., None] * prototypes).sum(dim=-1)  # (M, N)
    logits = length * cosine / model.tau
    right = (logits.argmax(dim=1) == targets).float()

    def pull(logits: torch.Tensor, weights: torch.Tensor) -> np.ndarray:
        loss = (F.cross_entropy(logits, targets, reduction='none') * weights).sum() / len(targets)
        return torch.autograd.grad(loss, alpha, retain_graph=True)[0].numpy()
    every = torch.ones_like(right)
    return np.stack([pull(logits, every), pull(length * cosine.detach() / model.tau, every),
                     pull(length.detach() * cosine / model.tau, every), pull(logits, right), pull(logits, 1 - right)])


def initial_pull(features: torch.Tensor, seed: int, tau: float) -> dict:
    """Which way the loss pulls GLoFA's strengths before any training: on the first training episodes where both
    are above 0, the untrained head's accuracy and confidence (mean largest softmax probability of a query), the
    share where d loss / d alpha > 0 (a step lowers the strength), the share where its sign for alpha_task
    equals that of d loss / d c for the logits scaled by c (the strength acting as a temperature), and the mean
    pull and its parts (``pull_parts``: through the logits' size or their direction, from right or wrong queries),
    with the share of episodes where the size part has the total's sign and outweighs the direction part."""
    model, _ = head('glofa', seed, tau)
    model.train()
    targets = query_targets(N_WAY, N_QUERY)
    down, agrees, accuracies, confidences, parts = [], [], [], [], []
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
        confidences.append(logits.detach().softmax(dim=1).max(dim=1).values.mean().item())
        parts.append(pull_parts(model, episode, targets))
    down = np.array(down, dtype=float).reshape(-1, 2)
    parts = np.array(parts).reshape(-1, len(PULL_PARTS), 2)  # (episodes, part, strength)
    nan = float('nan')
    figures = {'episodes': len(agrees), 'accuracy': 100 * float(np.mean(accuracies)) if agrees else nan,
               'confidence': float(np.mean(confidences)) if agrees else nan,
               'alpha_task_pushed_down': float(down[:, 0].mean()) if agrees else nan,
               'alpha_cls_pushed_down': float(down[:, 1].mean()) if agrees else nan,
               'agrees_with_logit_scale': float(np.mean(agrees)) if agrees else nan}
    for j, strength in enumerate(('alpha_task', 'alpha_cls')):
        for i, part in enumerate(PULL_PARTS):
            figures[f'{strength}_pull_{part}'] = float(parts[:, i, j].mean()) if agrees else nan
        size, direction, total = parts[:, 1, j], parts[:, 2, j], parts[:, 0, j]
        figures[f'{strength}_size_decides'] = (float(((np.sign(size) == np.sign(total)) & (abs(size) > abs(direction)))
                                                     .mean()) if agrees else nan)
    return figures


def cell_heads(sigma: float, tau: float) -> list:
    return list(FEATURE_HEADS) if (sigma, tau) == FULL_ROW else list(MAP_HEADS)


def feature_stage(sigma: float, knob: float, tau: float, seed: int, data: tuple[dict, dict],
                  heads: Optional[tuple] = None) -> dict:
    """Every head of one cell (``heads``, else ``cell_heads``) trained and tested at one seed, the ceiling, the
    readability and the initial pull."""
    train_features, test_features = embeddings(data[0], knob, sigma), embeddings(data[1], knob, sigma)
    chance = ceiling(test_features, data[1]['own'], tau)
    found = {'initial_pull': initial_pull(train_features, seed, tau),
             'ceiling': dict(zip(('accuracy', 'ci95'), mean_ci(100 * chance))),
             'readability': readability(train_features, data[0]['kinds'], test_features, data[1]['kinds'])}
    for name in heads or cell_heads(sigma, tau):
        start = time.perf_counter()
        model, args = head(name, seed, tau)
        record = train_head(model, args, train_features)
        values = test_head(model, test_features)
        accuracy, ci = mean_ci(100 * values[:, 0])
        figures = {'accuracy': accuracy, 'ci95': ci}
        if isinstance(model, GLoFA):  # the strengths summarised as evaluation does (EpisodeResults.diagnostics)
            figures.update(EpisodeResults('batched', values[:, 0], values[:, 1:3], values[:, 3], values[:, 4]).diagnostics(),
                           acting=[STRENGTHS[i][0] for i in ACTING_STRENGTHS[args.adaptor]])
        if record is not None:
            last = max(1, len(train_features) // 10)
            history = {'episode': list(range(1, len(train_features) + 1)), **record}
            figures.update(training_first=training_diagnostics({k: v[:last] for k, v in record.items()}),
                           training_last=training_diagnostics({k: v[-last:] for k, v in record.items()}),
                           died_at=dead_since(history, last, args.adaptor))
        figures['seconds'] = time.perf_counter() - start
        found[name] = figures
    return found


def feature_worker(threads: int) -> None:
    """A process of the feature level: its share of the cores; Ctrl-C is for the study's own process."""
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def feature_job(job: tuple) -> tuple:
    """One stage of the feature level, in a process of its own: one cell at one seed, saved to path."""
    sigma, knob, tau, seed, train_episodes, test_episodes, path, *heads = job
    atomic_save(feature_stage(sigma, knob, tau, seed, feature_data(seed, train_episodes, test_episodes),
                              tuple(heads) or None), path)
    return sigma, knob, tau, seed


def read_stage(path: str) -> dict:
    """One feature-level stage's result; another file at its path is one line naming it."""
    found = read_file(path, 'stage result')
    if not (isinstance(found, dict) and {'initial_pull', 'ceiling', 'readability', *MAP_HEADS} <= set(found)):
        raise UserError(f'{path} is not a stage result of this study: delete it, and the same command runs the stage again')
    return found


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


def paired(a: list, b: list) -> tuple[float, float]:
    """Mean ± 95 % CI over seeds of a - b, seed by seed (the same episodes)."""
    return mean_ci([x['accuracy'] - y['accuracy'] for x, y in zip(a, b)])


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


def gain_text(cell: Optional[dict], name: str) -> str:
    """'+12.30 ± 4.10 (0/3; 0.61)': a head's gain over --adaptor none in a cell, its deaths, the room it kept."""
    if cell is None or name not in cell.get('gains', {}):
        return ''
    gain, ci = cell['gains'][name]
    row = cell['heads'][name]
    died = f"{row['died']}/{row['seeds']}" if 'died' in row else '-'
    kept = f"; {gain / cell['ceiling_room']:.2f}" if cell['ceiling_room'] >= 15 else ''
    return f'{gain:+.2f} ± {ci:.2f} ({died}{kept})'


def cell_row(sigma: float, knob: float, tau: float, runs: list) -> dict:
    """One cell of the map over its seeds: every head, GLoFA - none paired, the ceiling's room, the readability,
    the untrained pull."""
    heads = {name: {**over_seeds([r[name] for r in runs]), 'runs': [r[name] for r in runs]}
             for name in cell_heads(sigma, tau)}
    none = [r['glofa-none'] for r in runs]
    gain, gain_ci = paired([r['glofa'] for r in runs], none)
    room, room_ci = paired([r['ceiling'] for r in runs], none)
    pulls = [r['initial_pull'] for r in runs]
    gains = {name: paired([r[name] for r in runs], none) for name in cell_heads(sigma, tau)
             if name in MAP_HEADS and name != 'glofa-none'}
    return {'sigma': sigma, 's': knob, 'tau': tau, 'seeds': len(runs), 'heads': heads, 'gains': gains,
            'gain': gain, 'gain_ci': gain_ci, 'gain_runs': [r['glofa']['accuracy'] - r['glofa-none']['accuracy'] for r in runs],
            'died': heads['glofa']['died'], 'ceiling': over_seeds([r['ceiling'] for r in runs]),
            'ceiling_room': room, 'ceiling_room_ci': room_ci,
            'readability': float(np.mean([r['readability']['share'] for r in runs])),
            'readability_rule': [r['readability']['rule'] for r in runs],
            'initial_pull': {key: float(np.nanmean([p[key] for p in pulls])) for key in pulls[0]}}


def correlation(x: list, y: list) -> float:
    return float(np.corrcoef(x, y)[0, 1]) if len(x) > 2 and np.std(x) > 0 and np.std(y) > 0 else float('nan')


def write_results(out: str, scale: str, settings: dict, feature: dict, image: dict, commands: list) -> dict:
    """results.md, results.json and study.png from every stage done so far."""
    seeds = settings['seeds']
    table = {'scale': scale, 'seeds': list(seeds), 'oracle_scale': ORACLE_SCALE, 'cells': [], 'full_row': {},
             'image': []}
    lines = [f'# Where the adaptors pay, die and cost{" (--quick: a check of the pipeline; its numbers answer nothing)" if scale == "quick" else ""}',
             '', f'The design, and what gain, died, room, readable and pull mean: scripts/adaptor_study.py (its docstring). '
             f'Accuracy in %, 5-way 1-shot; every figure is a mean over seeds (seeds {", ".join(map(str, seeds))}) ± 95 % '
             'CI over seeds.', '',
             f"## Feature level ({settings['train_episodes']} training episodes, {settings['test_episodes']} test episodes "
             'a seed)', '']
    cells = {}
    for tau in settings['taus']:
        for sigma in settings['sigmas']:
            for knob in settings['knobs']:
                runs = [feature[(sigma, knob, tau, s)] for s in seeds if (sigma, knob, tau, s) in feature]
                if runs:
                    cells[(sigma, knob, tau)] = cell_row(sigma, knob, tau, runs)
    table['cells'] = list(cells.values())
    for tau in settings['taus']:
        present = [c for c in cells.values() if c['tau'] == tau]
        if not present:
            continue
        for name in [h for h in MAP_HEADS if h != 'glofa-none']:
            lines += [f'### tau = {tau:g}: {name} minus --adaptor none (died in training, of seeds; share of the room '
                      f'kept where the room is 15 points or more)', '',
                      '| sigma \\ s | ' + ' | '.join(f'{k:g}' for k in settings['knobs']) + ' |',
                      '|---|' + '---|' * len(settings['knobs'])]
            for sigma in settings['sigmas']:
                lines.append(f'| {sigma:g} | ' + ' | '.join(gain_text(cells.get((sigma, k, tau)), name)
                                                           for k in settings['knobs']) + ' |')
            lines.append('')
        lines += ['', f'### tau = {tau:g}, every cell', '',
                  '| sigma | s | GLoFA | none | gain | strengths on the test | died | ceiling | room | readable | '
                  'pull: accuracy, confidence, share down |', '|---|---|---|---|---|---|---|---|---|---|---|']
        for c in present:
            g, n, p = c['heads']['glofa'], c['heads']['glofa-none'], c['initial_pull']
            lines.append(f"| {c['sigma']:g} | {c['s']:g} | {accuracy_text(g)} | {accuracy_text(n)} | "
                         f"{c['gain']:+.2f} ± {c['gain_ci']:.2f} | {strength_text(g)} | {died_text(g)} | "
                         f"{accuracy_text(c['ceiling'])} | {c['ceiling_room']:+.2f} | {c['readability']:.1f} | "
                         f"{p['accuracy']:.1f}, {p['confidence']:.2f}, {p['alpha_task_pushed_down']:.2f} |")
        lines.append('')
    if cells:  # the mechanism across the map: measured correlations over cells
        alive = [c for c in cells.values() if c['died'] == 0]
        dying = list(cells.values())
        pairs = [('gain against room, where GLoFA lived in every seed', alive, 'ceiling_room', 'gain'),
                 ('gain against readability, where GLoFA lived in every seed', alive, 'readability', 'gain'),
                 ('seeds died against the share of first episodes pulling alpha_task down', dying,
                  'alpha_task_pushed_down', 'died'),
                 ("seeds died against the untrained head's accuracy", dying, 'accuracy', 'died'),
                 ("seeds died against the untrained head's confidence", dying, 'confidence', 'died')]

        def value(c, key):
            return c[key] if key in c else c['initial_pull'][key]
        lines += ['### Across the map (over cells; Pearson r)', '', '| what | r | cells |', '|---|---|---|',
                  *[f'| {what} | {correlation([value(c, x) for c in group], [value(c, y) for c in group]):.2f} | '
                    f'{len(group)} |' for what, group, x, y in pairs], '']
    row = [c for c in cells.values() if (c['sigma'], c['tau']) == FULL_ROW]
    if row:  # every head where the first study looked
        lines += [f'### Every head at sigma = {FULL_ROW[0]:g}, tau = {FULL_ROW[1]:g}', '',
                  '| head | ' + ' | '.join(f"s = {c['s']:g}" for c in row) + ' |', '|---|' + '---|' * len(row)]
        lines += [f'| {name} | ' + ' | '.join(accuracy_text(c['heads'][name]) for c in row) + ' |' for name in FEATURE_HEADS]
        for name in ('glofa', 'ablation: glofa-hbias1'):
            lines.append(f'| {name} minus glofa-none, paired by seed | ' + ' | '.join(
                '{:+.2f} ± {:.2f}'.format(*paired(c['heads'][name]['runs'], c['heads']['glofa-none']['runs']))
                for c in row) + ' |')
            lines.append(f'| {name}: alpha_task / alpha_cls on the test | ' + ' | '.join(
                f"{c['heads'][name]['alpha_task']:.2f} / {c['heads'][name]['alpha_cls']:.2f}" for c in row) + ' |')
            lines.append(f'| {name}: died in training | ' + ' | '.join(
                f"{c['heads'][name]['died']} of {c['seeds']}" for c in row) + ' |')
        table['full_row'] = {f"{c['s']:g}": c['heads'] for c in row}
        lines.append('')
    lines += ['## Image level (the mix-grained demo, Conv-4 pretrained by pretrain.py --demo mixed)', '',
              '| encoder | tau | model | accuracy | seeds | strengths on the test | died in training |',
              '|---|---|---|---|---|---|---|']
    groups = {}
    for (arm, model, tau, seed), figures in image.items():
        groups.setdefault((arm, tau, model), []).append((seed, figures))
    for arm in IMAGE_ARMS:
        for tau in sorted({t for a, t, _ in groups if a == arm}):
            for model in IMAGE_MODELS:
                runs = [f for _, f in sorted(groups.get((arm, tau, model), []), key=lambda x: seeds.index(x[0]))]
                if not runs:
                    continue
                row = over_seeds(runs)
                entry = {'arm': arm, 'tau': tau, 'model': model, **row, 'runs': runs}
                none = [f for _, f in sorted(groups.get((arm, tau, 'glofa-none'), []), key=lambda x: seeds.index(x[0]))]
                if model != 'glofa-none' and len(none) == len(runs):
                    entry['gain'], entry['gain_ci'] = paired(runs, none)
                table['image'].append(entry)
                each = ', '.join(f"{r['accuracy']:.2f} ± {r['ci95']:.2f}" for r in runs)
                lines.append(f"| {arm} | {tau:g} | {model} | {accuracy_text(row)} | {each} | "
                             f"{strength_text(row)} | {died_text(row)} |")
    gains = [e for e in table['image'] if 'gain' in e]
    if gains:
        lines += ['', '| encoder | tau | head | minus --adaptor none, paired by seed |', '|---|---|---|---|']
        lines += [f"| {e['arm']} | {e['tau']:g} | {e['model']} | {e['gain']:+.2f} ± {e['gain_ci']:.2f} |"
                  for e in gains]
    lines += ['', '(image level, seeds: each seed\'s test accuracy ± its per-episode 95 % CI)', '',
              'Commands (the feature level runs inside this script), each to be copied as it is:', '',
              *[f'- `{c}`' + (f' ({what})' if what else '') for c, what in commands]]
    write_text(os.path.join(out, 'results.md'), '\n'.join(lines) + '\n')
    write_json(os.path.join(out, 'results.json'), table)
    draw(table, settings, os.path.join(out, 'study.png'))
    return table


def draw(table: dict, settings: dict, path: str) -> None:
    """The map: GLoFA's gain over --adaptor none against (sigma, s), a panel per tau, dead cells marked; the
    oracle mask's room; the readability; gain against room over the cells; the image level."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    sigmas, knobs, taus = settings['sigmas'], settings['knobs'], settings['taus']
    fig = Figure(figsize=(6 * (len(taus) + 1), 15), dpi=90, layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, len(taus) + 1)
    cells = {(c['sigma'], c['s'], c['tau']): c for c in table['cells']}
    limit = max([abs(g[0]) for c in table['cells'] for g in c.get('gains', {}).values()]
                + [abs(c['gain']) for c in table['cells']] + [1.0])  # the colour scales, symmetric around 0
    room_limit = max([abs(c['ceiling_room']) for c in table['cells']] + [1.0])

    def grid(ax, value, title, cmap, vmin, vmax, label, tau=None, mark_dead=False):
        data = np.full((len(sigmas), len(knobs)), np.nan)
        for i, sigma in enumerate(sigmas):
            for j, knob in enumerate(knobs):
                c = cells.get((sigma, knob, tau if tau is not None else taus[0]))
                if c is not None and value(c) is not None:
                    data[i, j] = value(c)
                    text = f'{data[i, j]:+.1f}' if vmin < 0 else f'{data[i, j]:.0f}'
                    if mark_dead and c['died']:
                        text += f"\n† {c['died']}/{c['seeds']}"
                    ax.text(j, i, text, ha='center', va='center', fontsize=8)
        image = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, origin='lower', aspect='auto')
        fig.colorbar(image, ax=ax, label=label)
        ax.set_xticks(range(len(knobs)), [f'{k:g}' for k in knobs])
        ax.set_yticks(range(len(sigmas)), [f'{s:g}' for s in sigmas])
        ax.set_xlabel("size of the nuisance in the other kind's dimensions (s)")
        ax.set_ylabel('within-class noise (sigma)')
        ax.set_title(title, fontsize=10)
        handles = [Patch(facecolor='none', edgecolor='none', label=f'colour: {label}')]
        if mark_dead:
            handles.append(Line2D([], [], linestyle='none', marker='$†$', color='black',
                                  label='† d/n: strengths died in d of n seeds'))
        ax.legend(handles=handles, fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.14), ncol=2)

    for i, tau in enumerate(taus):
        grid(axes[0, i], lambda c: c['gain'], f'GLoFA minus the same head without adaptors, temperature {tau:g}',
             'RdBu', -limit, limit, 'accuracy gain (points)', tau=tau, mark_dead=True)
    grid(axes[0, -1], lambda c: c['ceiling_room'], 'room of a perfect task mask over no adaptors',
         'RdBu', -room_limit, room_limit, 'accuracy gain (points)')
    def rule_gain(name):
        return lambda c: c['gains'][name][0] if name in c.get('gains', {}) else None
    for i, tau in enumerate(taus):
        grid(axes[1, i], rule_gain(CHOSEN_RULE), f'chosen rule ({CHOSEN_RULE[len("glofa-"):]}) minus no adaptors, '
             f'temperature {tau:g}', 'RdBu', -limit, limit, 'accuracy gain (points)', tau=tau)
    grid(axes[1, -1], rule_gain('glofa-constant'), f'strengths held at 1 minus no adaptors, temperature {taus[0]:g}',
         'RdBu', -limit, limit, 'accuracy gain (points)')
    grid(axes[2, 0], lambda c: c['readability'], "episodes whose kind the support set's mean squares tell",
         'viridis', 50, 100, 'share of test episodes (%)')
    ax = axes[2, 1]
    for tau, marker in zip(taus, 'os^'):
        present = [c for c in table['cells'] if c['tau'] == tau]
        points = ax.scatter([c['ceiling_room'] for c in present], [c['gain'] for c in present],
                            c=[c['readability'] for c in present], cmap='viridis', vmin=50, vmax=100, marker=marker,
                            edgecolors=['red' if c['died'] else 'none' for c in present],
                            label=f'temperature {tau:g} (red edge: died in a seed)')
    if table['cells']:
        fig.colorbar(points, ax=ax, label='readable episodes (%)')
    ax.axhline(0, color='black', linewidth=0.8)
    ax.plot([0, room_limit], [0, room_limit], color='grey', linewidth=0.8, linestyle='--', label='gain = room')
    ax.set_xlabel('room of a perfect task mask (points)')
    ax.set_ylabel('GLoFA minus no adaptors (points)')
    ax.set_title('what GLoFA takes of the room, each cell', fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[2, -1] if len(taus) > 1 else None
    if ax is not None:
        entries = table['image']
        labels = sorted({(e['arm'], e['tau']) for e in entries}, key=lambda x: (list(IMAGE_ARMS).index(x[0]), x[1]))
        width = 0.8 / len(IMAGE_MODELS)
        for j, model in enumerate(IMAGE_MODELS):
            rows = [next((e for e in entries if (e['arm'], e['tau'], e['model']) == (*label, model)), None)
                    for label in labels]
            if not any(rows):  # a head that did not run (--quick) has no bar and no legend entry
                continue
            xs = [i + (j - (len(IMAGE_MODELS) - 1) / 2) * width for i, r in enumerate(rows) if r]
            ax.bar(xs, [r['accuracy'] for r in rows if r], width, yerr=[r['ci_over_seeds'] for r in rows if r],
                   capsize=3, label=IMAGE_LABELS[model])
        ax.set_xticks(range(len(labels)), [f'{a}\ntau {t:g}' for a, t in labels], fontsize=8)
        accuracies = [e['accuracy'] for e in entries]
        if accuracies:
            ax.set_ylim(max(0.0, min(accuracies) - 5), min(100.0, max(accuracies) + 3))
        else:
            ax.text(0.5, 0.5, 'the image level is not in this run', ha='center', va='center', transform=ax.transAxes)
        ax.set_title('images (mix-grained demo, pretrained Conv-4): test accuracy', fontsize=10)
        ax.set_ylabel('accuracy (%, 95 % CI over seeds)')
        if accuracies:
            ax.legend(fontsize=7)
    save_figure(fig, path)


# ------------------------------------------------------------------ choosing a strength rule (--choose)
CHOOSING_SEEDS = (11, 12)  # used for the choice alone: never reported as results
CHOOSING_CELLS = tuple((0.5, knob, tau) for tau in (1.0, 2.0) for knob in (0.5, 1.0, 2.0, 3.0))
CANDIDATES = ('glofa-mix', 'glofa-mix-direction')


def choose(out: str, jobs: int) -> str:
    """Each candidate rule on CHOOSING_CELLS at CHOOSING_SEEDS (3000 training episodes, as the map), against
    --adaptor none and the oracle task mask; DIR/choice.md. The rule kept is the one meeting the map's goal in the
    most cells (at least half of the room kept where the room is 15 points or more, at most 1 point lost where it
    is 5 or less), ties broken by the larger mean share of the room kept where it is 15 or more."""
    settings = SCALES['full']
    folder = os.path.join(out, 'choice')
    os.makedirs(folder, exist_ok=True)
    path = {key: os.path.join(folder, 'sigma{:g}-s{:g}-tau{:g}-seed{}.pt'.format(*key))
            for key in [(*cell, seed) for cell in CHOOSING_CELLS for seed in CHOOSING_SEEDS]}
    todo = [(*key, settings['train_episodes'], settings['test_episodes'], p, 'glofa-none', *CANDIDATES)
            for key, p in path.items() if not os.path.isfile(p)]
    if todo:
        with progress(total=len(todo), desc=f'choosing, {jobs} at a time', unit='stage') as bar, \
                multiprocessing.get_context('spawn').Pool(min(jobs, len(todo)), feature_worker,
                                                          (threads_per_job(jobs),)) as pool:
            for _ in pool.imap_unordered(feature_job, todo):
                bar.update(1)
    found = {key: read_file(p, 'stage result') for key, p in path.items()}
    lines = ['# The strength rule, chosen on seeds never reported', '',
             f'Seeds {", ".join(map(str, CHOOSING_SEEDS))}; cells (sigma, s, tau); gain over --adaptor none and room '
             'in points, mean over the seeds; kept: gain / room where the room is 15 or more. Rule: '
             'scripts/adaptor_study.py, choose().', '',
             '| rule | ' + ' | '.join('{:g}, {:g}, {:g}'.format(*cell) for cell in CHOOSING_CELLS) + ' | goal met | mean kept |',
             '|---|' + '---|' * (len(CHOOSING_CELLS) + 2)]
    scores = {}
    for rule in CANDIDATES:
        cells, met, kept = [], 0, []
        for cell in CHOOSING_CELLS:
            runs = [found[(*cell, seed)] for seed in CHOOSING_SEEDS]
            gain = float(np.mean([r[rule]['accuracy'] - r['glofa-none']['accuracy'] for r in runs]))
            room = float(np.mean([r['ceiling']['accuracy'] - r['glofa-none']['accuracy'] for r in runs]))
            met += (room >= 15 and gain >= room / 2) or (room <= 5 and gain >= -1) or 5 < room < 15
            if room >= 15:
                kept.append(gain / room)
            cells.append(f'{gain:+.2f} (room {room:.1f})')
        scores[rule] = (met, float(np.mean(kept)) if kept else float('nan'))
        lines.append(f'| {rule} | ' + ' | '.join(cells) + f' | {met} of {len(CHOOSING_CELLS)} | {scores[rule][1]:.2f} |')
    chosen = max(CANDIDATES, key=lambda rule: scores[rule])
    lines += ['', f'Chosen: {chosen}.']
    write_text(os.path.join(out, 'choice.md'), '\n'.join(lines) + '\n')
    return chosen


# ------------------------------------------------------------------ the study
def image_flags(save_dir: str, arm: str, model: str, tau: float, seed: int, weights: str, extra: list) -> tuple[str, list]:
    """The base path of one image-level run's files and its train.py flags."""
    return (os.path.join(save_dir, f'{arm}-{model}-tau{tau:g}-seed{seed}'),
            ['--demo', 'mixed', '--seed', str(seed), *IMAGE_MODELS[model], '--tau', f'{tau:g}', '--pretrained', weights,
             *PRETRAINED_RATES, *IMAGE_ARMS[arm], '--channels_last', '--save_dir', save_dir, *extra])


def image_figures(base: str, flags: list) -> dict:
    """One image-level run's test figures, what the adaptors did in training, and its command."""
    figures = variant_figures(base, flags)
    figures['command'] = shlex.join(['python', 'train.py', *flags])
    args = parse_args(flags)
    history = read_file(run_paths(args).stat, 'statistics file').get('training_episodes')
    figures['acting'] = [STRENGTHS[i][0] for i in ACTING_STRENGTHS[args.adaptor]]
    if history and figures['acting']:
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
    p.add_argument('--image_taus', type=float, nargs='+', default=None,
                   help="run the image level's runs at these temperatures only, now (default: all of the design); "
                        'the rest run when the command is given without it')
    p.add_argument('--choose', action='store_true',
                   help='only choose the strength rule: the candidates on a few cells at seeds never reported '
                        '(DIR/choice.md)')
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
    claim_output_folder(out, '--out')
    if opts.pretrained is not None and not os.path.isfile(opts.pretrained):  # before the feature level's minutes
        raise UserError(f'--pretrained {opts.pretrained}: no such file (expected Conv-4 weights in FEAT\'s format, '
                        f'as pretrain.py --demo mixed writes them)')
    if opts.choose:
        chosen = choose(out, opts.jobs)
        print(f'chosen: {chosen}; wrote {os.path.join(out, "choice.md")}')
        return {'chosen': chosen}
    os.makedirs(os.path.join(out, 'feature'), exist_ok=True)
    feature, image, done, order = {}, {}, [], []
    command = shlex.join(['python', 'scripts/adaptor_study.py', '--out', opts.out, *(['--quick'] if opts.quick else [])])
    commands = [(command, 'the whole study')]  # (command, what it is), each copied and run as it is
    data = ['--data_path', os.path.join(out, 'data', 'demo'), os.path.join(out, 'data', 'demo_fine')]  # under --out

    def stage_path(sigma: float, knob: float, tau: float, seed: int) -> str:
        return os.path.join(out, 'feature', f'{scale}-sigma{sigma:g}-s{knob:g}-tau{tau:g}-seed{seed}.pt')

    def results() -> dict:
        return write_results(out, scale, settings, feature, image,
                             commands + [(image[k]['command'], None) for k in order if k in image])

    current = ['start-up']
    cells = [(sigma, knob, tau) for tau in settings['taus'] for sigma in settings['sigmas'] for knob in settings['knobs']]
    with exit_on_interrupt(lambda: f'interrupted during {current[0]}: {os.path.join(out, "results.md")} holds every '
                                   f'result so far ({len(feature)} feature stages, {len(image)} image runs); run the '
                                   f'same command again to continue'):
        if 'feature' in opts.levels:
            current[0] = 'the feature level'
            keys = [(*cell, seed) for seed in settings['seeds'] for cell in cells]
            jobs = [(*key, settings['train_episodes'], settings['test_episodes'], stage_path(*key)) for key in keys
                    if not os.path.isfile(stage_path(*key))]
            jobs.sort(key=lambda job: (job[0], job[2]) != FULL_ROW)  # the cells with every head first: the longest
            if jobs:  # each stage in a process of its own, opts.jobs at a time
                with progress(total=len(jobs), desc=f'feature level, {opts.jobs} at a time', unit='stage') as bar, \
                        multiprocessing.get_context('spawn').Pool(min(opts.jobs, len(jobs)), feature_worker,
                                                                  (threads_per_job(opts.jobs),)) as pool:
                    for key in pool.imap_unordered(feature_job, jobs):
                        feature[key] = read_stage(stage_path(*key))
                        results()
                        bar.update(1)
            for key in keys:
                feature[key] = read_stage(stage_path(*key))
            results()
        if 'image' in opts.levels:
            current[0] = 'the pretraining'
            save_dir = os.path.join(out, 'image' if scale == 'full' else 'image-quick')
            if opts.pretrained is None:
                weights = pretrained_encoder(save_dir, [*settings['pretrain_extra'], *data], done)
                commands.append((shlex.join(['python', 'pretrain.py', '--demo', 'mixed', '--save_dir', save_dir, '--out',
                                             weights, *settings['pretrain_extra'], *data]), 'the pretraining'))
            else:  # runs from other weights go to a folder of their own
                weights = os.path.abspath(opts.pretrained)
                save_dir += '-' + hashlib.sha1(weights.encode()).hexdigest()[:8]
            runs = {}

            def run_image(keys: list) -> None:
                """The image-level runs of ``keys`` (arm, model, tau, seed) that have no figures yet, then theirs."""
                runs.update({key: image_flags(save_dir, *key, weights, [*settings['image_extra'], *data]) for key in keys})
                order.extend(keys)

                def collect(key: tuple) -> None:
                    image[key] = image_figures(*runs[key])
                    results()
                to_run = {key: variant_stage(*runs[key]) for key in keys}
                pending = [key for key in keys if to_run[key] is not None]
                for key in keys:
                    if to_run[key] is None:
                        collect(key)
                current[0] = f'the image level ({len(pending)} runs to go when it started)'
                run_stages([to_run[key] for key in pending], done, opts.jobs, finished=lambda i: collect(pending[i]))
            now = set(opts.image_taus or [*settings['image_taus'], LARGER_TAU])  # --image_taus: a part now
            run_image([(arm, model, tau, seed) for arm in IMAGE_ARMS for model in settings['image_models']
                       for tau in settings['image_taus'] if tau in now for seed in settings['seeds']])
            run_image([(arm, model, 1.0, seed) for arm in IMAGE_ARMS for model in settings['image_rules']
                       for seed in settings['seeds'] if 1.0 in now])  # the strength rules at the method's temperature
            larger = [arm for arm in IMAGE_ARMS if max(settings['image_taus']) in now and any(
                image[(arm, 'glofa', max(settings['image_taus']), seed)].get('died_at') for seed in settings['seeds'])]
            run_image([(arm, model, LARGER_TAU, seed) for arm in larger for model in settings['image_models']
                       for seed in settings['seeds'] if LARGER_TAU in now])
    table = results()
    print(f'\nwrote {os.path.join(out, "results.md")}, results.json and study.png ({len(done)} command'
          f'{"s" if len(done) != 1 else ""} run now)')
    return table


if __name__ == '__main__':
    main(sys.argv[1:])
