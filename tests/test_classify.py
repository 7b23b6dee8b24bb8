"""scripts/classify.py on folders of images, and tasks whose classes have different numbers of images
computed exactly as the method defines them (each class's set as it is)."""
import csv
import os
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import checkpoints, runs
import train
from arguments import parse_args
from conftest import exits_with, pretrained_file
from dataloader import FewShotDataset, eval_transform
from harness.embeddings import encode_split
from harness.device import EvalOptions
from models.feat import FEAT
from models.glofa import GLoFA
from models.protonet import ProtoNet

import classify  # from scripts/ (pytest.ini puts it on the path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ uneven shots, exactly
def naive_glofa(model: GLoFA, sets, query):
    """GLoFA's formulas one class at a time: f_task and h over all support images, f_class over class n's own."""
    support = torch.cat(sets)
    m_task = F.relu6(model.f_task(support)) / 6 * model.delta
    alpha_task, alpha_cls = F.relu(model.h(support))
    rows = []
    for s in sets:
        m_cls = F.relu6(model.f_class(s)) / 6 * model.delta
        scale = (1 + alpha_task * m_task) * (1 + alpha_cls * m_cls)
        prototype = F.normalize((s * scale).mean(dim=0), dim=0)
        rows.append((query * scale) @ prototype / model.tau)
    return torch.stack(rows, dim=1)


