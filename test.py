"""Evaluate a trained model over test episodes: python test.py [--N 5 10 --K 1 5 ...].

Any way and shot can be evaluated from one checkpoint (no model's parameters depend on them); the
split is encoded once for all the settings, and each setting draws its own seeded episodes, so its
line is the same whether it runs alone or beside others.

The check of data and weights before any meta-training: python test.py --model_name protonet
--pretrained FILE evaluates ProtoNet on the pretrained encoder itself, Euclidean and cosine, beside
the figures FEAT's maintainer quotes for FEAT's encoders.
"""
import os
import sys
from typing import Optional

from arguments import check_args, parse_args, with_setting
from dataloader import (DATA_FLAGS, EPISODE_FLAGS, check_disjoint, episode_sampler, eval_transform, open_split,
                        split_files_beside)
from harness.checkpoints import as_trained, build_model, load_model_checkpoint, read_checkpoint
from base.console import UserError, exits_cleanly, flag_hint
from harness.device import place_model
from harness.evaluation import run_test
from harness.runs import run_paths, set_up, unfinished_line


def settings_of(args) -> list[tuple[int, int]]:
    """Every (N, K) pair of the flags, in the order given: --N 5 10 --K 1 5 -> (5,1) (5,5) (10,1) (10,5)."""
    ways = args.N if isinstance(args.N, list) else [args.N]
    shots = args.K if isinstance(args.K, list) else [args.K]
    return [(n, k) for n in ways for k in shots]


def checks_pretrained(args, trained: Optional[str]) -> bool:
    """ProtoNet with --model_path none, or with no meta-trained run for these flags (``trained``, its best
    checkpoint): evaluate the pretrained encoder itself (ProtoNet needs no training to be evaluated)."""
    if args.model_name != 'protonet' or (args.model_path and args.model_path.lower() != 'none'):
        return False
    if args.model_path or not os.path.isfile(trained):
        return True
    print(f'evaluating the meta-trained ProtoNet run of these flags; --model_path none evaluates the '
          f'pretrained encoder {args.pretrained} itself')
    return False


def checkpoint_path(args, settings: list[tuple[int, int]], trained: Optional[str]) -> str:
    """--model_path, else ``trained``: the best checkpoint train.py writes for these flags (for several settings:
    the run of the first one, said on screen)."""
    if args.model_path:
        if not os.path.isfile(args.model_path):
            raise UserError(f'checkpoint {args.model_path} (--model_path) not found')
        return args.model_path
    path = trained
    if not os.path.isfile(path):
        from harness.finding import trained_in_another_setting
        path = trained_in_another_setting(with_setting(args, *settings[0]), path)
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


@exits_cleanly
def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv, several_settings=True)
    settings = settings_of(args)
    device = set_up(args, lambda device: [check_args(with_setting(args, n, k), device) for n, k in settings])
    # the run train.py writes for these flags (its identity reads the data and the weights: made once)
    trained = None if args.model_path else run_paths(with_setting(args, *settings[0])).best
    pretrained_only = checks_pretrained(args, trained)
    model_path = None if pretrained_only else checkpoint_path(args, settings, trained)
    with flag_hint(DATA_FLAGS):
        dataset = open_split(args.data_path, 'test', eval_transform(args.normalization))
        parts = dataset.datasets if len(args.data_path) > 1 else [dataset]  # each root's test split
        beside = []
        for root, part in zip(args.data_path, parts):  # against the splits beside it, where they are cheap to read
            others = split_files_beside(root, 'test')
            check_disjoint({'test': part, **others}, args.allow_overlap)
            beside += others.values()
    if args.json:  # the rule for outputs, before any work (harness.outputs): never a file this command reads
        from harness.outputs import check_output, command_inputs
        check_output(args.json, '--json', [*command_inputs(args, dataset, *beside), model_path], args.overwrite)
    with flag_hint(EPISODE_FLAGS):  # every setting fits the split, before any is evaluated
        for n, k in settings:
            episode_sampler(dataset, 1, n, k + args.Q, task_mix=args.task_mix)
    if pretrained_only:
        from harness.weights_check import check_pretrained
        return check_pretrained(args, settings, dataset, device)
    checkpoint = read_checkpoint(model_path)  # the data first: its mistakes are named before the checkpoint's
    for line in as_trained(args, checkpoint[0], model_path):  # its normalisation, network, model flags (unless given)
        print(line)
    for part in parts:
        part.transform = eval_transform(args.normalization)
    model = build_model(with_setting(args, *settings[0]), pretrained=False)
    record = load_model_checkpoint(model, model_path, args, checkpoint)
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
    return run_test(args, settings, dataset, model, model_path, device,
                         'test.py writes nothing before the end: run the same command again')


if __name__ == '__main__':
    main(sys.argv[1:])
