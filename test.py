"""Evaluate a trained GLoFA model over test episodes: python test.py [--N 5 10 --K 1 5 ...].

Any way and shot can be evaluated from one checkpoint (GLoFA's parameters do not depend on them);
the split is encoded once for all the settings, and each setting draws its own seeded episodes, so
its line is the same whether it runs alone or beside others.
"""
import copy
import os
import sys
from typing import Optional

import torch

from arguments import parse_args
from checkpoints import load_model_checkpoint
from dataloader import episode_sampler, eval_transform, open_split
from evaluation import (Episodes, EvalOptions, SplitFeatures, choose_eval_mode, describe_eval_mode, result_lines,
                        run_episodes, setting_figures, write_figures)
from runs import (DATA_FLAGS, EPISODE_FLAGS, build_model, check_args, data_path, missing_run_message, model_config, place_model, prepare_demo,
                  run_paths)
from utils import UserError, exits_cleanly, flag_hint, git_revision, mean_ci, select_device, set_seed


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


def checkpoint_path(args, settings: list[tuple[int, int]]) -> str:
    """--model_path, else the best checkpoint train.py writes for these flags (for several settings:
    the run of the first one, said on screen)."""
    if args.model_path:
        if not os.path.isfile(args.model_path):
            raise UserError(f'checkpoint {args.model_path} (--model_path) not found')
        return args.model_path
    path = run_paths(with_setting(args, *settings[0])).best
    if not os.path.isfile(path):
        raise UserError(missing_run_message('checkpoint', path, args.save_dir, '.model') +
                        '; or train this run first (train.py with the same flags)')
    if len(settings) > 1:
        print(f'several settings: evaluating the checkpoint of the {settings[0][0]}-way {settings[0][1]}-shot run, '
              f'{path} (pass --model_path to choose another)')
    return path


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


def summary_table(rows: list[tuple[int, int, float, float]]) -> str:
    lines = ['| way | shot | accuracy (%) |', '|---|---|---|']
    lines += [f'| {n} | {k} | {100 * m:.2f} ± {100 * c:.2f} |' for n, k, m, c in rows]
    return '\n'.join(lines)


@exits_cleanly
def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv, several_settings=True)
    if args.demo:
        prepare_demo(args)
    set_seed(args.seed)
    device = select_device(args.device, args.devices)
    settings = settings_of(args)
    for n, k in settings:
        check_args(with_setting(args, n, k), device)
    model_path = checkpoint_path(args, settings)
    with flag_hint(DATA_FLAGS):
        dataset = open_split(data_path(args), 'test', eval_transform())
    with flag_hint(EPISODE_FLAGS):  # every setting fits the split, before any is evaluated
        for n, k in settings:
            episode_sampler(dataset, 1, n, k + args.Q, task_mix=args.task_mix)
    model = build_model(with_setting(args, *settings[0]), pretrained=False)
    record = load_model_checkpoint(model, model_path, model_config(args))
    print(f"loaded {model_path} (validation accuracy {100 * float(record.get('validating_accuracy', float('nan'))):.2f} %, "
          f"episode {record.get('epoch')})")
    trained_as = trained_as_line(record, settings)
    if trained_as:
        print(trained_as)
    model = place_model(model, args, device)
    options = EvalOptions.from_args(args, device)
    features = SplitFeatures(model.encoder, dataset, options)

    results, rows = {}, []
    for n, k in settings:
        episodes = Episodes(args.n_testing_episodes, n, k, args.Q, torch.Generator().manual_seed(args.seed),
                            args.task_mix)
        per_episode = episodes.images_per_episode
        mode = choose_eval_mode(args.eval_mode, len(dataset), args.n_testing_episodes, per_episode)
        print(f'{n}-way {k}-shot: {describe_eval_mode(args.eval_mode, mode, len(dataset), args.n_testing_episodes, per_episode)}')
        result = run_episodes(model, dataset, episodes, mode, options, features, desc=f'test {n}-way {k}-shot')
        print('\n'.join(result_lines(result, n, k, args.adaptor)))
        results[(n, k)] = result
        rows.append((n, k, *mean_ci(result.accuracies)))
    if len(settings) > 1:
        print(summary_table(rows))
    print(f'seed {args.seed}, revision {git_revision()}')
    if args.json:
        write_figures(args.json, [setting_figures(n, k, r) for (n, k), r in results.items()],
                      checkpoint=model_path, seed=args.seed, Q=args.Q, revision=git_revision())
    return results


if __name__ == '__main__':
    main(sys.argv[1:])
