"""On a CUDA machine, check and time in one command what the CPU cannot: python scripts/dev/gpu_check.py [--json gpu.json]

(1) GLoFA, ProtoNet and FEAT on ResNet-12 (dropout off, BatchNorm in training mode): logits and every
    gradient of the training loss (FEAT's regulariser included) on CUDA against the CPU in float32 with
    TF32 off; passes when max |cuda - cpu| / max |cpu| <= 1e-3 for the logits and for each gradient;
(2) train.py, a short run plain, with --amp and with --channels_last: finite training losses, and
    seconds per training episode (the difference of a long and a short run, so start-up, validation
    and test cancel out);
(3) pretrain.py under torchrun on every GPU present (and on one GPU when there are several), plain
    and with --amp --channels_last: exit code, one output file, seconds per step of the last epoch,
    and the projected time of the default pretraining (100 epochs of 300 steps);
(4) scripts/dev/benchmark.py's sections evaluation, head and training on CUDA for ResNet-12, 5-way 1-shot
    (cached vs episodic, the head one episode at a time vs many at once, --channels_last and --amp), in
    the benchmark's own table.
Data in the real on-disk format is generated in a temporary folder. Prints a table; --json PATH writes
every figure; exit code 1 when a check fails. Sized to take under 8 minutes on one GPU (not yet
timed on one). Without CUDA it says so and exits 0.
"""
import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Optional

import torch
import torch.nn.functional as F

SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # scripts/
ROOT = os.path.dirname(SCRIPTS)
for folder in (ROOT, SCRIPTS):
    if folder not in sys.path:
        sys.path.insert(0, folder)

from harness import runs  # noqa: E402
from arguments import parse_args  # noqa: E402
from harness.demo import write_colour_dataset  # noqa: E402
import benchmark  # noqa: E402
from models.feat import FEAT  # noqa: E402
from dataloader import query_targets  # noqa: E402
from models.glofa import GLoFA  # noqa: E402
from models.protonet import ProtoNet  # noqa: E402
from networks import build_encoder  # noqa: E402
from networks.resnet import ResNet12  # noqa: E402
from base.console import exits_cleanly  # noqa: E402
from harness.outputs import check_output, write_json  # noqa: E402

TOLERANCE = 1e-3
FULL_PRETRAINING_STEPS = 100 * 300  # pretrain.py's defaults on mini-ImageNet: 100 epochs of 38400 / 128 steps


