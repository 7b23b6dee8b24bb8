"""ProtoNet and FEAT under GLoFA's protocol: their formulas against naive loops, their keys, their flags,
their checkpoints, and the check of a pretrained encoder through test.py."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import test as test_script
import train
from arguments import parse_args
from models.feat import feat_regulariser
from harness.checkpoints import atomic_save, build_model
from conftest import exits_with, pretrained_file
from dataloader import FewShotDataset, episode_sampler, eval_transform
from harness.embeddings import encode_split
from harness.device import EvalOptions
from models.feat import FEAT
from models.glofa import GLoFA
from models.protonet import ProtoNet
from networks import build_encoder
from harness.runs import run_name
from harness.checkpoints import build_optimizer

FEAT_KEYS = {'slf_attn.w_qs.weight', 'slf_attn.w_ks.weight', 'slf_attn.w_vs.weight', 'slf_attn.fc.weight',
             'slf_attn.fc.bias', 'slf_attn.layer_norm.weight', 'slf_attn.layer_norm.bias'}


def episode_features(n_way, n_shot, n_query, d, seed=0, episodes=()):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*episodes, n_way * (n_shot + n_query), d, generator=g, dtype=torch.float64)


def naive_prototypes(x, n_way, n_shot):
    return [sum(x[s * n_way + n] for s in range(n_shot)) / n_shot for n in range(n_way)]


def naive_attention(layer, sequence):
    """FEAT's layer on a list of d-vectors, one element at a time (dropout off)."""
    d = sequence[0].numel()
    q = [layer.w_qs.weight @ x for x in sequence]
    k = [layer.w_ks.weight @ x for x in sequence]
    v = [layer.w_vs.weight @ x for x in sequence]
    out = []
    for i, x in enumerate(sequence):
        scores = torch.stack([q[i] @ k[j] / math.sqrt(d) for j in range(len(sequence))])
        weights = torch.exp(scores - scores.max())
        weights = weights / weights.sum()
        attended = sum(weights[j] * v[j] for j in range(len(sequence)))
        y = layer.fc.weight @ attended + layer.fc.bias + x
        mean, var = y.mean(), ((y - y.mean()) ** 2).mean()
        out.append((y - mean) / torch.sqrt(var + layer.layer_norm.eps) * layer.layer_norm.weight
                   + layer.layer_norm.bias)
    return out


def naive_logits(query_list, prototypes, metric, temperature):
    rows = []
    prototypes = [p.detach() for p in prototypes]
    for q in query_list:
        if metric == 'euclidean':
            rows.append([-float(((q - p) ** 2).sum()) / temperature for p in prototypes])
        else:
            rows.append([float(q @ (p / p.norm())) / temperature for p in prototypes])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize('metric', ['euclidean', 'cosine'])
@pytest.mark.parametrize('n_way,n_shot', [(3, 1), (2, 3)])
def test_protonet_logits_equal_a_naive_loop(metric, n_way, n_shot):
    n_query, d, temperature = 2, 5, 4.0
    x = episode_features(n_way, n_shot, n_query, d)
    model = ProtoNet(nn.Identity(), metric=metric, temperature=temperature)
    logits, adaptation = model.episode(x, n_way, n_shot)
    expected = naive_logits(list(x[n_way * n_shot:]), naive_prototypes(x, n_way, n_shot), metric, temperature)
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    assert adaptation is None


def test_protonet_by_hand():
    # 2-way 1-shot, d = 2: prototypes (0, 0) and (3, 4); query (3, 0)
    x = torch.tensor([[0., 0.], [3., 4.], [3., 0.]], dtype=torch.float64)
    euclidean = ProtoNet(nn.Identity(), 'euclidean', temperature=2.0).episode(torch.cat([x, x[2:]]), 2, 1)[0]
    torch.testing.assert_close(euclidean[0], torch.tensor([-9 / 2, -16 / 2], dtype=torch.float64))
    cosine = ProtoNet(nn.Identity(), 'cosine', temperature=2.0).episode(torch.cat([x, x[2:]]), 2, 1)[0]
    # <(3, 0), (0, 0) / 0> is 0 (F.normalize keeps a zero vector); <(3, 0), (0.6, 0.8)> = 1.8
    torch.testing.assert_close(cosine[0], torch.tensor([0.0, 1.8 / 2], dtype=torch.float64))


