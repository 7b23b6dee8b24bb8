"""The paper's protocol end to end, into one table: python scripts/reproduce.py [--out DIR] [--demo].

    python scripts/reproduce.py --pretrained Res12-pre.pth --normalization feat   # FEAT's weights
    python scripts/reproduce.py --pretrain                                        # pretrain.py first
    python scripts/reproduce.py --demo                                            # small, on a CPU, in minutes

Stages, each a command of this repository run as its own process, each skipped when its result exists
(so an interrupted run, started again with the same command, continues where it stopped):
  1. optional pretraining (--pretrain): pretrain.py on the train split, to DIR/pretrained.pth;
  2. the check of data and weights: test.py --model_name protonet on the pretrained encoder, no meta-training;
  3. for each model (--models) and shot (--shots): train.py, which meta-trains and tests the best
     checkpoint on --n_testing_episodes episodes (test.py alone when the run is finished but has no figures).
DIR/results.md then holds the quoted figures beside ours (mean ± 95 % CI), GLoFA's strengths, and the
exact command of every cell; DIR/logs/ holds each stage's output.
"""
import argparse
import json
import os
import shlex
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from harness.demo import refuse_unowned  # noqa: E402
from harness.stages import pretraining_finished, run_finished, run_stage  # noqa: E402
from base.console import UserError, exit_on_interrupt, exits_cleanly, interrupt_on_sigterm  # noqa: E402
from base.files import write_text  # noqa: E402
from harness.outputs import claim_output_folder  # noqa: E402

# figures quoted beside ours, 5-way, mini-ImageNet's test split, ResNet-12 from FEAT's pretrained weights
# (the README's results table gives their sources; none was measured by this repository)
QUOTED = {('glofa', 1): '66.1 (paper)', ('glofa', 5): '81.4 (paper)',
          ('protonet', 1): "62.39 (FEAT's repository)", ('protonet', 5): "80.53 (FEAT's repository)",
          ('feat', 1): "66.78 (FEAT's repository)", ('feat', 5): "82.05 (FEAT's repository)"}
CHECK_QUOTED = {'euclidean': 'almost 55 (Sha-Lab/FEAT issue 33)', 'cosine': 'around 62 (Sha-Lab/FEAT issue 33)'}
# --demo: the built-in data, a schedule that runs each cell in about a minute on a 2-core CPU, and the
# reference's learning rate for a pretrained encoder (the demo preset's 0.01 is for training from scratch)
DEMO_TRAIN = ['--demo', '--n_training_episodes', '100', '--episode_gap', '50', '--n_testing_episodes', '500',
              '--lr_network', '0.0001']
DEMO_PRETRAIN = ['--demo']


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=os.path.join('saves', 'reproduce'),
                   help='folder of the runs, logs, figures and results.md')
    p.add_argument('--models', nargs='+', default=['glofa', 'protonet', 'feat'], choices=['glofa', 'protonet', 'feat'])
    p.add_argument('--shots', type=int, nargs='+', default=[1, 5])
    p.add_argument('--N', type=int, default=5, help='way of every cell')
    p.add_argument('--data_path', nargs='+', default=None, help="dataset root(s) (default: train.py's)")
    p.add_argument('--network_name', default=None, choices=['resnet', 'convnet'], help="default: train.py's")
    p.add_argument('--normalization', default=None, choices=['imagenet', 'feat'], help="default: train.py's")
    p.add_argument('--pretrained', default=None, help="encoder weights (default: train.py's); not with --pretrain")
    p.add_argument('--pretrain', action='store_true', help='pretrain the encoder with pretrain.py first')
    p.add_argument('--demo', action='store_true',
                   help='the built-in demo data, Conv-4 pretrained by pretrain.py --demo, short meta-training')
    p.add_argument('--extra', nargs=argparse.REMAINDER, default=[],
                   help='more flags for train.py and test.py (last, so they win), e.g. --extra --n_workers 2')
    p.add_argument('--pretrain_extra', type=shlex.split, default=[],
                   help='more flags for pretrain.py, as one string: --pretrain_extra "--epochs 20 --n_workers 2"')
    return p