def run(command: list[str], timeout: float, env: Optional[dict] = None) -> tuple[int, float, str]:
    """(exit code, seconds, the last lines of stderr) of a command run from the repository root."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        code, err = done.returncode, done.stderr
    except subprocess.TimeoutExpired:
        code, err = 124, f'timed out after {timeout:.0f} s'
    return code, time.perf_counter() - start, '\n'.join(err.strip().splitlines()[-3:])


# ------------------------------------------------------------------ (1) CUDA against the CPU
def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def check_cuda_against_cpu(network: str, device: torch.device, model_name: str) -> dict:
    """One training step's logits and gradients of ``model_name`` (glofa, protonet, feat; dropout off), CUDA
    against the CPU, the whole training loss (FEAT's regulariser included)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(3)
    encoder = ResNet12(drop_rate=0.0) if network == 'resnet' else build_encoder(network)
    model = {'glofa': lambda: GLoFA(encoder, encoder.out_dim), 'protonet': lambda: ProtoNet(encoder),
             'feat': lambda: FEAT(encoder, encoder.out_dim)}[model_name]()
    for module in model.modules():  # dropout off, so that both devices compute the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    images = torch.randn(5 * 16, 3, 84, 84)
    outputs = {}
    for where in (torch.device('cpu'), device):
        copy_ = copy.deepcopy(model).to(where).train()
        features = copy_.encode(images.to(where))
        logits = copy_.episode(features, 5, 1)[0]  # (75, 5)
        loss = F.cross_entropy(logits, query_targets(5, 15, where))
        auxiliary = copy_.auxiliary_loss(features, 5, 1)
        (loss if auxiliary is None else loss + auxiliary).backward()
        outputs[where.type] = (logits.detach().cpu(),
                               {n: p.grad.cpu() for n, p in copy_.named_parameters() if p.grad is not None})
    (cpu_logits, cpu_grads), (gpu_logits, gpu_grads) = outputs['cpu'], outputs[device.type]
    grad_errors = {n: relative_error(gpu_grads[n], g) for n, g in cpu_grads.items()}
    worst = max(grad_errors, key=grad_errors.get)
    row = {'model': model_name, 'logits_rel_error': relative_error(gpu_logits, cpu_logits), 'worst_grad': worst,
           'worst_grad_rel_error': grad_errors[worst], 'n_grads': len(grad_errors), 'tolerance': TOLERANCE}
    row['passed'] = row['logits_rel_error'] <= TOLERANCE and row['worst_grad_rel_error'] <= TOLERANCE
    return row


# ------------------------------------------------------------------ (2) train.py with --amp / --channels_last
def train_flags(data: str, save_dir: str, network: str, episodes: int, extra: list[str]) -> list[str]:
    return ['--data_path', data, '--save_dir', save_dir, '--network_name', network, '--pretrained', 'none',
            '--N', '5', '--K', '1', '--Q', '15', '--n_training_episodes', str(episodes), '--episode_gap', str(episodes),
            '--n_validating_episodes', '5', '--n_testing_episodes', '5', '--n_workers', '4', *extra]


def check_train(data: str, work: str, network: str, short: int, long: int, modes: list[str], timeout: float) -> list[dict]:
    rows = []
    for mode in modes:
        extra = [] if mode == 'plain' else [f'--{mode}']
        row = {'mode': mode}
        seconds = {}
        for episodes in (short, long):
            save_dir = os.path.join(work, f'train-{mode}-{episodes}')
            argv = train_flags(data, save_dir, network, episodes, extra)
            code, seconds[episodes], err = run([sys.executable, 'train.py', *argv], timeout)
            row[f'exit_{episodes}'] = code
            if code != 0:
                row['error'] = err
                break
            with open(runs.run_paths(parse_args(argv)).log) as f:
                losses = [json.loads(line)['training_loss'] for line in f]
            row['training_loss'] = losses[-1]
            row['finite'] = row.get('finite', True) and all(math.isfinite(v) for v in losses)
        if len(seconds) == 2:
            row['s_per_episode'] = (seconds[long] - seconds[short]) / (long - short)
        row['passed'] = 'error' not in row and row.get('finite', False)
        rows.append(row)
    return rows


# ------------------------------------------------------------------ (3) pretrain.py under torchrun
def check_pretrain(data: str, work: str, network: str, processes: list[int], variants: dict, epochs: int,
                   batch_size: int, timeout: float) -> list[dict]:
    rows = []
    for n in processes:
        for name, extra in variants.items():
            save_dir = os.path.join(work, f'pretrain-{n}-{name}')
            argv = ['--data_path', data, '--save_dir', save_dir, '--network_name', network, '--epochs', str(epochs),
                    '--batch_size', str(batch_size), '--val_every', str(epochs), '--val_episodes', '20',
                    '--n_workers', '4', *extra]
            code, seconds, err = run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                      '--nproc_per_node', str(n), 'pretrain.py', *argv], timeout,
                                     env={'OMP_NUM_THREADS': '1'} if n > 1 else None)
            row = {'processes': n, 'variant': name, 'exit': code, 'wall_s': seconds}
            folder = os.path.join(save_dir, 'pretrained')
            if code == 0:
                logs = [f for f in os.listdir(folder) if f.endswith('.log.jsonl')]
                with open(os.path.join(folder, logs[0])) as f:
                    last = [json.loads(line) for line in f][-1]
                row['outputs'] = sorted(os.listdir(folder))
                row['s_per_step'] = last['epoch_seconds'] / last['steps']
                row['loss'] = last['loss']
                row['projected_full_pretraining_h'] = row['s_per_step'] * FULL_PRETRAINING_STEPS / 3600
                row['passed'] = len([f for f in row['outputs'] if not f.endswith(('.last.pth', '.jsonl', '.run.json'))]) \
                    == 1 and math.isfinite(last['loss'])  # one weights file, written by rank 0 alone
            else:
                row.update(error=err, passed=False)
            rows.append(row)
    return rows


# ------------------------------------------------------------------ (4) the benchmark's sections on CUDA
def check_benchmark(network: str, device: str, work: str) -> dict:
    """benchmark.py's evaluation, head and training sections on ``device``, in this process."""
    flags = ['evaluation', 'head', 'training', '--device', device, '--network', network, '--train_episodes', '5',
             '--n_workers', '4', '--work_dir', work] + (['--head_episodes', '20', '--full_episodes', '50']
                                                        if device == 'cpu' else [])
    opts = benchmark.get_parser().parse_args(flags)
    try:
        rows = benchmark.run_sections(opts, opts.sections)
    except Exception as error:  # a check reports, it does not stop the others
        return {'error': f'{type(error).__name__}: {error}', 'passed': False}
    return {'rows': rows, 'passed': all(row.same is not False for row in rows)}


