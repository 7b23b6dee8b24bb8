"""scripts/adaptor_study.py: --quick runs end to end and resumes; the feature benchmark at one knob and seed
reproduces its recorded figures (within their CI) and the equivalences that hold there exactly."""
import json
import math
import os

import numpy as np
import pytest
import torch

import adaptor_study  # from scripts/ (pytest.ini puts it on the path)
from conftest import exits_with, pretrained_file


def study_in(folder, argv) -> dict:
    """adaptor_study.main(argv) from ``folder``: nothing but --out may be written there."""
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
        saved = json.load(f)
    saved.pop('written_by')
    assert saved == json.loads(json.dumps(table))
    settings = adaptor_study.SCALES['quick']
    cells = {(c['sigma'], c['s'], c['tau']): c for c in table['cells']}
    assert set(cells) == {(sigma, s, tau) for sigma in settings['sigmas'] for s in settings['knobs']
                          for tau in settings['taus']}
    for (sigma, s, tau), cell in cells.items():
        expected = adaptor_study.FEATURE_HEADS if (sigma, tau) == adaptor_study.FULL_ROW else adaptor_study.MAP_HEADS
        assert set(cell['heads']) == set(expected)
        assert cell['gain'] == cell['heads']['glofa']['accuracy'] - cell['heads']['glofa-none']['accuracy']
        assert cell['ceiling_room'] == cell['ceiling']['accuracy'] - cell['heads']['glofa-none']['accuracy']
        assert 0 <= cell['readability'] <= 100
    assert set(table['full_row']) == {'0', '2'}
    runs = {(e['arm'], e['model'], e['tau']): e for e in table['image']}
    assert {(arm, tau) for arm, _, tau in runs} >= {(arm, tau) for arm in adaptor_study.IMAGE_ARMS
                                                    for tau in settings['image_taus']}
    for (arm, model, tau), entry in runs.items():
        run = entry['runs'][0]
        assert model in ('glofa', adaptor_study.CHOSEN_RULE) and run['episodes'] == 20 and 0 <= run['accuracy'] <= 100
        assert model == 'glofa' or tau == 1  # the strength rules run at the method's temperature
        assert 'died_at' in run and 'training' in run  # from the run's per-episode record
        assert f'--tau {tau:g}' in run['command'] and ('--freeze_encoder' in run['command']) == (arm == 'frozen')
        died = runs[(arm, 'glofa', max(settings['image_taus']))]['runs'][0]['died_at'] is not None
        assert ((arm, 'glofa', adaptor_study.LARGER_TAU) in runs) == died  # tau 4 exactly where tau 2 died
    assert sorted(os.listdir(folder)) == ['con-pre.pth', 'out']  # the demo data too is under --out
    assert (out / 'data' / 'demo' / 'split' / 'test.csv').is_file()
    commands = [line for line in (out / 'results.md').read_text().splitlines() if line.startswith('- `')]
    assert commands and all(line.split('`')[1].startswith('python ') for line in commands)
    assert all(line.count('`') == 2 and '(' not in line.split('`')[1] for line in commands)  # nothing but a command
    stamps = {p: os.stat(p).st_mtime_ns for p in (out / 'feature').iterdir()}
    stamps.update({p: os.stat(p).st_mtime_ns for p in out.glob('image-quick-*/*.test.json')})
    assert len(stamps) == len(cells) + len(runs)
    assert study_in(folder, argv) == table
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps  # no stage was run again


def test_the_feature_benchmark_at_one_cell_and_seed(quick):
    """sigma = 1, s = 2, tau = 1, seed 960402, 200 training and 200 test episodes (--quick): the figures recorded
    when the design was fixed, each within its own 95 % CI; the equivalences are exact."""
    cells = {(c['sigma'], c['s'], c['tau']): c for c in quick[2]['cells']}
    cell = cells[(1.0, 2.0, 1.0)]
    heads = {name: row['runs'][0] for name, row in cell['heads'].items()}
    recorded = {'glofa': 57.20, 'protonet': 51.92, 'protonet-cosine': 57.19, 'feat': 52.60,
                'glofa-constant': 56.57, 'glofa-mix-direction': 57.01}  # the last two: when the rules were added
    for name, accuracy in recorded.items():
        assert abs(heads[name]['accuracy'] - accuracy) < heads[name]['ci95'], name
    assert abs(cell['ceiling']['accuracy'] - 94.56) < 1.0 and cell['readability'] == 100
    assert heads['glofa-constant']['alpha_task'] == heads['glofa-constant']['alpha_cls'] == 1.0  # held, h unused
    assert 0 < heads['glofa-mix-direction']['alpha_task'] < 1  # a sigmoid: never exactly 0 or 1
    # GLoFA without adaptors, on a fixed encoder, ranks every query as cosine ProtoNet does
    assert heads['glofa-none']['accuracy'] == heads['protonet-cosine']['accuracy']
    assert 'died_at' not in heads['glofa-none']  # it acts through no strength
    assert heads['glofa']['died_at'] is not None and heads['glofa']['alpha_task_active'] == 0
    assert heads['protonet-cosine']['accuracy'] - heads['protonet']['accuracy'] > 3  # the metric, not the adaptors
    alive = cells[(1.0, 0.0, 1.0)]['heads']['glofa']['runs'][0]  # homogeneous tasks: the strengths stay on
    assert alive['died_at'] is None and alive['alpha_task_active'] == 1
    # the temperature divides --adaptor none's logits only: the same ranking, the same accuracy
    assert cells[(1.0, 2.0, 2.0)]['heads']['glofa-none']['accuracy'] == heads['glofa-none']['accuracy']


