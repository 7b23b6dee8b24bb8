"""Finding runs again: by their flags (the other runs of the same data and model under --save_dir, what a run's
saved state says, the checkpoint test.py evaluates, the messages that list what is there when a run is not), and a
saved state resumed (``load_last``). Loaded when a run is not where its flags say, or is resumed."""
import json
import os
import random

import numpy as np
import torch

from harness.checkpoints import check_config, load_strict, read_file
from base.console import UserError
from harness.runs import Run, run_identity, run_name
from networks import set_forward_count


def other_runs(args, same: tuple = ('data', 'network_name', 'model_name')) -> list[tuple[str, dict]]:
    """Runs under --save_dir that agree with these flags in ``same`` (by default: the data, network and model)
    and differ in something else: (name, {flag: (here, there)}), fewest differences first. Reads their identity
    files only."""
    here, name_here = run_identity(args), run_name(args)
    folder = os.path.join(args.save_dir, 'statistics')
    found = []
    for file in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not file.endswith('.run.json'):
            continue
        try:
            with open(os.path.join(folder, file)) as f:
                there = json.load(f)
        except (OSError, ValueError):
            continue
        name = there.pop('run', file[:-len('.run.json')]) if isinstance(there, dict) else None
        if not isinstance(name, str) or os.path.basename(name) != name or name in ('', '.', '..'):
            continue  # a record whose name would lead out of --save_dir's folders is not a run of ours
        if name == name_here or any(there.get(k) != here[k] for k in same):
            continue
        found.append((name, {k: (here.get(k), there.get(k)) for k in sorted(set(here) | set(there))
                             if here.get(k) != there.get(k)}))
    return sorted(found, key=lambda run: len(run[1]))


def data_changes(args) -> str:
    """'; the run X of these flags was trained when <what> differed (split/test.csv, ...)' for a run under
    --save_dir that differs from these flags in its data alone, else ''."""
    runs = [(name, diff) for name, diff in other_runs(args, same=('network_name', 'model_name')) if set(diff) == {'data'}]
    if not runs:
        return ''
    name, diff = runs[0]
    here, there = diff['data']
    changed = [what for i, (mine, theirs) in enumerate(zip(here, there)) if isinstance(mine, dict)
               and isinstance(theirs, dict) for what in sorted(set(mine) | set(theirs)) if mine.get(what) != theirs.get(what)]
    return (f'; the run {name} of these flags was trained on this data when it differed in: '
            f'{", ".join(changed) or "its roots"}')


def saved_state(last: str) -> str:
    """What a run's 'last' file says: 'not started' (no file), 'finished', 'unfinished', or 'saved' (a state
    this version cannot read). A state without the 'finished' key is finished, as train.py reads it."""
    if not os.path.isfile(last):
        return 'not started'
    try:
        return 'finished' if read_file(last, 'resume state').get('finished', True) else 'unfinished'
    except UserError:
        return 'saved'


def describe_differences(diff: dict) -> str:
    return ', '.join(f'{k} ({here} here, {there} there)' for k, (here, there) in diff.items())


def list_runs(save_dir: str, suffix: str) -> list[str]:
    """Files ending in ``suffix`` under ``save_dir``'s trained_models/ and statistics/, sorted."""
    found = []
    for folder in ('trained_models', 'statistics'):
        path = os.path.join(save_dir, folder)
        if os.path.isdir(path):
            found += [os.path.join(path, f) for f in sorted(os.listdir(path))
                      if f.endswith(suffix) and not f.endswith('.last' + suffix)]
    return found


def missing_run_message(what: str, path: str, save_dir: str, suffix: str, file_flag: str = '--model_path') -> str:
    """'<what> <path> not found; runs under <save_dir>: a, b' (or: 'no runs under ...'); ``file_flag`` is
    the flag that gives the file itself."""
    found = list_runs(save_dir, suffix)
    if not found:
        return f'{what} {path} not found, and there are no runs under {save_dir}: train one first (train.py)'
    names = ', '.join(os.path.basename(f)[:-len(suffix)] for f in found[:5])
    more = f' and {len(found) - 5} more' if len(found) > 5 else ''
    return (f'{what} {path} not found; runs under {save_dir}: {names}{more} '
            f'(give the flags of one of them, or its file with {file_flag})')


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
    raise UserError(missing_run_message('checkpoint', path, args.save_dir, '.model') + data_changes(args) +
                    '; or train this run first (train.py with the same flags)')


def resume_elsewhere(args, paths) -> None:
    """--resume with no saved state for these flags: refused when an unfinished run of the same data and model
    differs only in other flags (its flags continue it); else the nearest runs are named and a new run starts."""
    others = [(name, diff, saved_state(os.path.join(args.save_dir, 'trained_models', f'{name}.last.model')))
              for name, diff in (other_runs(args) if paths.stat else [])]  # train.py's runs: named by identity
    unfinished = [(name, diff) for name, diff, state in others if state == 'unfinished']
    if unfinished:
        name, diff = unfinished[0]
        raise UserError(f'--resume: no run with these flags, but the unfinished run {name} of the same data and '
                        f'model differs only in {describe_differences(diff)}: give its flags to continue it, or '
                        f'drop --resume to start this new run')
    for name, diff, state in others[:3]:
        print(f'note: no run with these flags; the {state} run {name} differs in {describe_differences(diff)}')
    changed = data_changes(args) if paths.stat else ''
    if changed:
        print(f'note: no run with these flags{changed}')
    print(f'no saved state {paths.last} yet: starting a new run')


# ------------------------------------------------------------------ a saved state resumed
def load_last(run: Run, record: dict) -> None:
    """Restore what ``save_last`` wrote."""
    path = run.paths.last
    check_config(record, run.config, path)
    load_strict(run.plain, record['state_dict'], path, 'resume state')
    run.optimizer.load_state_dict(record['optimizer'])
    run.scheduler.load_state_dict(record['scheduler'])
    if run.scaler.is_enabled() and record.get('scaler'):
        run.scaler.load_state_dict(record['scaler'])
    for name, generator in run.generators.items():
        generator.set_state(record['generators'][name])
    set_forward_count(run.plain.encoder, int(record['forward_count']))
    states = record['random_states']
    if len(states) != run.world_size and run.rank == 0:
        print(f'note: the state was saved by {len(states)} process(es) and is resumed on '
              f'{run.world_size}: processes without a saved random state keep a fresh seed, so the '
              f'continuation is not bit-identical to an uninterrupted run')
    if run.rank < len(states):
        set_random_states(states[run.rank])


def set_random_states(states: dict) -> None:
    """Restore what ``random_states`` returned (the CUDA states when the machine has as many devices)."""
    random.setstate(states['python'])
    kind, keys, *rest = states['numpy']  # a tensor key, or an array in states saved before
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))
    torch.set_rng_state(states['torch'])
    if states['cuda'] and torch.cuda.is_available() and len(states['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states['cuda'])