def sets_and_query(shots, d=6, n_query=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(k, d, generator=g, dtype=torch.float64) for k in shots], \
        torch.randn(n_query, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize('shots', [(1, 3, 2), (5, 1), (2, 2, 2)])
def test_glofa_on_classes_of_any_size_equals_one_class_at_a_time(shots):
    torch.manual_seed(0)
    model = GLoFA(nn.Identity(), 6, tau=0.5, h_bias_init=1.0).double()  # strengths above 0: the masks act
    sets, query = sets_and_query(shots)
    logits, adaptation = model.logits_for_sets(sets, query)
    torch.testing.assert_close(logits, naive_glofa(model, sets, query), rtol=1e-12, atol=1e-12)
    assert (adaptation.alpha > 0).all()


def test_equal_sets_are_the_shot_major_episode():
    torch.manual_seed(1)
    model = GLoFA(nn.Identity(), 6, h_bias_init=1.0).double()
    sets, query = sets_and_query((3, 3, 3))
    episode = torch.cat([torch.stack(sets, dim=1).flatten(0, 1), query])  # position k*N + n: image k of class n
    torch.testing.assert_close(model.logits_for_sets(sets, query)[0], model.episode(episode, 3, 3)[0])
    torch.testing.assert_close(model.uneven_logits(sets, query)[0], model.episode(episode, 3, 3)[0],
                               rtol=1e-12, atol=1e-12)  # the uneven path agrees where both apply


@pytest.mark.parametrize('make', [lambda: ProtoNet(nn.Identity(), 'euclidean', 2.0),
                                  lambda: ProtoNet(nn.Identity(), 'cosine', 2.0),
                                  lambda: FEAT(nn.Identity(), 6, 'cosine', 3.0).eval()])
def test_baselines_on_classes_of_any_size_use_each_class_mean(make):
    torch.manual_seed(2)
    model = make().double()
    sets, query = sets_and_query((1, 4))
    logits, _ = model.logits_for_sets(sets, query)
    torch.testing.assert_close(logits, model.head(torch.stack([s.mean(0) for s in sets]), query))
    repeated = [s.repeat(2, 1) for s in sets]  # the same means: the same logits
    torch.testing.assert_close(model.logits_for_sets(repeated, query)[0], logits)


# ------------------------------------------------------------------ the script
@pytest.fixture(autouse=True)
def elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the support set's embeddings go to ./saves/features


@pytest.fixture(scope='module')
def trained(tiny_dataset, tmp_path_factory):
    save = tmp_path_factory.mktemp('saves')
    argv = ['--data_path', tiny_dataset, '--save_dir', str(save), '--network_name', 'convnet', '--pretrained', 'none',
            '--N', '3', '--K', '1', '--Q', '3', '--n_training_episodes', '4', '--episode_gap', '2',
            '--n_validating_episodes', '2', '--n_testing_episodes', '2', '--n_workers', '0']
    train.main(argv)
    return argv, runs.run_paths(parse_args(argv)).best


def class_folders(dataset: FewShotDataset, root, shots: dict) -> tuple[str, list, list]:
    """The test split as a support folder (class name -> its first shots[c] images) and the other images
    as queries, with their labels."""
    support = root / 'support'
    queries, labels = [], []
    taken = {c: 0 for c in range(len(dataset.class_names))}
    for i, (name, label) in enumerate(zip(dataset.filenames, dataset.labels)):
        path = os.path.join(dataset.image_dir, name)
        if taken[label] < shots[label]:
            os.makedirs(support / dataset.class_names[label], exist_ok=True)
            shutil.copy(path, support / dataset.class_names[label] / name)
            taken[label] += 1
        else:
            queries.append(path)
            labels.append(label)
    return str(support), queries, labels


def test_classify_agrees_with_test_py_and_writes_csv_and_picture(trained, tiny_dataset, tmp_path, capsys):
    argv, checkpoint = trained
    dataset = FewShotDataset(tiny_dataset, 'test', eval_transform())
    support, queries, labels = class_folders(dataset, tmp_path, {0: 1, 1: 1, 2: 1})
    out, picture = tmp_path / 'preds.csv', tmp_path / 'grid.png'
    capsys.readouterr()
    result = classify.main(['--model_path', checkpoint, '--support', support, '--query', *queries,
                            '--out', str(out), '--picture', str(picture)])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith(tuple(queries))]
    assert result['classes'] == dataset.class_names and len(printed) == len(queries)
    # the same episode through the model as test.py runs it: the split's embeddings, shot-major
    model = checkpoints.build_model(parse_args(argv), pretrained=False)
    from harness.checkpoints import load_model_checkpoint
    load_model_checkpoint(model, checkpoint)
    features = encode_split(model.encoder, dataset, EvalOptions(torch.device('cpu')), desc='')
    first = [dataset.labels.index(c) for c in range(3)]
    rest = [i for i in range(len(dataset)) if i not in first]
    logits, _ = model.episode(features[first + rest], 3, 1)
    torch.testing.assert_close(result['probabilities'], torch.softmax(logits, dim=1), rtol=1e-5, atol=1e-6)
    correct = sum(p == dataset.class_names[y] for p, y in zip(result['predictions'], labels))
    assert correct / len(labels) > 0.8  # colours a class each: an easy task
    with open(out) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['file', 'prediction', 'probability', *dataset.class_names]
    for row, line, p in zip(rows[1:], printed, result['probabilities']):
        assert line.startswith(f'{row[0]}: {row[1]} ({100 * float(row[2]):.1f} %)')
        assert [float(v) for v in row[3:]] == pytest.approx(p.tolist(), abs=1e-6)
    assert picture.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_classify_takes_classes_of_different_sizes_and_the_first_k(trained, tiny_dataset, tmp_path, capsys):
    _, checkpoint = trained
    dataset = FewShotDataset(tiny_dataset, 'test', eval_transform())
    support, queries, _ = class_folders(dataset, tmp_path, {0: 1, 1: 3, 2: 2})
    uneven = classify.main(['--model_path', checkpoint, '--support', support, '--query', queries[0]])
    assert uneven['probabilities'].shape == (1, 3)
    first = classify.main(['--model_path', checkpoint, '--support', support, '--query', queries[0], '--shots', '1'])
    line = exits_with(classify.main, ['--model_path', checkpoint, '--support', support, '--query', queries[0],
                                      '--shots', '2'], capsys)
    assert dataset.class_names[0] in line and '--shots 2' in line
    assert not torch.equal(first['probabilities'], uneven['probabilities'])