def tiny_episodes(n_episodes: int, seed: int) -> dict:
    """A few episodes of the design, small enough for loops."""
    g = torch.Generator().manual_seed(seed)
    return adaptor_study.draw_episodes(g, [adaptor_study.class_means(g, 8, kind) for kind in (0, 1)], n_episodes)


def test_the_ceiling_equals_a_naive_loop():
    """The oracle task mask: the kind's dimensions times ORACLE_SCALE in query and support; prototype
    normalised; logit <T(q), p / |p|> / tau; the share of queries whose largest logit is their class."""
    episodes = tiny_episodes(6, 0)
    x = adaptor_study.embeddings(episodes, 1.5, 0.5)
    n, k, g, scale = adaptor_study.N_WAY, adaptor_study.N_SHOT, adaptor_study.GROUP, adaptor_study.ORACLE_SCALE
    for tau in (1.0, 2.0):
        found = adaptor_study.ceiling(x, episodes['own'], tau)
        for e in range(len(x)):
            kind = int(episodes['kinds'][e])
            weight = [scale if kind * g <= d < (kind + 1) * g else 1.0 for d in range(2 * g)]
            right = 0
            for j in range(n * adaptor_study.N_QUERY):
                q = x[e, n * k + j].tolist()
                logits = []
                for c in range(n):
                    p = [sum(x[e, s * n + c, d].item() for s in range(k)) / k * weight[d] for d in range(2 * g)]
                    norm = math.sqrt(sum(v * v for v in p))
                    logits.append(sum(q[d] * weight[d] * p[d] / norm for d in range(2 * g)) / tau)
                right += max(range(n), key=lambda c: logits[c]) == j % n
            assert abs(found[e] - right / (n * adaptor_study.N_QUERY)) < 1e-12


def test_the_readability_equals_a_naive_loop():
    """The half of the dimensions with the larger (or smaller, whichever was right on more training episodes)
    mean square over the support vectors is read as the kind's own; the share right on the test episodes."""
    train, test = tiny_episodes(6, 1), tiny_episodes(6, 2)
    n, k, g = adaptor_study.N_WAY, adaptor_study.N_SHOT, adaptor_study.GROUP

    def larger(x, e):
        halves = [sum(x[e, i, d].item() ** 2 for i in range(n * k) for d in range(h * g, (h + 1) * g)) for h in (0, 1)]
        return 0 if halves[0] > halves[1] else 1
    for knob, sigma in ((1.5, 0.3), (0.5, 1.0), (0.0, 0.3)):
        x_train = adaptor_study.embeddings(train, knob, sigma)
        x_test = adaptor_study.embeddings(test, knob, sigma)
        right = sum(larger(x_train, e) == int(train['kinds'][e]) for e in range(len(x_train)))
        flip = right < len(x_train) / 2
        read = [1 - larger(x_test, e) if flip else larger(x_test, e) for e in range(len(x_test))]
        share = 100 * sum(r == int(t) for r, t in zip(read, test['kinds'])) / len(x_test)
        found = adaptor_study.readability(x_train, train['kinds'], x_test, test['kinds'])
        assert found['rule'] == ('smaller' if flip else 'larger') and abs(found['share'] - share) < 1e-9


