"""pretrain.py: FEAT-format output that train.py loads, exact resume, torchrun/DDP, refusals, SIGTERM."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from harness import checkpoints, distributed, runs
import gpu_check  # scripts/ is on pytest's path (pytest.ini)
import plot_curves
import pretrain
from arguments import parse_args
from pretrain import ShuffledBatches, build_optimizer, classification_loss, parse_pretrain_args, prototype_accuracies
import train
from harness.demo import write_colour_dataset
from models.classifier import EncoderClassifier
from networks import build_encoder


def backward_and_step(loss, optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flags(data, save_dir, network='convnet', epochs=1, batch_size=8, *extra):
    return ['--data_path', str(data), '--save_dir', str(save_dir), '--network_name', network, '--epochs', str(epochs),
            '--batch_size', str(batch_size), '--val_every', '1', '--val_way', '3', '--val_shot', '1', '--val_query', '2',
            '--val_episodes', '5', '--n_workers', '0', *extra]


def paths(argv) -> runs.RunPaths:
    return pretrain.pretrain_paths(parse_pretrain_args(argv))


def load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def exit_code(call, *args) -> int:
    with pytest.raises(SystemExit) as info:
        call(*args)
    return info.value.code


# ------------------------------------------------------------------ the output loads in train.py
@pytest.fixture(scope='module')
def pretrained(tiny_dataset, tmp_path_factory):
    """One epoch of Conv-4 pretraining on the tiny dataset (4 train classes of 6 images, 3 steps of 8)."""
    argv = flags(tiny_dataset, tmp_path_factory.mktemp('pre_convnet'))
    return argv, pretrain.main(argv)


@pytest.fixture(scope='module')
def small_dataset(tmp_path_factory):
    """2 / 2 / 2 classes of 2 images: two ResNet-12 steps of 2 images an epoch, 2-way 1-shot 1-query validation."""
    return write_colour_dataset(tmp_path_factory.mktemp('data') / 'small', classes_per_split=(2, 2, 2), images_per_class=2,
                        size=(24, 24), seed=1)


def resnet_flags(data, save_dir, epochs=2):
    argv = flags(data, save_dir, 'resnet', epochs, 2)
    for flag, value in (('--val_way', '2'), ('--val_query', '1')):
        argv[argv.index(flag) + 1] = value
    return argv


@pytest.fixture(scope='module')
def resnet_run(small_dataset, tmp_path_factory):
    """Two uninterrupted epochs of ResNet-12 pretraining."""
    argv = resnet_flags(small_dataset, tmp_path_factory.mktemp('pre_resnet'))
    return argv, pretrain.main(argv)


def check_feat_format(out, network, n_classes) -> int:
    """The output is FEAT's {'params': {'encoder.<key>', 'fc.weight', 'fc.bias'}}; returns the encoder's tensor count."""
    record = load(out)
    assert list(record) == ['params']
    encoder = build_encoder(network)
    assert set(record['params']) == {f'encoder.{k}' for k in encoder.state_dict()} | {'fc.weight', 'fc.bias'}
    assert record['params']['fc.weight'].shape == (n_classes, encoder.out_dim)
    return len(encoder.state_dict())


def test_convnet_output_is_in_feat_format_and_train_py_loads_it(pretrained, tiny_dataset, tmp_path, capsys):
    argv, result = pretrained
    assert result['epoch'] == 1 and result['best_epoch'] == 1
    out = result['paths'].best
    assert check_feat_format(out, 'convnet', 4) == 28
    capsys.readouterr()
    train.main(['--data_path', tiny_dataset, '--save_dir', str(tmp_path), '--network_name', 'convnet', '--pretrained',
                out, '--N', '2', '--K', '1', '--Q', '1', '--n_training_episodes', '1', '--episode_gap', '1',
                '--n_validating_episodes', '1', '--n_testing_episodes', '1', '--n_workers', '0'])
    assert f'loaded 28 encoder tensors from {out}' in capsys.readouterr().out


def test_resnet_output_is_in_feat_format_and_train_py_loads_it(resnet_run, capsys):
    """Through train.py's model building (checkpoints.build_model, as train.main calls it), to spare a ResNet run."""
    argv, result = resnet_run
    assert result['epoch'] == 2
    out = result['paths'].best
    assert check_feat_format(out, 'resnet', 2) == 96
    capsys.readouterr()
    model = checkpoints.build_model(parse_args(['--network_name', 'resnet', '--pretrained', out]))
    assert f'loaded 96 encoder tensors from {out}' in capsys.readouterr().out
    params = load(out)['params']
    assert all(torch.equal(v, params[f'encoder.{k}']) for k, v in model.encoder.state_dict().items())


