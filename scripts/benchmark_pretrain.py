"""Seconds per pretraining step, one process against several, side by side:

    python scripts/benchmark_pretrain.py [--networks convnet resnet] [--batch_size 128] [--json bench.json]

For each network, pretrain.py's own step (forward, cross-entropy over 64 classes, backward, optimiser
step; DDP's gradient averaging with several processes) on --batch_size images kept in memory, so the
data loading is not counted: once in one plain process (python, never torch.distributed), once under
torchrun with --processes processes of batch_size / processes images each (gloo on the CPU, where
each process gets cpu_count / processes threads; NCCL on GPUs, one per process). After --warmup
steps, --steps steps are timed. Prints both and their ratio; the same script with --worker is what
each process runs.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import distributed  # noqa: E402
from arguments import parse_pretrain_args  # noqa: E402
from models.classifier import EncoderClassifier, build_optimizer, classification_loss  # noqa: E402
from networks import build_encoder  # noqa: E402
from utils import backward_and_step, select_device  # noqa: E402

N_CLASSES = 64  # mini-ImageNet's train split
STEPS_PER_EPOCH = 38400 // 128
RESULT = 'RESULT '


def worker(opts) -> None:
    """Time one pretraining step (loss, backward, optimizer step) on this process's share of a batch; rank 0 prints the result as JSON."""
    device = distributed.setup(select_device(opts.device, [0]))
    processes = distributed.world_size()
    torch.manual_seed(distributed.rank())
    args = parse_pretrain_args(['--network_name', opts.network])  # the default optimiser of that network
    model = distributed.wrap(EncoderClassifier(build_encoder(opts.network), N_CLASSES).to(device), device)
    optimizer = build_optimizer(args.optimizer, distributed.unwrap(model).parameters(), args.lr, args.wd)
    share = opts.batch_size // processes
    images = torch.randn(share, 3, 84, 84, device=device)
    labels = torch.randint(N_CLASSES, (share,), device=device)

    def steps(n: int) -> float:
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(n):
            backward_and_step(classification_loss(model, images, labels)[0], optimizer)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    steps(opts.warmup)
    seconds = steps(opts.steps) / opts.steps
    if distributed.is_main_process():
        print(RESULT + json.dumps({'network': opts.network, 'processes': processes, 'device': str(device),
                                   'threads_per_process': torch.get_num_threads(), 'batch_size': opts.batch_size,
                                   's_per_step': seconds}), flush=True)
    distributed.cleanup()


def measure(opts, network: str, processes: int) -> dict:
    command = [os.path.abspath(__file__), '--worker', '--network', network, '--batch_size', str(opts.batch_size),
               '--steps', str(opts.steps), '--warmup', str(opts.warmup), '--device', opts.device]
    env = dict(os.environ)
    if processes == 1:
        command = [sys.executable, *command]
    else:
        command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(processes),
                   *command]
        env['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // processes))
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f'{" ".join(command)} failed:\n{done.stderr[-2000:]}')
    return json.loads(lines[0][len(RESULT):])


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--networks', nargs='+', default=['convnet', 'resnet'], choices=['convnet', 'resnet'],
                   help='encoders to time')
    p.add_argument('--batch_size', type=int, default=128, help="images a step over all processes (pretrain.py's default)")
    p.add_argument('--processes', type=int, default=2, help='processes of the torchrun way')
    p.add_argument('--steps', type=int, default=3, help='timed steps')
    p.add_argument('--warmup', type=int, default=1, help='untimed steps first')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'], help='where to run (cuda: one GPU a process)')
    p.add_argument('--json', default=None, help='also write the figures to this JSON file')
    p.add_argument('--worker', action='store_true', help='time one way in this process (what the two ways run)')
    p.add_argument('--network', default='convnet', choices=['convnet', 'resnet'], help='with --worker: the encoder')
    opts = p.parse_args(argv)
    if opts.worker:
        return worker(opts)
    rows = []
    print(f'seconds per pretraining step of {opts.batch_size} images (model alone, on {opts.device}, '
          f'{os.cpu_count()} CPU cores), 1 process vs {opts.processes} under torchrun:')
    print(f"| network | 1 process | {opts.processes} processes | {opts.processes} vs 1 | "
          f"projected 100 epochs, 1 process |")
    print('|---|---|---|---|---|')
    for network in opts.networks:
        one, several = measure(opts, network, 1), measure(opts, network, opts.processes)
        row = {'network': network, 'batch_size': opts.batch_size, 'one': one, 'several': several,
               'speedup': one['s_per_step'] / several['s_per_step'],
               'projected_100_epochs_h': one['s_per_step'] * 100 * STEPS_PER_EPOCH / 3600}
        rows.append(row)
        print(f"| {network} | {one['s_per_step']:.2f} s ({one['threads_per_process']} threads) | "
              f"{several['s_per_step']:.2f} s ({several['threads_per_process']} thread(s) each) | "
              f"{row['speedup']:.2f}x | {row['projected_100_epochs_h']:.1f} h |", flush=True)
    if opts.json:
        with open(opts.json, 'w') as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == '__main__':
    main()
