"""Evaluate a trained model over test episodes: python test.py [--N 5 10 --K 1 5 ...].

Any way and shot can be evaluated from one checkpoint (no model's parameters depend on them); the
split is encoded once for all the settings, and each setting draws its own seeded episodes, so its
line is the same whether it runs alone or beside others.

The check of data and weights before any meta-training: python test.py --model_name protonet
--pretrained FILE evaluates ProtoNet on the pretrained encoder itself, Euclidean and cosine, beside
the figures FEAT's maintainer quotes for FEAT's encoders.
"""
import copy
import os
import sys
from typing import Optional

import torch

from arguments import parse_args
from checkpoints import load_model_checkpoint
from dataloader import episode_sampler, eval_transform, looks_like_mini_imagenet_test, open_split
from evaluation import (EvalOptions, SplitFeatures, describe_eval_mode, result_lines, run_episodes, setting_figures,
                        split_episodes, stored_features, write_figures)
from runs import (DATA_FLAGS, EPISODE_FLAGS, build_model, check_args, data_path, missing_run_message, model_config, place_model, prepare_demo,
                  check_disjoint, command_inputs, other_runs, run_paths, split_files_beside, unfinished_line)
from utils import (UserError, check_output, exit_on_interrupt, exits_cleanly, flag_hint, git_revision,
                   interrupt_on_sigterm, keep_freed_memory, mean_ci, select_device, set_seed)


def settings_of(args) -> list[tuple[int, int]]:
    """Every (N, K) pair of the flags, in the order given: --N 5 10 --K 1 5 -> (5,1) (5,5) (10,1) (10,5)."""
    ways = args.N if isinstance(args.N, list) else [args.N]
    shots = args.K if isinstance(args.K, list) else [args.K]
    return [(n, k) for n in ways for k in shots]


def with_setting(args, n_way: int, n_shot: int):
    """A copy of the flags with one (N, K) setting, for the helpers that read args.N and args.K."""
    view = copy.copy(args)
    view.N, view.K = n_way, n_shot
    return view


# ProtoNet on FEAT's pretrained encoders, no meta-training, 5-way 1-shot on mini-ImageNet's test split, as
# FEAT's maintainer gives them to check that weights and data copy match (quoted, not measured here)
PRETRAINED_FIGURES = {
    ('resnet', 'euclidean'): "almost 55 % for FEAT's Res12-pre.pth (Sha-Lab/FEAT issue 33)",
    ('resnet', 'cosine'): "around 62 % for FEAT's Res12-pre.pth (Sha-Lab/FEAT issue 33)",
    ('convnet', 'euclidean'): "about 46 % for FEAT's con-pre.pth, metric not stated (Sha-Lab/FEAT issue 16)",
    ('convnet', 'cosine'): "about 46 % for FEAT's con-pre.pth, metric not stated (Sha-Lab/FEAT issue 16)",
}


def checks_pretrained(args, settings: list[tuple[int, int]]) -> bool:
    """ProtoNet with --model_path none, or with no meta-trained run for these flags: evaluate the
    pretrained encoder itself (ProtoNet needs no training to be evaluated)."""
    if args.model_name != 'protonet' or (args.model_path and args.model_path.lower() != 'none'):
        return False
    if args.model_path or not os.path.isfile(run_paths(with_setting(args, *settings[0])).best):
        return True
    print(f'evaluating the meta-trained ProtoNet run of these flags; --model_path none evaluates the '
          f'pretrained encoder {args.pretrained} itself')
    return False