def test_finished_output_is_not_replaced_without_overwrite(pretrained, capsys):
    argv, result = pretrained
    out, log = result['paths'].best, result['paths'].log
    before = load(out)['params']
    capsys.readouterr()
    assert exit_code(pretrain.main, argv) == 2
    err = capsys.readouterr().err
    assert out in err and '--overwrite' in err and '--resume' in err  # the file, and what to do
    assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err
    assert all(torch.equal(v, load(out)['params'][k]) for k, v in before.items())

    pretrain.main(argv + ['--overwrite'])  # the same seed: the same weights again, and a log of one run
    assert all(torch.equal(v, load(out)['params'][k]) for k, v in before.items())
    with open(log) as f:
        assert [json.loads(line)['epoch'] for line in f] == [1]


# ------------------------------------------------------------------ exact resume
def assert_same_state(a: dict, b: dict) -> None:
    assert a['epoch'] == b['epoch'] and a['finished'] == b['finished']
    assert a['best_accuracy'] == b['best_accuracy'] and a['best_epoch'] == b['best_epoch']
    assert a['forward_count'] == b['forward_count']
    assert a['state_dict'].keys() == b['state_dict'].keys()
    for key in a['state_dict']:
        assert torch.equal(a['state_dict'][key], b['state_dict'][key]), key
    assert a['scheduler'] == b['scheduler']
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        for name in sa:
            assert torch.equal(torch.as_tensor(sa[name]), torch.as_tensor(sb[name])), name
    assert torch.equal(a['random_states'][0]['torch'], b['random_states'][0]['torch'])


def log_entries(path):
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k != 'epoch_seconds'} for line in f]


def test_interrupted_resnet_run_resumes_to_the_uninterrupted_one(resnet_run, small_dataset, tmp_path, monkeypatch,
                                                                  capsys):
    """ResNet-12: dropout and DropBlock draw from the global random state, whose saved copy must be restored."""
    straight = resnet_run[0]
    reference = load(paths(straight).last)
    assert reference['epoch'] == 2 and reference['finished'] and reference['forward_count'] == 4

    argv = resnet_flags(small_dataset, tmp_path)
    real_step, calls = torch.optim.SGD.step, []

    def interrupted_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C in the first step of the second epoch (two steps an epoch)
            torch.manual_seed(12345)  # its random draws must not matter
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, 'step', interrupted_step)
    capsys.readouterr()
    assert exit_code(pretrain.main, argv) == 130
    last = paths(argv).last
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert 'during epoch 2;' in said and 'after epoch 1 ' in said and last in said and '--resume' in said
    assert load(last)['epoch'] == 1 and not load(last)['finished']

    assert exit_code(pretrain.main, argv) == 2  # never overwrites an unfinished run
    err = capsys.readouterr().err
    assert last in err and '--resume' in err and '--overwrite' in err

    monkeypatch.setattr(torch.optim.SGD, 'step', real_step)
    pretrain.main(argv + ['--resume'])
    assert_same_state(load(last), reference)
    assert log_entries(paths(argv).log) == log_entries(paths(straight).log)
    best, best_cut = load(paths(straight).best)['params'], load(paths(argv).best)['params']
    assert all(torch.equal(v, best_cut[k]) for k, v in best.items())


def test_finished_run_extended_with_resume_matches_the_longer_run(tiny_dataset, tmp_path):
    longer = flags(tiny_dataset, tmp_path / 'longer', 'convnet', 2, 12)
    pretrain.main(longer)
    argv = flags(tiny_dataset, tmp_path / 'extended', 'convnet', 1, 12)
    pretrain.main(argv)
    result = pretrain.main(flags(tiny_dataset, tmp_path / 'extended', 'convnet', 2, 12) + ['--resume'])
    assert result['epoch'] == 2
    assert_same_state(load(paths(argv).last), load(paths(longer).last))


# ------------------------------------------------------------------ refusals
def test_batch_size_must_divide_between_processes(tiny_dataset, tmp_path, monkeypatch, capsys):
    for name, value in (('RANK', '0'), ('LOCAL_RANK', '0'), ('WORLD_SIZE', '2')):
        monkeypatch.setenv(name, value)  # as torchrun sets them; the check comes before joining a group
    assert exit_code(pretrain.main, flags(tiny_dataset, tmp_path, 'convnet', 1, 7)) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and '--batch_size 7' in err and '--batch_size 6' in err  # the flag, and a value that works
    assert not os.path.exists(tmp_path / 'pretrained')


def test_val_split_smaller_than_the_way_is_refused(tiny_dataset, tmp_path, capsys):
    assert exit_code(pretrain.main, flags(tiny_dataset, tmp_path) + ['--val_way', '16']) == 2
    val_csv = os.path.join(tiny_dataset, 'split', 'val.csv')
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and val_csv in err and '3 classes' in err and '--val_way 16' in err