# ------------------------------------------------------------------ report
def print_table(report: dict) -> None:
    lines = [f"== {report['device_name']}, torch {report['torch']}, {report['n_gpus']} GPU(s) =="]
    for c in report.get('cuda_vs_cpu', []):
        lines.append(f"(1) {c['model']}, CUDA vs CPU, float32, TF32 off: logits rel. error {c['logits_rel_error']:.2e}, "
                     f"worst of {c['n_grads']} gradients {c['worst_grad_rel_error']:.2e} ({c['worst_grad']}); "
                     f"tolerance {c['tolerance']:g}: {'PASS' if c['passed'] else 'FAIL'}")
    for row in report.get('train', []):
        detail = (f"{row['s_per_episode']:.4f} s per episode, last loss {row['training_loss']:.4f}, finite: "
                  f"{row['finite']}" if 'error' not in row else f"failed: {row['error']}")
        lines.append(f"(2) train.py {row['mode']:>13}: {detail}: {'PASS' if row['passed'] else 'FAIL'}")
    for row in report.get('pretrain', []):
        detail = (f"{row['s_per_step']:.4f} s per step, loss {row['loss']:.4f}, projected default pretraining "
                  f"{row['projected_full_pretraining_h']:.2f} h, files {row['outputs']}" if row['exit'] == 0
                  else f"exit {row['exit']}: {row['error']}")
        lines.append(f"(3) pretrain.py, {row['processes']} process(es), {row['variant']}: {detail}: "
                     f"{'PASS' if row['passed'] else 'FAIL'}")
    b = report.get('benchmark')
    if b and 'error' in b:
        lines.append(f"(4) benchmark failed: {b['error']}")
    print('\n'.join(lines))
    if b and 'rows' in b:
        print('(4) benchmark.py evaluation head training:')
        benchmark.print_table(b['rows'])
    print(f"all passed: {report['passed']}; {report['seconds']:.0f} s")


@exits_cleanly
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--json', default=None, help='also write every figure to this JSON file')
    p.add_argument('--cpu_dry_run', action='store_true',
                   help='without CUDA: run the same steps on the CPU with Conv-4 and tiny sizes, to check this '
                        'script itself (its figures mean nothing)')
    opts = p.parse_args(argv)
    if opts.json:
        check_output(opts.json, '--json', formats=['.json'])
    if not torch.cuda.is_available() and not opts.cpu_dry_run:
        print('no CUDA device: nothing to check here (run this on a GPU machine; the CPU checks are the test suite)')
        return 0
    start = time.perf_counter()
    dry = not torch.cuda.is_available()
    device = torch.device('cpu' if dry else 'cuda')
    network = 'convnet' if dry else 'resnet'
    n_gpus = 0 if dry else torch.cuda.device_count()
    report = {'device_name': 'cpu' if dry else torch.cuda.get_device_name(0), 'torch': torch.__version__,
              'n_gpus': n_gpus}
    with tempfile.TemporaryDirectory() as work:
        data = write_colour_dataset(os.path.join(work, 'data'), (16, 16, 16), 20 if dry else 40, (84, 84))
        if not dry:
            report['cuda_vs_cpu'] = [check_cuda_against_cpu(network, device, model) for model in ('glofa', 'protonet', 'feat')]
        modes = ['plain', 'channels_last'] + ([] if dry else ['amp'])
        report['train'] = check_train(data, work, network, 2 if dry else 20, 4 if dry else 120, modes, 180)
        processes = [2] if dry else sorted({1, n_gpus})
        variants = {'plain': []} if dry else {'plain': [], '--amp --channels_last': ['--amp', '--channels_last']}
        report['pretrain'] = check_pretrain(data, work, network, processes, variants, 2 if dry else 3,
                                            64 if dry else 128, 240)
        report['benchmark'] = check_benchmark(network, 'cpu' if dry else 'cuda', work)
    parts = [*report.get('cuda_vs_cpu', []), *report['train'], *report['pretrain'], report['benchmark']]
    report['passed'] = all(part['passed'] for part in parts)
    report['seconds'] = time.perf_counter() - start
    print_table(report)
    if opts.json:
        write_json(opts.json, json.loads(json.dumps(report, default=lambda row: asdict(row))))
    return 0 if report['passed'] else 1


if __name__ == '__main__':
    sys.exit(main())
