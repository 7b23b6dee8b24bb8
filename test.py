"""Evaluate a trained GLoFA model over test episodes: python test.py [--N 5 --K 1 ...]."""
import os
import sys
from typing import Optional

import numpy as np
import torch

from arguments import parse_args
from checkpoints import load_model_checkpoint
from dataloader import eval_transform, open_split
from evaluation import evaluate
from runs import build_model, check_args, data_path, place_model, prepare_demo, run_config, run_paths
from utils import UserError, accuracy_line, exits_cleanly, git_revision, select_device, set_seed


@exits_cleanly
def main(argv: Optional[list[str]] = None) -> np.ndarray:
    args = parse_args(argv)
    if args.demo:
        prepare_demo(args)
    set_seed(args.seed)
    device = select_device(args.device, args.devices)
    check_args(args, device)
    model_path = args.model_path or run_paths(args)['model']
    if not os.path.isfile(model_path):
        raise UserError(f'checkpoint {model_path} not found: train this run first (py with the same flags) '
                        f'or pass --model_path')
    dataset = open_split(data_path(args), 'test', eval_transform())
    model = build_model(args, pretrained=False)
    record = load_model_checkpoint(model, model_path, run_config(args))
    print(f"loaded {model_path} (validation accuracy {100 * float(record.get('validating_accuracy', float('nan'))):.2f} %, "
          f"episode {record.get('epoch')})")
    model = place_model(model, args, device)
    accuracies = evaluate(model, dataset, args.n_testing_episodes, args.N, args.K, args.Q, device,
                          generator=torch.Generator().manual_seed(args.seed), mode=args.eval_mode,
                          n_workers=args.n_workers, amp=args.amp, channels_last=args.channels_last,
                          task_mix=args.task_mix)
    print(accuracy_line('test', accuracies, args.N, args.K))
    print(f'seed {args.seed}, {args.eval_mode} evaluation, revision {git_revision()}')
    return accuracies


if __name__ == '__main__':
    main(sys.argv[1:])