def test_the_embeddings_follow_the_design():
    """Kind A's classes differ in dimensions 0-31 only, B's in 32-63; noise of size sigma in the kind's own
    dimensions and of the knob's size in the others; the pools of training and test classes are disjoint."""
    train_episodes, test_episodes = adaptor_study.feature_data(7, 40, 40)
    g = adaptor_study.GROUP
    for episodes in (train_episodes, test_episodes):
        for i, kind in enumerate(episodes['kinds'].tolist()):
            other = slice((1 - kind) * g, (2 - kind) * g)
            assert (episodes['means'][i][:, other] == 0).all()
            x = adaptor_study.embeddings({k: v[i:i + 1] for k, v in episodes.items()}, 3.0, 0.5)[0]
            noise = episodes['noise'][i]
            assert torch.allclose(x[:, other], 3.0 * noise[:, other])
            own = slice(kind * g, (kind + 1) * g)
            assert torch.allclose(x[:, own] - episodes['means'][i][:, own], 0.5 * noise[:, own], atol=1e-6)
    means = lambda episodes: {tuple(np.round(m.tolist(), 6)) for e in episodes['means'] for m in e}  # noqa: E731
    assert not means(train_episodes) & means(test_episodes)


def test_the_study_refuses_bad_input_naming_the_flag(tmp_path, capsys):
    line = exits_with(adaptor_study.main, ['--out', str(tmp_path / 'o'), '--quick', '--pretrained',
                                           str(tmp_path / 'missing.pth')], capsys)
    assert '--pretrained' in line and 'missing.pth' in line
    assert not os.path.exists(tmp_path / 'o' / 'feature')  # refused before the feature level runs
    (tmp_path / 'file').write_text('x')
    assert '--out' in exits_with(adaptor_study.main, ['--out', str(tmp_path / 'file'), '--quick'], capsys)



def test_the_pull_on_the_strengths_splits_exactly_into_its_parts():
    """pull_parts: the total is d loss / d alpha through GLoFA's own logits (float64); size + direction and
    right + wrong add up to it, and each part is d loss / d alpha of its own factor alone."""
    torch.manual_seed(0)
    model = adaptor_study.GLoFA(torch.nn.Identity(), 2 * adaptor_study.GROUP, tau=2.0, h_bias_init=1.0).double()
    episode = torch.randn(adaptor_study.N_WAY * (adaptor_study.N_SHOT + adaptor_study.N_QUERY),
                          2 * adaptor_study.GROUP, dtype=torch.float64)
    targets = adaptor_study.query_targets(adaptor_study.N_WAY, adaptor_study.N_QUERY)
    logits, adaptation = model.episode(episode, adaptor_study.N_WAY, adaptor_study.N_SHOT)
    expected = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, targets), adaptation.alpha)[0].numpy()
    total, size, direction, right, wrong = adaptor_study.pull_parts(model, episode, targets)
    np.testing.assert_allclose(total, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(size + direction, total, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(right + wrong, total, rtol=1e-10, atol=1e-12)
    assert not np.allclose(size, 0) and not np.allclose(direction, 0)
    # the size part alone: d loss / d alpha when only the adapted queries' lengths move (a naive loop over queries)
    alpha = adaptation.alpha.detach().clone().requires_grad_(True)
    m_task, m_cls = adaptation.m_task.detach(), adaptation.m_cls.detach()
    support, query = episode[:adaptor_study.N_WAY], episode[adaptor_study.N_WAY:]
    fixed = (1 + adaptation.alpha.detach()[0] * m_task) * (1 + adaptation.alpha.detach()[1] * m_cls)
    moving = (1 + alpha[0] * m_task) * (1 + alpha[1] * m_cls)
    rows = []
    for q in query:
        rows.append(torch.stack([(q * moving[n]).norm() * torch.nn.functional.cosine_similarity(
            q * fixed[n], support[n] * fixed[n], dim=0) for n in range(adaptor_study.N_WAY)]) / model.tau)
    naive = torch.autograd.grad(torch.nn.functional.cross_entropy(torch.stack(rows), targets), alpha)[0].numpy()
    np.testing.assert_allclose(size, naive, rtol=1e-10, atol=1e-12)


def test_image_taus_runs_a_part_of_the_image_level_now(tmp_path):
    """--image_taus 1: the image level's runs at tau 1 only (the reference and the chosen rule in --quick); the
    rest are left for the command without it."""
    weights = tmp_path / 'con-pre.pth'
    pretrained_file(weights)
    table = study_in(tmp_path, ['--out', str(tmp_path / 'out'), '--quick', '--pretrained', str(weights),
                                '--levels', 'image', '--image_taus', '1'])
    runs = {(e['arm'], e['model'], e['tau']) for e in table['image']}
    assert runs == {(arm, model, 1.0) for arm in adaptor_study.IMAGE_ARMS
                    for model in ('glofa', adaptor_study.CHOSEN_RULE)}