def check_pretrained(args, settings: list[tuple[int, int]], dataset, device) -> dict:
    """ProtoNet on the pretrained encoder, Euclidean and cosine on one encoding of the split, each line
    beside FEAT's maintainer's figure where it applies (5-way 1-shot)."""
    model = place_model(build_model(with_setting(args, *settings[0])), args, device)
    options = EvalOptions.from_args(args, device)
    weights = None if args.pretrained.lower() == 'none' else args.pretrained
    features = SplitFeatures(model.encoder, dataset, options, stored_features(args, weights, dataset, options))
    untrained = args.pretrained.lower() == 'none'
    if untrained:
        print(f'ProtoNet on an untrained {args.network_name} encoder (random initialisation, seed {args.seed}), no '
              f'training: the floor any training must beat')
    else:
        print(f'ProtoNet on the pretrained encoder {args.pretrained}, no meta-training: the check that data and '
              f'weights match')
    benchmark = looks_like_mini_imagenet_test(dataset)
    if args.network_name == 'resnet' and args.normalization != 'feat' and not untrained:
        print("note: FEAT's Res12-pre.pth was pretrained with FEAT's normalisation; evaluate FEAT's weights "
              "with --normalization feat")
    results, figures = {}, []
    for n, k in settings:
        for metric in ('euclidean', 'cosine'):
            model.metric = metric
            episodes, mode = split_episodes(args, dataset, torch.Generator().manual_seed(args.seed),
                                            args.n_testing_episodes, n, k)
            result = run_episodes(model, dataset, episodes, mode, options, features, desc=f'{metric} {n}-way {k}-shot')
            quoted = PRETRAINED_FIGURES.get((args.network_name, metric)) if (n, k) == (5, 1) and benchmark \
                and not untrained else None  # FEAT's figures are for mini-ImageNet's test split
            lines = result_lines(result, n, k)
            lines[0] = f'{metric}: {lines[0]}' + (f'   [quoted on mini-ImageNet: {quoted}]' if quoted else '')
            print('\n'.join(lines))
            results[(n, k, metric)] = result
            figures.append({**setting_figures(n, k, result), 'metric': metric})
    print(f'seed {args.seed}, revision {git_revision()}')
    if features.warning():
        print(features.warning())
    if args.json:
        write_figures(args.json, figures, pretrained=args.pretrained, seed=args.seed, Q=args.Q, revision=git_revision())
    return results


def checkpoint_path(args, settings: list[tuple[int, int]]) -> str:
    """--model_path, else the best checkpoint train.py writes for these flags (for several settings:
    the run of the first one, said on screen)."""
    if args.model_path:
        if not os.path.isfile(args.model_path):
            raise UserError(f'checkpoint {args.model_path} (--model_path) not found')
        return args.model_path
    first = with_setting(args, *settings[0])
    path = run_paths(first).best
    if not os.path.isfile(path):
        path = trained_in_another_setting(first, path)
    if len(settings) > 1:
        print(f'several settings: evaluating the checkpoint of the {settings[0][0]}-way {settings[0][1]}-shot run, '
              f'{path} (pass --model_path to choose another)')
    return path


def trained_in_another_setting(args, path: str) -> str:
    """The rule for a setting nobody trained: the one run of the same flags but N and K is evaluated (any
    way and shot can be, from one checkpoint); several such runs are listed, none is the usual error."""
    trained = [(name, diff) for name, diff in other_runs(args) if set(diff) <= {'N', 'K'}
               and os.path.isfile(os.path.join(args.save_dir, 'trained_models', f'{name}.model'))]
    if len(trained) == 1:
        name, diff = trained[0]
        n, k = (diff.get(key, (getattr(args, key),) * 2)[1] for key in ('N', 'K'))
        print(f'no run was trained as {args.N}-way {args.K}-shot with these flags: evaluating the one trained as '
              f'{n}-way {k}-shot, {name}')
        return os.path.join(args.save_dir, 'trained_models', f'{name}.model')
    if trained:
        listed = ', '.join(f"{name} ({diff.get('N', (0, args.N))[1]}-way {diff.get('K', (0, args.K))[1]}-shot)"
                           for name, diff in trained)
        raise UserError(f'no run was trained as {args.N}-way {args.K}-shot with these flags, and several were in '
                        f'other settings: {listed}; choose one with --N and --K of its training, or --model_path')
    raise UserError(missing_run_message('checkpoint', path, args.save_dir, '.model') +
                    '; or train this run first (train.py with the same flags)')


def trained_as_line(record: dict, settings: list[tuple[int, int]]) -> Optional[str]:
    """'trained as 5-way 1-shot; evaluating 10-way 5-shot' when the settings differ from the training's."""
    config = record.get('config') if isinstance(record.get('config'), dict) else {}
    if 'N' not in config or 'K' not in config:
        return None
    trained = (config['N'], config['K'])
    if all(setting == trained for setting in settings):
        return None
    return (f'trained as {trained[0]}-way {trained[1]}-shot; evaluating '
            + ', '.join(f'{n}-way {k}-shot' for n, k in settings))


