"""test.py as researchers use it: the auto evaluation rule, any way and shot from one checkpoint,
several settings in one command, --json, and the adaptor diagnostics."""
import dataclasses
import json
import re

import numpy as np
import pytest
import torch
import dataloader
from harness import embeddings, runs
from models import diagnostics
from arguments import parse_args
import test as test_script
import train
from harness.demo import write_colour_dataset
from dataloader import FewShotDataset, eval_transform, open_split
from harness.device import EvalOptions
from harness.evaluation import Episodes, choose_eval_mode, run_episodes

CPU_OPTIONS = EvalOptions(torch.device('cpu'))
from models.glofa import GLoFA
from networks.convnet import ConvNet

LINE = re.compile(r'^test accuracy: (\d+\.\d\d) ± (\d+\.\d\d) % \((\d+)-way (\d+)-shot, (\d+) episodes\)$', re.M)


def test_auto_rule():
    # mini-ImageNet's test split: 12000 images; a 5-way 1-shot 15-query episode has 80 images
    assert choose_eval_mode('auto', 12000, 3, 80) == 'episodic'
    assert choose_eval_mode('auto', 12000, 10000, 80) == 'cached'
    assert choose_eval_mode('auto', 12000, 150, 80) == 'episodic'   # 12000 images either way: episodic
    assert choose_eval_mode('auto', 12000, 151, 80) == 'cached'
    assert choose_eval_mode('cached', 12000, 3, 80) == 'cached'
    assert choose_eval_mode('episodic', 12000, 10000, 80) == 'episodic'
    with pytest.raises(ValueError):
        choose_eval_mode('fast', 1, 1, 1)


@pytest.fixture(scope='module')
def wide_data(tmp_path_factory):
    """10 test classes of 7 images: 10-way and 5-shot episodes with 2 queries."""
    return write_colour_dataset(tmp_path_factory.mktemp('wide') / 'wide', classes_per_split=(4, 3, 10),
                        images_per_class=7, size=(40, 36))


def flags(data, save_dir, *extra):
    return ['--data_path', data, '--save_dir', str(save_dir), '--network_name', 'convnet', '--pretrained', 'none',
            '--N', '3', '--K', '1', '--Q', '2', '--n_training_episodes', '2', '--episode_gap', '1',
            '--n_validating_episodes', '2', '--n_testing_episodes', '4', '--n_workers', '0', *extra]


