"""GLoFA against its ablations on the mix-grained demo: train, test and tabulate.

    python scripts/mixed_ablation.py [--seeds 960402 1 3] [--adaptors both task class none]
                                     [--h_bias_init B] [--save_dir saves/ablation] [--json ablation.json]

For every seed and adaptor: `python train.py --demo mixed --seed S --adaptor A` (a run marked
trained in --save_dir is not trained again), then `python test.py` with the same flags, whose --json gives the test
accuracy, its per-episode CI, the per-group accuracies (single-source and mixed tasks) and the
adaptors' strengths. The table shows, per adaptor, the mean over seeds ± the 95 % CI over seeds
(1.96 std / sqrt(seeds)), and each seed's accuracy ± its per-episode CI.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv: list[str], log: str) -> None:
    with open(log, 'a') as f:
        code = subprocess.call([sys.executable, *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f'{" ".join(argv)} failed with exit code {code}; see {log}')


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--seeds', type=int, nargs='+', default=[960402, 1, 3], help='seeds of each variant')
    p.add_argument('--adaptors', nargs='+', default=['both', 'task', 'class', 'none'], help='variants')
    p.add_argument('--h_bias_init', type=float, default=None, help="train.py's opt-in strengths' bias")
    p.add_argument('--save_dir', default=os.path.join('saves', 'ablation'), help='where the runs are saved')
    p.add_argument('--extra', nargs=argparse.REMAINDER, default=[], help='more flags for train.py and test.py')
    p.add_argument('--json', default=None, help='write the table to this JSON file')
    opts = p.parse_args(argv)
    os.makedirs(opts.save_dir, exist_ok=True)
    runs = []
    for adaptor in opts.adaptors:
        for seed in opts.seeds:
            flags = ['--demo', 'mixed', '--seed', str(seed), '--adaptor', adaptor, '--save_dir', opts.save_dir,
                     *(['--h_bias_init', str(opts.h_bias_init)] if opts.h_bias_init is not None else []), *opts.extra]
            name = f'{adaptor}-seed{seed}' + (f'-hbias{opts.h_bias_init:g}' if opts.h_bias_init is not None else '')
            runs.append((adaptor, seed, flags, os.path.join(opts.save_dir, name)))
    for adaptor, seed, flags, base in runs:  # every training first, then every test
        if not os.path.isfile(base + '.trained'):
            print(f'training {os.path.basename(base)} ...', flush=True)
            run(['train.py', *flags], base + '.log')
            open(base + '.trained', 'w').close()
    figures = {}
    for adaptor, seed, flags, base in runs:
        if not os.path.isfile(base + '.test.json'):
            run(['test.py', *flags, '--json', base + '.test.json'], base + '.log')
        with open(base + '.test.json') as f:
            figures[(adaptor, seed)] = json.load(f)['settings'][0]
    table = {}
    print('| adaptor | mean over seeds ± CI | ' + ' | '.join(f'seed {s}' for s in opts.seeds)
          + ' | alpha_task | alpha_cls |')
    print('|---|---|' + '---|' * len(opts.seeds) + '---|---|')
    for adaptor in opts.adaptors:
        rows = [figures[(adaptor, s)] for s in opts.seeds]
        accuracies = np.array([r['accuracy'] for r in rows])
        ci = 1.96 * accuracies.std() / np.sqrt(len(accuracies))
        table[adaptor] = {'mean': float(accuracies.mean()), 'ci_over_seeds': float(ci), 'runs': rows}
        print(f'| {adaptor} | {accuracies.mean():.2f} ± {ci:.2f} | '
              + ' | '.join(f"{r['accuracy']:.2f} ± {r['ci95']:.2f}" for r in rows)
              + f" | {np.mean([r['alpha_task'] for r in rows]):.3f} | {np.mean([r['alpha_cls'] for r in rows]):.3f} |")
    groups = sorted({g for r in figures.values() for g in r.get('groups', {})})
    for group in groups:
        print(f'{group} tasks: ' + ', '.join(
            f"{a} {np.mean([figures[(a, s)]['groups'][group]['accuracy'] for s in opts.seeds]):.2f}"
            for a in opts.adaptors))
    if opts.json:
        with open(opts.json, 'w') as f:
            json.dump(table, f, indent=1)
    return table


if __name__ == '__main__':
    main()