def test_cosine_protonet_is_glofa_without_adaptors_at_equal_temperature():
    torch.manual_seed(0)
    n_way, n_shot, n_query, d, t = 5, 2, 3, 16, 8.0
    x = episode_features(n_way, n_shot, n_query, d).float()
    glofa = GLoFA(nn.Identity(), d, tau=t, adaptor='none')
    protonet = ProtoNet(nn.Identity(), 'cosine', temperature=t)
    torch.testing.assert_close(protonet.episode(x, n_way, n_shot)[0],
                               glofa.episode(x, n_way, n_shot)[0], rtol=1e-6, atol=1e-6)


def feat_model(d=6, metric='euclidean', temperature=3.0, temperature2=5.0, balance=0.3, seed=0):
    torch.manual_seed(seed)
    model = FEAT(nn.Identity(), d, metric, temperature, temperature2, balance).double()
    with torch.no_grad():  # LayerNorm's own parameters away from their 1 / 0 initialisation
        model.slf_attn.layer_norm.weight.uniform_(0.5, 1.5)
        model.slf_attn.layer_norm.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize('metric', ['euclidean', 'cosine'])
def test_feat_logits_equal_a_naive_loop(metric):
    n_way, n_shot, n_query, d = 4, 2, 2, 6
    model = feat_model(d, metric).eval()  # dropout off
    x = episode_features(n_way, n_shot, n_query, d, seed=1)
    adapted = naive_attention(model.slf_attn, naive_prototypes(x, n_way, n_shot))
    expected = naive_logits(list(x[n_way * n_shot:]), adapted, metric, model.temperature)
    with torch.no_grad():
        logits, _ = model.episode(x, n_way, n_shot)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)


def naive_score(x, centre, metric, temperature):
    """One regulariser logit, differentiable: -||x - c||^2 / t, or with cosine <x, c / ||c||> / t (FEAT's metric)."""
    if metric == 'euclidean':
        return -((x - centre) ** 2).sum() / temperature
    return x @ (centre / centre.norm()) / temperature


