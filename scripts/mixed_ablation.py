"""GLoFA against its baselines and ablations on the mix-grained demo: train, test and tabulate.

    python scripts/mixed_ablation.py [--protocol pretrained|scratch] [--variants glofa glofa-hbias1 protonet feat]
                                     [--seeds 960402 1 3] [--save_dir saves/ablation] [--json ablation.json]

--protocol pretrained (the paper's): pretrain.py --demo mixed pretrains a Conv-4 on the demo's train
classes once, then every variant meta-trains from it with the reference's learning rates (encoder 1e-4,
head 1e-2) on the demo's schedule. --protocol scratch: Conv-4 from scratch with the demo preset.
For every variant and seed: train.py --demo mixed (a run with figures is not trained again), whose test
of the best checkpoint writes the accuracy, its per-episode CI, the per-group accuracies (single-source and
mixed tasks) and GLoFA's strengths. The table shows, per variant, the mean over seeds ± the 95 % CI over
seeds (1.96 std / sqrt(seeds)), each seed's accuracy ± its per-episode CI, and the strengths.
"""
import argparse
import os
import shlex
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness.stages import PRETRAINED_RATES, pretrained_encoder, run_variant  # noqa: E402
from base.console import exits_cleanly  # noqa: E402
from harness.outputs import check_output, write_json  # noqa: E402

VARIANTS = {'glofa': [], 'glofa-hbias1': ['--h_bias_init', '1'], 'task': ['--adaptor', 'task'],
            'class': ['--adaptor', 'class'], 'none': ['--adaptor', 'none'],
            'protonet': ['--model_name', 'protonet'], 'protonet-cosine': ['--model_name', 'protonet', '--metric', 'cosine'],
            'feat': ['--model_name', 'feat']}
@exits_cleanly
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--protocol', default='pretrained', choices=['pretrained', 'scratch'])
    p.add_argument('--variants', nargs='+', default=['glofa', 'glofa-hbias1', 'protonet', 'feat'], choices=list(VARIANTS))
    p.add_argument('--seeds', type=int, nargs='+', default=[960402, 1, 3], help='seeds of each variant')
    p.add_argument('--save_dir', default=os.path.join('saves', 'ablation'), help='where the runs are saved')
    p.add_argument('--extra', nargs=argparse.REMAINDER, default=[], help='more flags for train.py')
    p.add_argument('--pretrain_extra', type=shlex.split, default=[],
                   help='more flags for pretrain.py, as one string: --pretrain_extra "--epochs 20 --n_workers 2"')
    p.add_argument('--json', default=None, help='write the table to this JSON file')
    opts = p.parse_args(argv)
    if opts.json:
        check_output(opts.json, '--json', formats=['.json'])
    save_dir = os.path.abspath(opts.save_dir)
    os.makedirs(save_dir, exist_ok=True)
    done = []
    protocol = []
    if opts.protocol == 'pretrained':
        protocol = ['--pretrained', pretrained_encoder(save_dir, opts.pretrain_extra, done), *PRETRAINED_RATES]
    figures = {}
    for variant in opts.variants:
        for seed in opts.seeds:
            base = os.path.join(save_dir, f'{opts.protocol}-{variant}-seed{seed}')
            flags = ['--demo', 'mixed', '--seed', str(seed), *VARIANTS[variant], *protocol, '--save_dir', save_dir,
                     *opts.extra]
            figures[(variant, seed)] = run_variant(base, flags, done)
    table = {}
    print(f'\n{opts.protocol} protocol; test accuracy (%), 5-way 1-shot, mix-grained demo')
    print('| variant | mean over seeds ± CI | ' + ' | '.join(f'seed {s}' for s in opts.seeds)
          + ' | single-source tasks | mixed tasks | alpha_task | alpha_cls |')
    print('|---|---|' + '---|' * len(opts.seeds) + '---|---|---|---|')
    for variant in opts.variants:
        rows = [figures[(variant, s)] for s in opts.seeds]
        accuracies = np.array([r['accuracy'] for r in rows])
        ci = 1.96 * accuracies.std() / np.sqrt(len(accuracies))
        groups = {g: float(np.mean([r['groups'][g]['accuracy'] for r in rows if g in r.get('groups', {})] or [np.nan]))
                  for g in ('single-source', 'mixed')}  # nan: no episode of that group
        strengths = [f"{np.mean([r[key] for r in rows]):.3f}" if 'alpha_task' in rows[0] else '-'
                     for key in ('alpha_task', 'alpha_cls')]
        table[variant] = {'mean': float(accuracies.mean()), 'ci_over_seeds': float(ci), 'groups': groups, 'runs': rows}
        print(f'| {variant} | {accuracies.mean():.2f} ± {ci:.2f} | '
              + ' | '.join(f"{r['accuracy']:.2f} ± {r['ci95']:.2f}" for r in rows)
              + f" | {groups['single-source']:.2f} | {groups['mixed']:.2f} | {strengths[0]} | {strengths[1]} |")
    for variant in opts.variants:
        for seed in opts.seeds:
            trajectory = figures[(variant, seed)]['validation_strengths']
            if trajectory:
                print(f'{variant}, seed {seed}: alpha_task, alpha_cls at each validation: {"; ".join(trajectory)}')
    if opts.json:
        write_json(opts.json, table)
    return table


if __name__ == '__main__':
    main()