@pytest.fixture(scope='module')
def one_shot_run(wide_data, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp('saves')
    train.main(flags(wide_data, save_dir))
    return save_dir


def run_test(argv, capsys):
    capsys.readouterr()
    results = test_script.main(argv)
    return results, capsys.readouterr().out


def test_one_shot_checkpoint_in_five_shot_and_ten_way(wide_data, one_shot_run, capsys):
    _, out = run_test(flags(wide_data, one_shot_run, '--N', '3', '--K', '1'), capsys)
    assert 'trained as' not in out
    for n, k in ((3, 5), (10, 1), (10, 5)):
        results, out = run_test(flags(wide_data, one_shot_run, '--N', str(n), '--K', str(k),
                                      '--model_path', runs.run_paths(parse_args(flags(
                                          wide_data, one_shot_run))).best), capsys)
        assert f'trained as 3-way 1-shot; evaluating {n}-way {k}-shot' in out
        (line,) = LINE.findall(out)
        assert (int(line[2]), int(line[3]), int(line[4])) == (n, k, 4)
        assert list(results) == [(n, k)]


def test_several_settings_equal_single_runs(wide_data, one_shot_run, capsys, tmp_path):
    base = flags(wide_data, one_shot_run, '--model_path',
                 runs.run_paths(parse_args(flags(wide_data, one_shot_run))).best)
    both, out = run_test(base + ['--K', '1', '5', '--json', str(tmp_path / 'figures.json')], capsys)
    lines = LINE.findall(out)
    assert [(int(l[2]), int(l[3])) for l in lines] == [(3, 1), (3, 5)]
    assert '| 3 | 1 |' in out and '| 3 | 5 |' in out  # the summary table
    for (n, k), line in zip(((3, 1), (3, 5)), lines):
        alone, alone_out = run_test(base + ['--K', str(k)], capsys)
        assert LINE.findall(alone_out) == [line]
        np.testing.assert_array_equal(alone[(n, k)].accuracies, both[(n, k)].accuracies)
    figures = json.loads((tmp_path / 'figures.json').read_text())
    assert [(s['N'], s['K']) for s in figures['settings']] == [(3, 1), (3, 5)]
    for s, line in zip(figures['settings'], lines):
        assert f"{s['accuracy']:.2f}" == line[0] and f"{s['ci95']:.2f}" == line[1]
        assert s['episodes'] == 4 and 0 <= s['alpha_task_active'] <= 1


def test_several_settings_encode_the_split_once(wide_data, one_shot_run, capsys, monkeypatch):
    calls = []
    real = embeddings.encode_split
    monkeypatch.setattr(embeddings, 'encode_split', lambda *a, **k: calls.append(1) or real(*a, **k))
    path = runs.run_paths(parse_args(flags(wide_data, one_shot_run))).best
    _, out = run_test(flags(wide_data, one_shot_run, '--model_path', path, '--N', '3', '5', '--K', '1', '2',
                            '--eval_mode', 'cached', '--feature_cache', 'off'), capsys)  # none stored: encodes
    assert len(LINE.findall(out)) == 4 and len(calls) == 1


def test_default_checkpoint_of_several_settings_is_named(wide_data, one_shot_run, capsys):
    _, out = run_test(flags(wide_data, one_shot_run, '--N', '3', '4'), capsys)
    assert 'several settings: evaluating the checkpoint of the 3-way 1-shot run' in out


def test_missing_checkpoint_lists_the_runs(wide_data, one_shot_run, capsys):
    with pytest.raises(SystemExit):
        test_script.main(flags(wide_data, one_shot_run, '--seed', '5'))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    name = runs.run_name(parse_args(flags(wide_data, one_shot_run)))
    assert 'not found; runs under' in err and name in err


# ------------------------------------------------------------------ diagnostics
@pytest.fixture(scope='module')
def small_test_split(wide_data):
    return FewShotDataset(wide_data, 'test', eval_transform())


def model_with_h_bias(bias: float) -> GLoFA:
    torch.manual_seed(0)
    model = GLoFA(ConvNet(), 64)
    with torch.no_grad():
        model.h.rho[2].bias.fill_(bias)
    return model.eval()


def test_diagnostics_equal_in_both_ways(small_test_split):
    model = model_with_h_bias(0.5)  # strengths above zero
    results = {mode: run_episodes(model, small_test_split, Episodes(3, 4, 1, 2, torch.Generator().manual_seed(1)),
                                  mode, CPU_OPTIONS)
               for mode in ('cached', 'episodic')}
    cached, episodic = results['cached'], results['episodic']
    assert cached.mode == 'cached' and episodic.mode == 'episodic'
    np.testing.assert_array_equal(cached.accuracies, episodic.accuracies)
    np.testing.assert_allclose(cached.alphas, episodic.alphas, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cached.mask_task, episodic.mask_task, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cached.mask_cls, episodic.mask_cls, rtol=1e-4, atol=1e-6)
    assert (cached.alphas > 0).all() and not cached.adaptors_off()
    # an ablation is off when its own strength is 0, whatever the other one does
    off = dataclasses.replace(cached, alphas=cached.alphas.copy())
    off.alphas[:, 0] = 0
    assert off.adaptors_off('task') and not off.adaptors_off('class') and not off.adaptors_off('both')
    assert not off.adaptors_off('none')  # no mask to switch off
    assert diagnostics.adaptors_off_warning(off, 'test', 'task').startswith(
        'warning: alpha_task = 0 on all 3 test episodes')
    d = cached.diagnostics()
    assert d['alpha_task_active'] == 1.0 and d['alpha_cls_active'] == 1.0
    assert d['alpha_task'] == pytest.approx(cached.alphas[:, 0].mean())


def test_diagnostics_are_the_adaptations(small_test_split):
    """Each episode's recorded strengths and mask means are those of model.masks_and_strengths on its support set."""
    model = model_with_h_bias(0.3)
    results = run_episodes(model, small_test_split, Episodes(2, 3, 2, 1, torch.Generator().manual_seed(4)),
                           'cached', CPU_OPTIONS)
    features = embeddings.encode_split(model.encoder, small_test_split, CPU_OPTIONS, desc='')
    sampler = dataloader.episode_sampler(small_test_split, 2, 3, 3, torch.Generator().manual_seed(4))
    for i, indices in enumerate(sampler):
        with torch.no_grad():
            a = model.masks_and_strengths(features[indices][:6], 3, 2)
        np.testing.assert_allclose(results.alphas[i], a.alpha.numpy(), rtol=1e-6)
        assert results.mask_task[i] == pytest.approx(a.m_task.mean().item(), rel=1e-6)
        assert results.mask_cls[i] == pytest.approx(a.m_cls.mean().item(), rel=1e-6)


def test_switched_off_adaptors_are_reported(wide_data, tmp_path, capsys):
    """A model whose h bias is very negative has both strengths at 0: the log says so, and a warning is printed."""
    result = train.main(flags(wide_data, tmp_path) + ['--h_bias_init', '-10000'])
    out = capsys.readouterr().out
    assert out.count('warning: alpha_task = alpha_cls = 0 on all 2 validation episodes') == 2
    assert 'normalised-prototype ProtoNet' in out
    assert 'adaptors: alpha_task 0.0000 (> 0 in 0 % of episodes), alpha_cls 0.0000 (> 0 in 0 %)' in out
    with open(result['paths'].log) as f:
        entries = [json.loads(line) for line in f]
    assert len(entries) == 2
    for entry in entries:
        assert entry['alpha_task'] == 0.0 and entry['alpha_cls'] == 0.0
        assert entry['alpha_task_active'] == 0.0 and entry['alpha_cls_active'] == 0.0
        assert 0 <= entry['mask_task'] <= 1 and 0 <= entry['mask_cls'] <= 1


# ------------------------------------------------------------------ several roots
@pytest.fixture(scope='module')
def two_roots(tmp_path_factory):
    base = tmp_path_factory.mktemp('roots')
    return [write_colour_dataset(base / name, classes_per_split=(3, 3, 3), images_per_class=4, size=(40, 36), seed=s)
            for s, name in enumerate(('coarse_set', 'fine_set'))]


def roots_flags(roots, save_dir, *extra):
    return ['--data_path', *roots, '--save_dir', str(save_dir), '--network_name', 'convnet', '--pretrained', 'none',
            '--N', '2', '--K', '1', '--Q', '1', '--n_training_episodes', '1', '--episode_gap', '1',
            '--n_validating_episodes', '2', '--n_testing_episodes', '12', '--n_workers', '0', *extra]


GROUP_LINE = re.compile(r'^(.+): test accuracy: (\d+\.\d\d) ± (\d+\.\d\d) % \(2-way 1-shot, (\d+) episodes\)$', re.M)


@pytest.mark.parametrize('mix, groups', [('source', {'coarse_set', 'fine_set'}),
                                         ('class', {'single-source tasks', 'mixed tasks'})])
def test_per_source_lines_through_the_command_line(two_roots, tmp_path, capsys, mix, groups):
    trained = train.main(roots_flags(two_roots, tmp_path, '--task_mix', mix))
    train_out = capsys.readouterr().out
    results, out = run_test(roots_flags(two_roots, tmp_path, '--task_mix', mix), capsys)
    (result,) = results.values()
    np.testing.assert_array_equal(result.accuracies, trained['test_accuracies'])
    found = {name: int(n) for name, _, _, n in GROUP_LINE.findall(out)}
    assert set(found) <= groups and sum(found.values()) == 12
    assert GROUP_LINE.findall(out) == GROUP_LINE.findall(train_out)  # train.py's final test says the same
    for name, accuracies in result.group_accuracies().items():
        label = name if mix == 'source' else f'{name} tasks'
        assert found[label] == len(accuracies)
        line = next(l for l in GROUP_LINE.findall(out) if l[0] == label)
        assert float(line[1]) == pytest.approx(100 * accuracies.mean(), abs=0.006)
    if mix == 'source':
        assert set(found) == groups  # 12 episodes from 2 roots drawn uniformly: both appear (seeded)


def test_groups_equal_in_both_ways(two_roots):
    dataset = open_split(two_roots, 'test', eval_transform())
    model = model_with_h_bias(0.0)
    results = [run_episodes(model, dataset, Episodes(6, 2, 1, 1, torch.Generator().manual_seed(2), 'source'),
                            mode, CPU_OPTIONS) for mode in ('cached', 'episodic')]
    assert results[0].groups == results[1].groups and set(results[0].groups) <= {'coarse_set', 'fine_set'}
    np.testing.assert_array_equal(results[0].accuracies, results[1].accuracies)