def evaluate_settings(args, settings, dataset, model, options, features, results: dict, rows: list) -> None:
    """Each (N, K) setting on its own seeded episodes, its lines printed as it ends; filled into ``results``."""
    for n, k in settings:
        episodes, mode = split_episodes(args, dataset, torch.Generator().manual_seed(args.seed),
                                        args.n_testing_episodes, n, k)
        print(f'{n}-way {k}-shot: {describe_eval_mode(args.eval_mode, mode, len(dataset), args.n_testing_episodes, episodes.images_per_episode)}')
        result = run_episodes(model, dataset, episodes, mode, options, features, desc=f'test {n}-way {k}-shot')
        print('\n'.join(result_lines(result, n, k, args.adaptor)))
        results[(n, k)] = result
        rows.append((n, k, *mean_ci(result.accuracies)))


def summary_table(rows: list[tuple[int, int, float, float]]) -> str:
    lines = ['| way | shot | accuracy (%) |', '|---|---|---|']
    lines += [f'| {n} | {k} | {100 * m:.2f} ± {100 * c:.2f} |' for n, k, m, c in rows]
    return '\n'.join(lines)


@exits_cleanly
def main(argv: Optional[list[str]] = None) -> dict:
    interrupt_on_sigterm()
    keep_freed_memory()
    args = parse_args(argv, several_settings=True)
    if args.demo:
        prepare_demo(args)
    device = select_device(args.device, args.devices)
    settings = settings_of(args)
    for n, k in settings:
        check_args(with_setting(args, n, k), device)
    set_seed(args.seed)
    pretrained_only = checks_pretrained(args, settings)
    model_path = None if pretrained_only else checkpoint_path(args, settings)
    with flag_hint(DATA_FLAGS):
        dataset = open_split(data_path(args), 'test', eval_transform(args.normalization))
        parts = dataset.datasets if len(data_path(args)) > 1 else [dataset]  # each root's test split
        for root, part in zip(data_path(args), parts):  # against the splits beside it, where they are cheap to read
            check_disjoint(args, {'test': part, **split_files_beside(root, 'test')})
    if args.json:
        check_output(args.json, '--json', [*command_inputs(args, dataset), model_path], args.overwrite)
    with flag_hint(EPISODE_FLAGS):  # every setting fits the split, before any is evaluated
        for n, k in settings:
            episode_sampler(dataset, 1, n, k + args.Q, task_mix=args.task_mix)
    if pretrained_only:
        return check_pretrained(args, settings, dataset, device)
    model = build_model(with_setting(args, *settings[0]), pretrained=False)
    record = load_model_checkpoint(model, model_path, model_config(args))
    if 'optimizer' in record:  # train.py's 'last' state: the weights after its last finished gap
        validated = f"the last state, after episode {record.get('episode')}; the best checkpoint is the .model file beside it"
    elif 'validating_accuracy' in record:
        validated = f"validation accuracy {100 * float(record['validating_accuracy']):.2f} %, episode {record.get('epoch')}"
    else:
        validated = 'no validation record: not written by train.py'
    print(f"loaded {model_path} ({validated})")
    unfinished = unfinished_line(model_path)
    if unfinished:
        print(unfinished)
    trained_as = trained_as_line(record, settings)
    if trained_as:
        print(trained_as)
    model = place_model(model, args, device)
    options = EvalOptions.from_args(args, device)
    features = SplitFeatures(model.encoder, dataset, options, stored_features(args, model_path, dataset, options))

    results, rows = {}, []
    with exit_on_interrupt(lambda: f'interrupted during the test ({len(results)} of {len(settings)} settings done); '
                                   f'test.py writes nothing before the end: run the same command again'):
        evaluate_settings(args, settings, dataset, model, options, features, results, rows)
    if len(settings) > 1:
        print(summary_table(rows))
    print(f'seed {args.seed}, revision {git_revision()}')
    if features.warning():
        print(features.warning())
    if args.json:
        write_figures(args.json, [setting_figures(n, k, r) for (n, k), r in results.items()],
                      checkpoint=model_path, seed=args.seed, Q=args.Q, revision=git_revision())
    return results


if __name__ == '__main__':
    main(sys.argv[1:])
