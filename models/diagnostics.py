"""What GLoFA's adaptors do: the strengths, masks and gradients recorded on each training episode, and the
lines that report them (including when the strengths die)."""
from typing import Optional

import numpy as np
import torch


# what GLoFA's adaptors do in training (record_episode, called by train.py between backward and step)
# per training episode: the strengths relu(h(S)), h(S) before the relu, and the norms of the loss's gradients
ADAPTOR_RECORD = ('alpha_task', 'alpha_cls', 'h_task', 'h_cls', 'grad_f_task', 'grad_f_class', 'grad_h')


# the strengths whose masks act under each --adaptor ablation (columns of EpisodeResults.alphas)
ACTING_STRENGTHS = {'both': [0, 1], 'task': [0], 'class': [1], 'none': []}


STRENGTHS = [('alpha_task', 'h_task'), ('alpha_cls', 'h_cls')]


def gradient_norm(module: torch.nn.Module) -> torch.Tensor:
    """The L2 norm of the gradients of a module's parameters (0 where none reached them)."""
    squares = [p.grad.detach().float().pow(2).sum() for p in module.parameters() if p.grad is not None]
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros((), device=next(module.parameters()).device)


def record_episode(record: dict, model, adaptation) -> None:
    """Append what the adaptors did on one training episode to ``record``: the strengths, h(S) before the relu,
    and the norms of the loss's gradients reaching f_task, f_class and h (called between backward and step)."""
    gradients = [gradient_norm(part) for part in (model.f_task, model.f_class, model.h)]
    values = torch.cat([adaptation.alpha.detach().float(), adaptation.h_output.detach().float(),
                        torch.stack(gradients)]).tolist()
    for key, value in zip(ADAPTOR_RECORD, values):
        record[key].append(value)


def training_diagnostics(record: dict) -> dict:
    """The JSON log's train_* keys: means over a gap's episodes of the strengths, the share of episodes where
    each is above 0, h's output before the relu (both strengths together, and each), the gradient norms."""
    mean = {key: float(np.mean(values)) for key, values in record.items()}
    return {'train_alpha_task': mean['alpha_task'], 'train_alpha_cls': mean['alpha_cls'],
            'train_alpha_task_active': float(np.mean(np.array(record['alpha_task']) > 0)),
            'train_alpha_cls_active': float(np.mean(np.array(record['alpha_cls']) > 0)),
            'train_h_preactivation': (mean['h_task'] + mean['h_cls']) / 2,
            'train_h_preactivation_task': mean['h_task'], 'train_h_preactivation_cls': mean['h_cls'],
            'train_grad_f_task': mean['grad_f_task'], 'train_grad_f_class': mean['grad_f_class'],
            'train_grad_h': mean['grad_h']}


def dead_since(history: dict, gap: int, adaptor: str) -> Optional[int]:
    """The episode since which the strengths the adaptor acts through have been 0 on every training episode,
    when that holds for at least the last ``gap`` episodes of ``history`` (the per-episode record); else None."""
    acting = [STRENGTHS[i][0] for i in ACTING_STRENGTHS[adaptor]]
    alive = [any(history[a][i] > 0 for a in acting) for i in range(len(history['episode']))]
    if not acting or not alive or any(alive[-gap:]):
        return None
    return history['episode'][max((i for i, on in enumerate(alive) if on), default=-1) + 1]


def adaptors_died_line(history: dict, gap: int, adaptor: str) -> Optional[str]:
    """When the strengths the adaptor acts through were 0 on every one of the last ``gap`` training episodes
    (``history``: the statistics' per-episode record): since which episode, h's output, and the gradient that
    reached h over those episodes, as measured. None otherwise."""
    since = dead_since(history, gap, adaptor)
    if since is None:
        return None
    acting = [STRENGTHS[i] for i in ACTING_STRENGTHS[adaptor]]
    largest = max(history['grad_h'][-gap:])
    names = ' = '.join(a for a, _ in acting)
    before = ', '.join(f'{np.mean(history[h][-gap:]):.3f} ({a})' for a, h in acting)
    back = ('exactly 0 on each: relu passes h no gradient, so h is not trained back and the strengths return only '
            'if the encoder moves h\'s input' if largest == 0 else f'not 0 (largest norm {largest:.3g})')
    return (f'adaptors: {names} = 0 on all {gap} training episodes up to episode {history["episode"][-1]}, and on '
            f'every training episode since episode {since}; h(S) before the relu averaged {before} over this '
            f'interval, and the gradient reaching h was {back}')


def diagnostics_line(results) -> str:
    """'adaptors: alpha_task 0.412 (> 0 in 100 % of episodes), alpha_cls ..., mean masks task 0.31, class 0.12'."""
    d = results.diagnostics()
    return (f"adaptors: alpha_task {d['alpha_task']:.4f} (> 0 in {100 * d['alpha_task_active']:.0f} % of episodes), "
            f"alpha_cls {d['alpha_cls']:.4f} (> 0 in {100 * d['alpha_cls_active']:.0f} %); "
            f"mean mask values: task {d['mask_task']:.4f}, class {d['mask_cls']:.4f}")


def adaptors_off_warning(results, where: str, adaptor: str = 'both') -> str:
    names = ' = '.join(('alpha_task', 'alpha_cls')[i] for i in ACTING_STRENGTHS[adaptor])
    return (f'warning: {names} = 0 on all {len(results.accuracies)} {where} episodes: the adaptors '
            f'are switched off and the model is normalised-prototype ProtoNet at this point')


def episode_values(logits: torch.Tensor, adaptation, targets: torch.Tensor) -> torch.Tensor:
    """logits (..., N*Q, N), GLoFA's Adaptation (None: nan columns), targets (N*Q,) -> (..., 6): accuracy,
    alpha_task, alpha_cls, mean task mask, mean class mask, 1 where the logits are finite."""
    accuracy = (logits.argmax(dim=-1) == targets).float().mean(dim=-1)  # (...,)
    finite = torch.isfinite(logits).flatten(-2).all(dim=-1).float()  # (...,): 0 where a logit is nan or inf
    if adaptation is None:
        nan = torch.full_like(accuracy, float('nan'))
        return torch.stack([accuracy, nan, nan, nan, nan, finite], dim=-1)
    return torch.stack([accuracy, adaptation.alpha[..., 0], adaptation.alpha[..., 1],
                        adaptation.m_task.mean(dim=-1), adaptation.m_cls.mean(dim=(-2, -1)), finite], dim=-1).float()