def read_figures(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def cell_text(figures: Optional[dict]) -> str:
    return f"{figures['accuracy']:.2f} ± {figures['ci95']:.2f}" if figures else 'not run'


def write_results(path: str, opts, cells: dict, check: dict, commands: dict, pretrained: str) -> None:
    shots = opts.shots
    lines = [f'# Results: {opts.N}-way accuracy (%), mean ± 95 % CI over test episodes', '',
             f'Data: {" ".join(opts.data_path) if opts.data_path else ("the built-in demo, datasets/demo" if opts.demo else "train.py default")}; encoder weights: '
             f'{pretrained}. Quoted figures are the paper\'s or FEAT\'s for mini-ImageNet with FEAT\'s ResNet-12; '
             f'they are not measured here and apply only to that setting.', '',
             '| model | ' + ' | '.join(f'{k}-shot, ours | {k}-shot, quoted' for k in shots) + ' | strengths (alpha_task, alpha_cls) |',
             '|---|' + '---|---|' * len(shots) + '---|']
    for model in opts.models:
        row = []
        for k in shots:
            row += [cell_text(cells.get((model, k))), QUOTED.get((model, k), '') if not opts.demo else '']
        strengths = ', '.join(f"{k}-shot {c['alpha_task']:.3f} / {c['alpha_cls']:.3f} (> 0 in "
                              f"{100 * c['alpha_task_active']:.0f} / {100 * c['alpha_cls_active']:.0f} % of episodes)"
                              for k in shots if (c := cells.get((model, k))) and 'alpha_task' in c)
        lines.append(f'| {model} | ' + ' | '.join(row) + f' | {strengths} |')
    if check.get('settings'):
        lines += ['', 'The check of data and weights (ProtoNet on the pretrained encoder, no meta-training):', '',
                  '| metric | ours | quoted |', '|---|---|---|']
        for setting in check['settings']:
            quoted = CHECK_QUOTED[setting['metric']] if (setting['N'], setting['K']) == (5, 1) and not opts.demo else ''
            lines.append(f"| {setting['metric']}, {setting['N']}-way {setting['K']}-shot | {cell_text(setting)} | {quoted} |")
    lines += ['', 'Commands (each cell: its training, then its test of the best checkpoint):', '']
    lines += [f'- {name}: `{command}`' for name, command in commands.items()]
    write_text(path, '\n'.join(lines) + '\n')


@exits_cleanly
def main(argv: Optional[list[str]] = None) -> dict:
    interrupt_on_sigterm()
    opts = get_parser().parse_args(argv)
    if opts.N < 2 or min(opts.shots) < 1:
        raise UserError(f'--N must be at least 2 and every --shots at least 1, got --N {opts.N} --shots '
                        f'{" ".join(map(str, opts.shots))}')
    if opts.pretrain and opts.pretrained:
        raise UserError('--pretrain writes the encoder weights itself: give --pretrained or --pretrain, not both')
    if opts.demo and opts.data_path:
        try:
            refuse_unowned(opts.data_path)  # before any stage writes anything
        except ValueError as error:
            raise UserError(f'{error} with --data_path, or drop --demo to use the dataset that is there') from None
    out = os.path.abspath(opts.out)
    claim_output_folder(out, '--out')
    logs, saves = os.path.join(out, 'logs'), os.path.join(out, 'saves')
    common = []
    for flag in ('network_name', 'normalization'):
        if getattr(opts, flag):
            common += [f'--{flag}', getattr(opts, flag)]
    if opts.data_path:
        common += ['--data_path', *opts.data_path]

    # ---------------- the stages: (name, command, log, whether its result exists)
    stages, commands, cells = [], {}, {}
    pretrained = opts.pretrained
    if opts.pretrain or opts.demo and not pretrained:  # 1. pretraining
        pretrained = os.path.join(out, 'pretrained.pth')
        command = ['pretrain.py', *(DEMO_PRETRAIN if opts.demo else []), *common, '--save_dir', saves,
                   '--out', pretrained, *opts.pretrain_extra]
        commands['pretraining'] = shlex.join(['python', *command])
        stages.append(('pretraining', command + ['--resume'], os.path.join(logs, 'pretrain.log'),
                       lambda weights=pretrained: pretraining_finished(weights)))
    weights = ['--pretrained', pretrained] if pretrained else []
    base = [*(DEMO_TRAIN if opts.demo else []), *common, *weights, '--save_dir', saves, '--N', str(opts.N)]
    check_json = os.path.join(out, 'figures', 'check.json')  # 2. the check of data and weights
    command = ['test.py', *base, '--model_name', 'protonet', '--model_path', 'none', '--K', '1', *opts.extra,
               '--json', check_json]
    commands['check of data and weights'] = shlex.join(['python', *command])
    stages.append(('the check of data and weights', command, os.path.join(logs, 'check.log'),
                   lambda: os.path.isfile(check_json)))
    figures = {}
    for model in opts.models:  # 3. meta-training and test of each model and shot
        for k in opts.shots:
            name = f'{model}-{opts.N}way-{k}shot'
            figures[(model, k)] = os.path.join(out, 'figures', f'{name}.json')
            flags = [*base, '--model_name', model, '--K', str(k), *opts.extra, '--json', figures[(model, k)]]
            commands[name] = shlex.join(['python', 'train.py', *flags])
            stages.append((name, flags, os.path.join(logs, f'{name}.log'),
                           lambda path=figures[(model, k)]: os.path.isfile(path)))

    def results() -> dict:
        """results.md from every figure there is so far (a cell not yet run says so)."""
        cells.update({cell: read_figures(path)['settings'][0] for cell, path in figures.items() if os.path.isfile(path)})
        check = read_figures(check_json) if os.path.isfile(check_json) else {}
        write_results(os.path.join(out, 'results.md'), opts, cells, check, commands, pretrained or 'train.py default')
        return check

    done, current = [], ['start-up']
    with exit_on_interrupt(lambda: f'interrupted during {current[0]}: {len(done)} of {len(stages)} stages ran now and '
                                   f'{os.path.join(out, "results.md")} holds every result so far; run the same command '
                                   f'again to continue'):
        for name, command, log, finished in stages:
            if finished():
                continue
            current[0] = name
            if command[0] in ('pretrain.py', 'test.py'):
                run_stage(command, log, done)
            elif run_finished(command):  # trained, but stopped before its test wrote the figures
                run_stage(['test.py', *command], log, done)
            else:
                run_stage(['train.py', *command, '--resume'], log, done)
            results()
    check = results()
    print(f'\nwrote {os.path.join(out, "results.md")} ({len(done)} stage{"s" if len(done) != 1 else ""} run now, '
          f'the rest already done)')
    return {'ran': done, 'cells': cells, 'check': check}


if __name__ == '__main__':
    main(sys.argv[1:])
