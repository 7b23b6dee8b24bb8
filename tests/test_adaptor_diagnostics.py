"""What GLoFA's adaptors do in training, recorded from the first episode: per training episode in the statistics,
per gap in the JSON log (train_* keys), equal to a naive computation; the line when the strengths have died."""
import json

import numpy as np
import pytest
import torch

import plot_curves
import train
from conftest import tiny_run_flags
from models.diagnostics import adaptors_died_line
from models.glofa import GLoFA


def naive_norm(module) -> float:
    """sqrt of the sum of squared gradient entries, in float64 numpy, one parameter at a time."""
    total = 0.0
    for p in module.parameters():
        if p.grad is not None:
            total += float(np.sum(p.grad.detach().numpy().astype(np.float64) ** 2))
    return total ** 0.5


def watched_run(argv, monkeypatch):
    """train.main(argv), recording independently, for every training episode, h's output (a forward hook on h,
    in training mode only) and the gradient norms just before each SGD step."""
    seen = {'h': [], 'grads': []}
    real_init, real_step = GLoFA.__init__, torch.optim.SGD.step
    models = []

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        models.append(self)
        self.h.register_forward_hook(lambda module, inputs, output: seen['h'].append(output.detach().tolist())
                                     if module.training else None)

    def step(self, *args, **kwargs):
        model = models[-1]
        seen['grads'].append([naive_norm(part) for part in (model.f_task, model.f_class, model.h)])
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(GLoFA, '__init__', init)
    monkeypatch.setattr(torch.optim.SGD, 'step', step)
    result = train.main(argv)
    monkeypatch.undo()
    with open(result['paths'].log) as f:
        log = [json.loads(line) for line in f]
    return result, seen, log


def test_the_diagnostics_equal_a_naive_computation(tiny_dataset, tmp_path, monkeypatch):
    # h starts at 1, so both strengths are above 0 and every part of the head gets a gradient
    argv = tiny_run_flags(tiny_dataset, tmp_path, '--h_bias_init', '1')
    argv[argv.index('--n_training_episodes') + 1], argv[argv.index('--episode_gap') + 1] = '4', '2'
    result, seen, log = watched_run(argv, monkeypatch)
    history = result['statistics']['training_episodes']
    assert history['episode'] == [1, 2, 3, 4]
    h = np.array(seen['h'])  # (4, 2): h(S) of each training episode, before the relu
    grads = np.array(seen['grads'])  # (4, 3): f_task, f_class, h
    assert h.shape == (4, 2) and grads.shape == (4, 3) and (grads > 0).all()
    expected = {'h_task': h[:, 0], 'h_cls': h[:, 1], 'alpha_task': np.maximum(h[:, 0], 0),
                'alpha_cls': np.maximum(h[:, 1], 0), 'grad_f_task': grads[:, 0], 'grad_f_class': grads[:, 1],
                'grad_h': grads[:, 2]}
    for key, values in expected.items():
        assert history[key] == pytest.approx(values.tolist(), rel=1e-5, abs=1e-7), key
    assert len(log) == 2
    for entry, rows in zip(log, (slice(0, 2), slice(2, 4))):
        assert entry['train_alpha_task'] == pytest.approx(expected['alpha_task'][rows].mean(), rel=1e-5)
        assert entry['train_alpha_cls'] == pytest.approx(expected['alpha_cls'][rows].mean(), rel=1e-5)
        assert entry['train_alpha_task_active'] == (h[rows, 0] > 0).mean()
        assert entry['train_alpha_cls_active'] == (h[rows, 1] > 0).mean()
        assert entry['train_h_preactivation'] == pytest.approx(h[rows].mean(), rel=1e-5)
        assert entry['train_h_preactivation_task'] == pytest.approx(h[rows, 0].mean(), rel=1e-5)
        assert entry['train_grad_f_task'] == pytest.approx(grads[rows, 0].mean(), rel=1e-5)
        assert entry['train_grad_f_class'] == pytest.approx(grads[rows, 1].mean(), rel=1e-5)
        assert entry['train_grad_h'] == pytest.approx(grads[rows, 2].mean(), rel=1e-5)
    # the statistics file on disk holds the same record, beside the reference's lists
    saved = torch.load(result['paths'].stat, weights_only=False)
    assert saved['training_episodes'] == history and len(saved['training_loss']) == 2
    assert plot_curves.training_episodes(result['paths'].stat) == history  # what plot_curves.py draws


def test_dead_strengths_are_reported_once_with_the_episode_and_the_measured_gradient(tiny_dataset, tmp_path,
                                                                                     monkeypatch, capsys):
    # h starts far below 0: both strengths are 0 from episode 1, and relu passes h nothing
    argv = tiny_run_flags(tiny_dataset, tmp_path, '--h_bias_init', '-100')
    argv[argv.index('--n_training_episodes') + 1], argv[argv.index('--episode_gap') + 1] = '4', '2'
    result, seen, log = watched_run(argv, monkeypatch)
    grads = np.array(seen['grads'])
    assert (grads == 0).all()  # measured independently: no gradient reaches f_task, f_class or h
    for entry in log:
        assert entry['train_alpha_task_active'] == entry['train_alpha_cls_active'] == 0
        assert entry['train_grad_h'] == entry['train_grad_f_task'] == entry['train_grad_f_class'] == 0
        assert entry['train_h_preactivation'] < -50
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('adaptors:') and 'training' in line]
    assert len(lines) == 1  # two dead gaps, one line
    assert 'since episode 1;' in lines[0] and 'exactly 0' in lines[0]


def test_a_model_without_adaptors_records_none(tiny_dataset, tmp_path):
    result = train.main(tiny_run_flags(tiny_dataset, tmp_path, '--model_name', 'feat'))
    assert 'training_episodes' not in result['statistics']
    with open(result['paths'].log) as f:
        assert not any(key.startswith('train_') for line in f for key in json.loads(line))


def test_died_line_names_the_episode_after_the_last_active_one():
    history = {'episode': [1, 2, 3, 4, 5, 6], 'alpha_task': [0.5, 0, 0.2, 0, 0, 0], 'alpha_cls': [0, 0, 0, 0, 0, 0],
               'h_task': [0.5, -1, 0.2, -1, -2, -3], 'h_cls': [-1] * 6, 'grad_h': [1, 0, 1, 0, 0, 0]}
    line = adaptors_died_line(history, 3, 'both')
    assert 'up to episode 6' in line and 'since episode 4;' in line and '-2.000 (alpha_task)' in line
    assert adaptors_died_line(history, 4, 'both') is None  # episode 3 was active
    assert adaptors_died_line(history, 3, 'none') is None  # no strength acts
    history['alpha_cls'][4] = 1.0
    assert adaptors_died_line(history, 3, 'task') is not None  # alpha_cls does not act on 'task'
    assert adaptors_died_line(history, 3, 'class') is None