def test_classify_refuses_bad_input_in_one_line(trained, tiny_dataset, tmp_path, capsys):
    _, checkpoint = trained
    dataset = FewShotDataset(tiny_dataset, 'test', eval_transform())
    support, queries, _ = class_folders(dataset, tmp_path, {0: 1, 1: 1, 2: 1})
    empty = tmp_path / 'support' / 'n99999999'
    empty.mkdir()
    (empty / 'notes.txt').write_text('not an image')
    line = exits_with(classify.main, ['--model_path', checkpoint, '--support', support, '--query', queries[0]], capsys)
    assert str(empty) in line
    shutil.rmtree(empty)
    one = tmp_path / 'one'
    shutil.copytree(tmp_path / 'support' / dataset.class_names[0], one / dataset.class_names[0])
    assert '1 class' in exits_with(classify.main, ['--model_path', checkpoint, '--support', str(one), '--query',
                                                   queries[0]], capsys)
    text = tmp_path / 'query.jpg'
    text.write_text('hello')
    assert str(text) in exits_with(classify.main, ['--model_path', checkpoint, '--support', support, '--query',
                                                   str(text)], capsys)
    line = exits_with(classify.main, ['--model_path', checkpoint, '--network_name', 'resnet', '--support', support,
                                      '--query', queries[0]], capsys)
    assert 'network_name' in line
    import numpy as np
    from PIL import Image
    mode_f = tmp_path / 'float.tiff'
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(mode_f)
    assert 'mode F' in exits_with(classify.main, ['--model_path', checkpoint, '--support', support, '--query',
                                                  str(mode_f)], capsys)


def test_classify_warns_when_a_query_is_in_the_support(trained, tiny_dataset, tmp_path, capsys):
    _, checkpoint = trained
    dataset = FewShotDataset(tiny_dataset, 'test', eval_transform())
    support, _, _ = class_folders(dataset, tmp_path, {0: 2, 1: 2, 2: 2})
    name = dataset.class_names[0]
    again = os.path.join(support, name, sorted(os.listdir(os.path.join(support, name)))[0])
    classify.main(['--model_path', checkpoint, '--support', support, '--query', again])
    assert 'also in the support set' in capsys.readouterr().out


def test_classify_with_a_pretrained_encoder_alone(tiny_dataset, tmp_path, capsys):
    weights = tmp_path / 'con-pre.pth'
    pretrained_file(weights, seed=0)
    dataset = FewShotDataset(tiny_dataset, 'test', eval_transform())
    support, queries, _ = class_folders(dataset, tmp_path, {0: 1, 1: 1, 2: 1})
    line = exits_with(classify.main, ['--pretrained', str(weights), '--model_name', 'protonet', '--support', support,
                                      '--query', queries[0]], capsys)
    assert '--network_name convnet' in line  # a Conv-4 file read as the default ResNet-12: the flag that fixes it
    result = classify.main(['--pretrained', str(weights), '--model_name', 'protonet', '--network_name', 'convnet',
                            '--support', support, '--query', *queries[:3]])
    assert result['adaptation'] is None and result['probabilities'].shape == (3, 3)


def test_classify_reuses_the_support_sets_embeddings(trained, tiny_dataset, tmp_path, capsys):
    _, checkpoint = trained
    dataset = FewShotDataset(tiny_dataset, 'test', eval_transform())
    support, queries, _ = class_folders(dataset, tmp_path, {0: 2, 1: 2, 2: 2})
    first = classify.main(['--model_path', checkpoint, '--support', support, '--query', *queries[:2]])
    assert 'stored in' in capsys.readouterr().out
    second = classify.main(['--model_path', checkpoint, '--support', support, '--query', *queries[:2]])
    assert 'reused from' in capsys.readouterr().out
    assert torch.equal(first['probabilities'], second['probabilities'])


def test_classify_ends_on_sigterm_as_the_others_do(trained, tiny_dataset, tmp_path):
    """SIGTERM (a cluster's stop) during the work, in a process of its own: one line, exit 130, no traceback."""
    import subprocess
    import sys
    _, checkpoint = trained
    support, queries, _ = class_folders(FewShotDataset(tiny_dataset, 'test', eval_transform()), tmp_path,
                                        {0: 1, 1: 1, 2: 1})
    driver = (f"import os, signal, sys; sys.path.insert(0, {os.path.join(ROOT, 'scripts')!r}); import classify\n"
              "real = classify.embed\n"
              "def terminated(*args):\n    os.kill(os.getpid(), signal.SIGTERM)\n    return real(*args)\n"
              "classify.embed = terminated\n"
              f"classify.main(['--model_path', {checkpoint!r}, '--support', {support!r}, '--query', {queries[0]!r}, "
              "'--feature_cache', 'off'])\n")
    done = subprocess.run([sys.executable, '-c', driver], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 130 and 'Traceback' not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith('interrupted')
