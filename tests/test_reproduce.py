"""scripts/reproduce.py --demo end to end, on the demo data with a tiny schedule: every stage runs once,
a second call runs none, and a cell that lost its figures is tested again without being retrained."""
import json
import os

import pytest

import reproduce  # from scripts/ (pytest.ini puts it on the path)

TINY = ['--extra', '--n_training_episodes', '2', '--episode_gap', '1', '--n_validating_episodes', '2',
        '--n_testing_episodes', '3', '--Q', '2', '--n_workers', '0']
TINY_PRETRAIN = ['--pretrain_extra', '--epochs 1 --val_episodes 2 --n_workers 0']


@pytest.fixture(scope='module')
def reproduced(tmp_path_factory):
    folder = tmp_path_factory.mktemp('reproduce')
    cwd = os.getcwd()
    os.chdir(folder)  # the demo data is written under the current folder, as train.py --demo does
    try:
        argv = ['--demo', '--out', str(folder / 'out'), '--shots', '2', *TINY_PRETRAIN, *TINY]
        first = reproduce.main(argv)
        yield folder / 'out', argv, first
    finally:
        os.chdir(cwd)


def test_every_stage_runs_and_the_table_holds_every_cell(reproduced):
    out, _, first = reproduced
    assert [line.split()[1] for line in first['ran']] == ['pretrain.py', 'test.py'] + ['train.py'] * 3
    assert set(first['cells']) == {(m, k) for m in ('glofa', 'protonet', 'feat') for k in (2,)}
    table = (out / 'results.md').read_text()
    for (model, k), figures in first['cells'].items():
        with open(out / 'figures' / f'{model}-5way-{k}shot.json') as f:
            assert json.load(f)['settings'][0]['accuracy'] == figures['accuracy']
        assert f"{figures['accuracy']:.2f} ± {figures['ci95']:.2f}" in table
        assert figures['episodes'] == 3 and (figures['N'], figures['K']) == (5, k)
    assert 'alpha_task' in first['cells'][('glofa', 2)] and 'alpha_task' not in first['cells'][('feat', 2)]
    assert {s['metric'] for s in first['check']['settings']} == {'euclidean', 'cosine'}
    # the pretraining's weights are what every cell started from
    assert all(str(out / 'pretrained.pth') in line for line in first['ran'][1:])


def test_a_second_call_runs_nothing_and_a_lost_figure_is_only_retested(reproduced):
    out, argv, first = reproduced
    before = (out / 'results.md').read_text()
    again = reproduce.main(argv)
    assert again['ran'] == [] and (out / 'results.md').read_text() == before
    os.remove(out / 'figures' / 'feat-5way-2shot.json')
    third = reproduce.main(argv)
    assert [line.split()[1] for line in third['ran']] == ['test.py']  # trained already: tested, not retrained
    assert third['cells'][('feat', 2)]['accuracy'] == first['cells'][('feat', 2)]['accuracy']


def test_pretrain_and_pretrained_together_are_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(['--pretrain', '--pretrained', 'x.pth', '--out', str(tmp_path)])
    assert exit_info.value.code == 2 and '--pretrain' in capsys.readouterr().err


def test_the_mix_grained_study_runs_end_to_end(tmp_path, monkeypatch):
    """scripts/mixed_ablation.py under the paper's protocol, tiny: pretraining, two variants, one seed, a table."""
    import mixed_ablation
    monkeypatch.chdir(tmp_path)  # --demo mixed writes its data under the current folder
    argv = ['--variants', 'glofa', 'protonet', '--seeds', '1', '--save_dir', str(tmp_path / 'study'),
            '--pretrain_extra', '--epochs 1 --val_episodes 2 --n_workers 0', *TINY]
    table = mixed_ablation.main(argv)
    assert set(table) == {'glofa', 'protonet'}
    glofa = table['glofa']['runs'][0]
    assert glofa['episodes'] == 3 and 'alpha_task' in glofa and 'alpha_task' not in table['protonet']['runs'][0]
    assert glofa['validation_strengths'] and glofa['validation_strengths'][0].startswith('episode 1:')
    assert mixed_ablation.main(argv)['glofa']['mean'] == table['glofa']['mean']  # a second call trains nothing