@pytest.mark.parametrize('metric', ['euclidean', 'cosine'])
def test_feat_training_loss_and_gradients_equal_a_naive_loop(metric):
    """The whole training loss, CE of the logits + balance * the regulariser with the main logits' metric (as
    FEAT's own code computes it), and every gradient, against an element-by-element loop in float64."""
    n_way, n_shot, n_query, d = 3, 2, 3, 6
    model = feat_model(d, metric).train()
    model.slf_attn.attention_dropout.p = model.slf_attn.dropout.p = 0.0  # train mode, dropout off
    x = episode_features(n_way, n_shot, n_query, d, seed=2)
    centres = []
    for n in range(n_way):  # class n's K support then Q query embeddings, adapted as one sequence
        sequence = [x[s * n_way + n] for s in range(n_shot + n_query)]
        centres.append(sum(naive_attention(model.slf_attn, sequence)) / len(sequence))
    regulariser = 0.0
    for position in range(len(x)):  # every unadapted embedding against the centres, target position % N
        row = torch.stack([naive_score(x[position], c, metric, model.temperature2) for c in centres])
        regulariser = regulariser - (row[position % n_way] - torch.logsumexp(row, 0))
    adapted = naive_attention(model.slf_attn, naive_prototypes(x, n_way, n_shot))
    main = 0.0
    for j, q in enumerate(x[n_way * n_shot:]):
        if metric == 'euclidean':
            row = torch.stack([-((q - p) ** 2).sum() / model.temperature for p in adapted])
        else:
            row = torch.stack([q @ (p / p.norm()) / model.temperature for p in adapted])
        main = main - (row[j % n_way] - torch.logsumexp(row, 0))
    naive = main / (n_way * n_query) + model.balance * regulariser / len(x)
    naive_grads = torch.autograd.grad(naive, list(model.parameters()))

    auxiliary = model.auxiliary_loss(x, n_way, n_shot)
    torch.testing.assert_close(auxiliary, model.balance * regulariser / len(x), rtol=1e-12, atol=1e-12)
    loss = F.cross_entropy(model.episode(x, n_way, n_shot)[0], torch.arange(n_way * n_query) % n_way) \
        + auxiliary
    torch.testing.assert_close(loss, naive, rtol=1e-12, atol=1e-12)
    for got, expected in zip(torch.autograd.grad(loss, list(model.parameters())), naive_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_feat_dropout_acts_in_training_only():
    model = feat_model(8).double()
    x = episode_features(2, 1, 2, 8, seed=3)
    model.eval()
    a, b = model.episode(x, 2, 1)[0], model.episode(x, 2, 1)[0]
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(1)
    c = model.episode(x, 2, 1)[0]
    assert not torch.allclose(a, c)


@pytest.mark.parametrize('cls', ['protonet', 'feat'])
def test_many_episodes_at_once_equal_each_alone(cls):
    n_way, n_shot, n_query, d = 5, 2, 3, 16
    model = (ProtoNet(nn.Identity()) if cls == 'protonet' else FEAT(nn.Identity(), d)).eval()
    x = episode_features(n_way, n_shot, n_query, d, seed=4, episodes=(7,)).float()
    together, _ = model.episode(x, n_way, n_shot)  # (7, N*Q, N)
    for e in range(7):
        torch.testing.assert_close(together[e], model.episode(x[e], n_way, n_shot)[0], rtol=1e-5, atol=1e-4)


def test_feat_keys_initialisation_and_learning_rate_groups(spec_encoder_keys):
    encoder = build_encoder('resnet')
    model = FEAT(encoder, encoder.out_dim)
    assert set(model.state_dict()) == {f'encoder.{k}' for k in spec_encoder_keys} | FEAT_KEYS
    d = encoder.out_dim
    for w in (model.slf_attn.w_qs, model.slf_attn.w_ks, model.slf_attn.w_vs):
        assert w.bias is None and w.weight.std().item() == pytest.approx(math.sqrt(2 / (d + d)), rel=0.02)
    assert model.slf_attn.fc.weight.std().item() == pytest.approx(math.sqrt(2 / (d + d)), rel=0.02)  # xavier-normal
    args = parse_args(['--model_name', 'feat', '--lr', '0.3', '--lr_network', '0.02'])
    groups = build_optimizer(args, model).param_groups
    assert [g['lr'] for g in groups] == [0.02, 0.3]
    assert {id(p) for p in groups[1]['params']} == {id(p) for p in model.slf_attn.parameters()}
    protonet = build_optimizer(parse_args(['--model_name', 'protonet']), ProtoNet(encoder)).param_groups
    assert len(protonet) == 1 and len(protonet[0]['params']) == len(list(encoder.parameters()))


def test_feat_regulariser_defaults_follow_the_shot():
    assert feat_regulariser(parse_args(['--model_name', 'feat', '--K', '1']), 1) == (64.0, 0.01)
    assert feat_regulariser(parse_args(['--model_name', 'feat', '--K', '5']), 5) == (32.0, 0.1)
    assert feat_regulariser(parse_args(['--model_name', 'feat', '--temperature2', '8', '--balance', '0']), 5) == (8.0, 0.0)


def test_model_and_normalization_are_part_of_the_run_name():
    base = ['--data_path', 'd']
    names = {run_name(parse_args(base + extra)) for extra in (
        [], ['--model_name', 'protonet'], ['--model_name', 'feat'], ['--model_name', 'protonet', '--metric', 'cosine'],
        ['--model_name', 'protonet', '--temperature', '16'], ['--model_name', 'feat', '--balance', '0.5'],
        ['--normalization', 'feat'])}
    assert len(names) == 7


def test_another_models_flag_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(['--model_name', 'protonet', '--adaptor', 'task'])
    assert exit_info.value.code == 2
    assert '--adaptor' in capsys.readouterr().err


def test_feat_normalization_statistics():
    normalize = eval_transform('feat').transforms[-1]
    assert tuple(normalize.mean) == pytest.approx((120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255))
    assert tuple(normalize.std) == pytest.approx((70.68188272 / 255, 68.27635443 / 255, 72.54505529 / 255))


# ------------------------------------------------------------------ through the command line
def flags(data, save_dir, *extra):
    return ['--data_path', str(data), '--save_dir', str(save_dir), '--network_name', 'convnet', '--pretrained',
            'none', '--N', '3', '--K', '1', '--Q', '2', '--n_training_episodes', '4', '--episode_gap', '2',
            '--n_validating_episodes', '3', '--n_testing_episodes', '5', '--n_workers', '0', *extra]


@pytest.mark.parametrize('model_name', ['protonet', 'feat'])
def test_baselines_train_and_test_through_the_command_line(tiny_dataset, tmp_path, model_name):
    argv = flags(tiny_dataset, tmp_path, '--model_name', model_name)
    trained = train.main(argv)
    assert len(trained['statistics']['validating_accuracy']) == 2
    assert all(np.isfinite(trained['statistics']['training_loss']))
    tested = test_script.main(argv)[(3, 1)]
    np.testing.assert_array_equal(tested.accuracies, trained['test_accuracies'])
    assert not tested.has_adaptors


def test_feat_format_checkpoint_evaluates_in_test_py(tiny_dataset, tmp_path, capsys):
    """A file as FEAT saves it, {'params': encoder.* and slf_attn.*}, equals the same weights in our own record."""
    argv = flags(tiny_dataset, tmp_path, '--model_name', 'feat')
    torch.manual_seed(5)
    model = build_model(parse_args(argv), pretrained=False)
    atomic_save({'params': model.state_dict()}, str(tmp_path / 'feat-max-acc.pth'))
    atomic_save({'state_dict': model.state_dict(), 'validating_accuracy': 0.5, 'epoch': 1}, str(tmp_path / 'own.model'))
    theirs = test_script.main(argv + ['--model_path', str(tmp_path / 'feat-max-acc.pth')])[(3, 1)]
    ours = test_script.main(argv + ['--model_path', str(tmp_path / 'own.model')])[(3, 1)]
    np.testing.assert_array_equal(theirs.accuracies, ours.accuracies)
    # the same file with another model is refused, naming the model it holds
    line = exits_with(test_script.main, flags(tiny_dataset, tmp_path, '--model_path', str(tmp_path / 'feat-max-acc.pth')),
                      capsys)
    assert 'feat' in line and 'feat-max-acc.pth' in line


def test_checkpoint_of_another_model_is_refused(tiny_dataset, tmp_path, capsys):
    argv = flags(tiny_dataset, tmp_path)
    train.main(argv)
    best = train.run_paths(parse_args(argv)).best
    line = exits_with(test_script.main, flags(tiny_dataset, tmp_path, '--model_name', 'feat', '--model_path', best),
                      capsys)
    assert 'model_name = glofa' in line and os.path.basename(best) in line


def test_pretrained_check_evaluates_the_encoder_with_both_metrics(tiny_dataset, tmp_path, capsys):
    encoder = pretrained_file(tmp_path / 'con-pre.pth')
    argv = flags(tiny_dataset, tmp_path, '--model_name', 'protonet', '--pretrained', str(tmp_path / 'con-pre.pth'),
                 '--n_testing_episodes', '20', '--eval_mode', 'cached', '--json', str(tmp_path / 'check.json'))
    results = test_script.main(argv)
    assert set(results) == {(3, 1, 'euclidean'), (3, 1, 'cosine')}
    # independently: the same episodes on the encoder's embeddings, distances by torch.cdist and cosine similarity
    dataset = FewShotDataset(str(tiny_dataset), 'test', eval_transform())
    features = encode_split(encoder, dataset, EvalOptions(torch.device('cpu'))).double()
    expected = {'euclidean': [], 'cosine': []}
    for episode in episode_sampler(dataset, 20, 3, 3, torch.Generator().manual_seed(960402)):
        x = features[episode]
        prototypes, query, targets = x[:3], x[3:], torch.arange(6) % 3
        scores = {'euclidean': -torch.cdist(query, prototypes),
                  'cosine': nn.functional.cosine_similarity(query[:, None], prototypes[None], dim=-1)}
        for metric, score in scores.items():
            expected[metric].append((score.argmax(1) == targets).double().mean().item())
    for metric in ('euclidean', 'cosine'):
        np.testing.assert_allclose(results[(3, 1, metric)].accuracies, expected[metric])
    assert not os.path.isdir(tmp_path / 'trained_models')  # no checkpoint needed, none written
