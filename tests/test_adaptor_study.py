"""scripts/adaptor_study.py: --quick runs end to end and resumes; the feature benchmark at one knob and seed
reproduces its recorded figures (within their CI) and the equivalences that hold there exactly."""
import json
import os

import numpy as np
import pytest
import torch

import adaptor_study  # from scripts/ (pytest.ini puts it on the path)
from conftest import exits_with, pretrained_file


def study_in(folder, argv) -> dict:
    """adaptor_study.main(argv) from ``folder``: --demo mixed writes its data under the current folder."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return adaptor_study.main(argv)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    """The --quick study on a given Conv-4 (the pretraining itself is tested in test_pretrain and test_reproduce),
    in a folder of its own."""
    folder = tmp_path_factory.mktemp('study')
    weights = folder / 'con-pre.pth'
    pretrained_file(weights)
    argv = ['--out', str(folder / 'out'), '--quick', '--pretrained', str(weights)]
    return folder, argv, study_in(folder, argv)


def test_quick_writes_every_table_and_a_second_call_runs_nothing(quick):
    folder, argv, table = quick
    out = folder / 'out'
    for name in ('results.md', 'results.json', 'study.png'):
        assert os.path.getsize(out / name) > 0, name
    with open(out / 'results.json') as f:
        assert json.load(f) == json.loads(json.dumps(table))
    assert set(table['feature']) == {'0', '2'}
    assert all(set(heads) == set(adaptor_study.FEATURE_HEADS) for heads in table['feature'].values())
    assert set(table['image']) == set(adaptor_study.IMAGE_ARMS)
    for arm, models in table['image'].items():
        assert set(models) == {'glofa', 'protonet'}, arm
        glofa, protonet = models['glofa']['runs'][0], models['protonet']['runs'][0]
        assert glofa['episodes'] == 20 and 0 <= glofa['accuracy'] <= 100
        assert 'died_at' in glofa and 'training' in glofa  # from the run's per-episode record
        assert 'alpha_task' not in protonet and 'died_at' not in protonet
    frozen = table['image']['frozen']['glofa']['runs'][0]['command']
    assert '--freeze_encoder' in frozen
    assert '--model_path none' in table['image']['frozen']['protonet']['runs'][0]['command']  # nothing to train
    stamps = {p: os.stat(p).st_mtime_ns for p in (out / 'feature').iterdir()}
    stamps.update({p: os.stat(p).st_mtime_ns for p in out.glob('image-quick-*/*.test.json')})
    assert len(stamps) == 2 + 4
    assert study_in(folder, argv) == table
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps  # no stage was run again


def test_the_feature_benchmark_at_one_knob_and_seed(quick):
    """s = 2, seed 960402, 200 training and 200 test episodes (--quick): the figures recorded when the design was
    fixed, each within its own 95 % CI; the equivalences are exact."""
    heads = {name: row['runs'][0] for name, row in quick[2]['feature']['2'].items()}
    recorded = {'glofa': 57.20, 'protonet': 51.92, 'protonet-cosine': 57.19, 'feat': 52.60}
    for name, accuracy in recorded.items():
        assert abs(heads[name]['accuracy'] - accuracy) < heads[name]['ci95'], name
    # GLoFA without adaptors, on a fixed encoder, ranks every query as cosine ProtoNet does
    assert heads['glofa-none']['accuracy'] == heads['protonet-cosine']['accuracy']
    assert 'died_at' not in heads['glofa-none']  # it acts through no strength
    assert heads['glofa']['died_at'] is not None and heads['glofa']['alpha_task_active'] == 0
    assert heads['protonet-cosine']['accuracy'] - heads['protonet']['accuracy'] > 3  # the metric, not the adaptors
    alive = quick[2]['feature']['0']['glofa']['runs'][0]  # homogeneous tasks: the strengths stay on
    assert alive['died_at'] is None and alive['alpha_task_active'] == 1


def test_the_embeddings_follow_the_design():
    """Kind A's classes differ in dimensions 0-31 only, B's in 32-63; noise of size 1 in the kind's own
    dimensions and of the knob's size in the others; the pools of training and test classes are disjoint."""
    train_episodes, test_episodes = adaptor_study.feature_data(7, 40, 40)
    g = adaptor_study.GROUP
    for episodes in (train_episodes, test_episodes):
        for i, kind in enumerate(episodes['kinds'].tolist()):
            other = slice((1 - kind) * g, (2 - kind) * g)
            assert (episodes['means'][i][:, other] == 0).all()
            x = adaptor_study.embeddings({k: v[i:i + 1] for k, v in episodes.items()}, 3.0)[0]
            noise = episodes['noise'][i]
            assert torch.allclose(x[:, other], 3.0 * noise[:, other])
            own = slice(kind * g, (kind + 1) * g)
            assert torch.allclose(x[:, own] - episodes['means'][i][:, own], adaptor_study.WITHIN * noise[:, own], atol=1e-6)
    means = lambda episodes: {tuple(np.round(m.tolist(), 6)) for e in episodes['means'] for m in e}  # noqa: E731
    assert not means(train_episodes) & means(test_episodes)


def test_the_study_refuses_bad_input_naming_the_flag(tmp_path, capsys):
    line = exits_with(adaptor_study.main, ['--out', str(tmp_path / 'o'), '--quick', '--pretrained',
                                           str(tmp_path / 'missing.pth')], capsys)
    assert '--pretrained' in line and 'missing.pth' in line
    assert not os.path.exists(tmp_path / 'o' / 'feature')  # refused before the feature level runs
    (tmp_path / 'file').write_text('x')
    assert '--out' in exits_with(adaptor_study.main, ['--out', str(tmp_path / 'file'), '--quick'], capsys)