@pytest.mark.parametrize('refusal', ['batch', 'way'])
def test_tiered_data_too_small_is_refused_naming_the_file(tmp_path, capsys, refusal):
    """The same refusals on tiered-ImageNet's files, which have no split CSV."""
    from tests.small_data import write_tiered_dataset
    data = write_tiered_dataset(tmp_path / 'tiered')  # 4 / 3 / 3 classes of 6 images
    extra = ['--batch_size', '64'] if refusal == 'batch' else ['--val_way', '5']
    assert exit_code(pretrain.main, flags(data, tmp_path / 'saves') + extra) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'Traceback' not in err
    named = os.path.join(data, 'train_labels.pkl' if refusal == 'batch' else 'val_labels.pkl')
    assert named in err and ('--batch_size 64' if refusal == 'batch' else '--val_way 5') in err


def test_non_finite_loss_stops_with_the_state_kept(tiny_dataset, tmp_path, capsys):
    argv = flags(tiny_dataset, tmp_path, 'convnet', 3) + ['--optimizer', 'sgd', '--lr', '1e30']
    assert exit_code(pretrain.main, argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith('error: training loss became nan at epoch 1') and paths(argv).last in err and '--lr' in err
    assert load(paths(argv).last)['epoch'] == 0


# ------------------------------------------------------------------ several processes
def test_sampler_splits_each_batch_between_processes():
    single = list(ShuffledBatches(20, 8, seed=3))
    shares = [list(ShuffledBatches(20, 8, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(single) == 2 and all(len(s) == 2 for s in shares)  # 20 // 8 batches, the last 4 images dropped
    for b, batch in enumerate(single):
        assert shares[0][b] + shares[1][b] == batch  # (index, augmentation seed) pairs: the same images, seeds
    indices = [i for batch in single for i, _ in batch]
    assert len(set(indices)) == 16
    again = ShuffledBatches(20, 8, seed=3)
    assert list(again) == single
    again.set_epoch(1)
    assert list(again) != single


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class StandIn(nn.Module):
    """An encoder without BatchNorm or dropout: the processes' gradients must average to the full batch's."""
    out_dim = 6

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 6))

    def forward(self, x):
        return self.net(x)


def two_steps(images, labels, batch_size, rank, world_size, out_path):
    """Two optimisation steps of pretrain.py's step on this process's share of the first two batches."""
    torch.manual_seed(0)
    model = distributed.wrap(EncoderClassifier(StandIn(), 5), torch.device('cpu'))
    args = parse_pretrain_args(['--network_name', 'resnet'])  # SGD, Nesterov momentum, weight decay
    optimizer = build_optimizer(args.optimizer, distributed.unwrap(model).parameters(), args.lr, args.wd)
    for batch in ShuffledBatches(len(images), batch_size, seed=5, rank=rank, world_size=world_size):
        index = torch.tensor([i for i, _ in batch])
        backward_and_step(classification_loss(model, images[index], labels[index])[0], optimizer)
    if distributed.is_main_process():
        torch.save(distributed.unwrap(model).state_dict(), out_path)


def ddp_worker(rank, port, images, labels, out_path):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.setup(torch.device('cpu'))
    two_steps(images, labels, 8, rank, 2, out_path)
    distributed.cleanup()


def test_two_processes_step_like_one_process_with_the_whole_batch(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(16, 3, 8, 8, generator=generator), torch.randint(5, (16,), generator=generator)
    two_steps(images, labels, 8, 0, 1, tmp_path / 'single.pt')
    torch.multiprocessing.start_processes(ddp_worker, args=(free_port(), images, labels, str(tmp_path / 'ddp.pt')),
                                          nprocs=2, start_method='fork')
    single, ddp = torch.load(tmp_path / 'single.pt'), torch.load(tmp_path / 'ddp.pt')
    assert single.keys() == ddp.keys()
    torch.manual_seed(0)
    start = EncoderClassifier(StandIn(), 5).state_dict()
    for key in single:
        assert not torch.equal(single[key], start[key]), key  # the steps moved every parameter
        assert torch.allclose(single[key], ddp[key], rtol=0, atol=1e-6), key


def test_torchrun_two_processes_write_one_output(tiny_dataset, tmp_path):
    argv = flags(tiny_dataset, tmp_path, 'convnet', 1)
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                             'pretrain.py', *argv], cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count('on cpu, 2 processes of 4 images a step') == 1
    assert result.stdout.count('best validation accuracy') == 1
    p = paths(argv)
    assert sorted(os.listdir(tmp_path / 'pretrained')) == sorted(os.path.basename(f) for f in (p.best, p.last, p.log, p.identity))
    assert [e['epoch'] for e in log_entries(p.log)] == [1]
    record = load(p.last)
    assert record['epoch'] == 1 and record['finished'] and len(record['random_states']) == 2
    assert set(load(p.best)['params']) == set(record['state_dict'])


# ------------------------------------------------------------------ SIGTERM
def test_sigterm_saves_and_the_run_resumes(tiny_dataset, tmp_path):
    """SIGTERM to the process group (as a cluster sends it), with loader workers: exit 130, a hint, resumable."""
    argv = flags(tiny_dataset, tmp_path, 'convnet', 1000)
    argv[argv.index('--n_workers') + 1] = '2'
    p = paths(argv)
    process = subprocess.Popen([sys.executable, 'pretrain.py', *argv], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait for the state saved after the first epoch (written atomically)
            if os.path.isfile(p.last) and load(p.last)['epoch'] >= 1:
                break
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert 'Traceback' not in err
    saved = load(p.last)
    assert saved['epoch'] >= 1 and not saved['finished']
    assert f'during epoch {saved["epoch"] + 1};' in err and f'after epoch {saved["epoch"]} ' in err and p.last in err
    argv[argv.index('--epochs') + 1] = str(saved['epoch'] + 1)
    argv[argv.index('--n_workers') + 1] = '0'
    assert pretrain.main(argv + ['--resume'])['epoch'] == saved['epoch'] + 1


# ------------------------------------------------------------------ validation metric
def test_prototype_accuracies_pinned():
    features = torch.tensor([[1., 0.], [0., 10.], [2., 5.], [0., 8.],            # 2-way 1-shot 1-query
                             [0., 0.], [0., 1.], [4., 0.], [0., 3.], [2., 1.2], [0.1, 3.]])  # 2-way 2-shot
    one_shot = prototype_accuracies(features, [torch.tensor([0, 1, 2, 3])], n_way=2, n_shot=1)
    # query (2, 5) of class 0: nearer p0 = (1, 0) in distance (26 < 29), nearer p1 = (0, 10) in angle
    assert one_shot['cosine'].tolist() == [0.5] and one_shot['euclidean'].tolist() == [1.0]
    two_shot = prototype_accuracies(features, [torch.arange(4, 10)], n_way=2, n_shot=2)
    # prototypes are the means (2, 0) and (0, 2); the first shots alone, (0, 0) and (0, 1), would miss query (2, 1.2)
    assert two_shot['cosine'].tolist() == [1.0] and two_shot['euclidean'].tolist() == [1.0]


# ------------------------------------------------------------------ scripts
def test_plot_curves_draws_a_pretraining_log(tmp_path, capsys):
    log = tmp_path / 'run.log.jsonl'
    entries = [{'epoch': e, 'loss': 3.0 - 0.1 * e, 'train_accuracy': 0.02 * e, 'lr': lr, 'val_cosine': cos,
                'val_cosine_ci': 0.01, 'val_euclidean': cos - 0.02, 'val_euclidean_ci': 0.01}
               for e, lr, cos in ((5, 0.1, 0.40), (10, 0.1, 0.50), (5, 0.1, 0.40), (10, 0.1, 0.50), (15, 0.01, 0.45))]
    log.write_text(''.join(json.dumps(e) + '\n' for e in entries) + '{"epoch": 20, "lo')  # a restart, a cut line
    out = tmp_path / 'curves.png'
    plot_curves.main(['--log', str(log), '--out', str(out)])
    assert os.path.getsize(out) > 1000
    assert capsys.readouterr().out.strip() == (f'wrote {out}: 3 validations up to epoch 15, best validation accuracy '
                                               f'(cosine) 50.00 % at epoch 10, last training loss 1.5000')


def test_gpu_check_without_cuda_says_so_and_exits_0(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert gpu_check.main(['--json', str(tmp_path / 'gpu.json')]) == 0
    assert 'no CUDA device' in capsys.readouterr().out
    assert not os.path.exists(tmp_path / 'gpu.json')


def test_output_paths_follow_out():
    argv = ['--network_name', 'convnet', '--seed', '3', '--save_dir', 's']
    base = os.path.join('s', 'pretrained', 'mini_imagenet-convnet-pretrain-seed3')
    assert paths(argv) == runs.RunPaths(f'{base}.pth', f'{base}.last.pth', f'{base}.log.jsonl', f'{base}.run.json')
    assert paths(['--out', 'w/res12.pth']) == runs.RunPaths('w/res12.pth', 'w/res12.last.pth', 'w/res12.log.jsonl',
                                                            'w/res12.run.json')
    args = parse_pretrain_args(['--network_name', 'convnet'])
    assert (args.optimizer, args.lr) == ('adam', 0.001)
    args = parse_pretrain_args([])
    assert (args.optimizer, args.lr, args.batch_size, args.val_way) == ('sgd', 0.1, 128, 16)
    assert np.isclose(parse_pretrain_args(['--demo']).lr, 0.001)
