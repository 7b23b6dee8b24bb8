"""The studies' stages: commands of this repository run in their own processes, one or several at a time."""
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Callable, Optional

from arguments import parse_args
from harness.checkpoints import read_file
from base.console import UserError, progress, writing
from harness.finding import saved_state
from harness.runs import run_paths, weights_paths


# ------------------------------------------------------------------ runs of the scripts that chain commands
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def run_stage(command: list[str], log: str, done: list) -> None:
    """Run one command of this repository (``['train.py', flags...]``) in its own process, its output shown
    as it comes and appended to ``log``; a failure is one line. The command line is appended to ``done``."""
    line = shlex.join(['python', *command])
    print(f'\n$ {line}', flush=True)
    os.makedirs(os.path.dirname(log) or '.', exist_ok=True)
    with writing(log), open(log, 'a') as f:
        process = start_stage(command, line, f, subprocess.PIPE)
        for chunk in iter(lambda: process.stdout.read1(65536), b''):  # as it comes: progress bars stay live
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            f.write(chunk.decode(errors='replace'))
        code = process.wait()
    if code != 0:
        raise stage_failed(line, code, log)
    done.append(line)


def start_stage(command: list[str], line: str, log, stdout, env: Optional[dict] = None) -> subprocess.Popen:
    """Write the command line at the head of its output in the open ``log``, then start it in its own process."""
    log.write(f'$ {line}\n')
    log.flush()
    return subprocess.Popen([sys.executable, os.path.join(ROOT, command[0]), *command[1:]], stdout=stdout,
                            stderr=subprocess.STDOUT, env=env)


def stage_failed(line: str, code: int, log: str) -> UserError:
    return UserError(f'{line} stopped with exit code {code} (its output: {log}); run the same script again '
                     f'with the same flags to continue')


def threads_per_job(jobs: int) -> int:
    """The threads of each of ``jobs`` processes that share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // jobs)


def run_stages(stages: list[tuple[list, str]], done: list, jobs: int = 1,
               finished: Callable[[int], None] = lambda i: None) -> None:
    """Run the (command, log) stages as run_stage does, ``jobs`` at a time, calling ``finished(i)`` after stage i.
    With jobs > 1 each process gets cpu_count // jobs threads (which can move a figure's last decimal against
    one process on every core) and writes only to its log; a bar counts the stages. A failure, or an interrupt,
    stops the others, which keep what they saved: the same command continues them."""
    if jobs <= 1 or len(stages) <= 1:
        for i, (command, log) in enumerate(stages):
            run_stage(command, log, done)
            finished(i)
        return
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads_per_job(jobs))}
    waiting, running = list(enumerate(stages)), {}
    with progress(total=len(stages), desc=f'runs, {jobs} at a time', unit='run') as bar:
        try:
            while waiting or running:
                while waiting and len(running) < jobs:
                    i, (command, log) = waiting.pop(0)
                    line = shlex.join(['python', *command])
                    os.makedirs(os.path.dirname(log) or '.', exist_ok=True)
                    with writing(log):
                        f = open(log, 'a')
                        process = start_stage(command, line, f, f, env)
                    bar.write(f'$ {line}  (output: {log})')
                    running[process] = (i, line, log, f)
                for process in [p for p in running if p.poll() is not None]:
                    i, line, log, f = running.pop(process)
                    f.close()
                    if process.returncode != 0:
                        raise stage_failed(line, process.returncode, log)
                    done.append(line)
                    bar.update(1)
                    finished(i)
                time.sleep(0.5)
        finally:
            for process, (_, _, _, f) in running.items():
                process.terminate()  # train.py saves its last state on SIGTERM
                process.wait()
                f.close()


def run_finished(argv: list[str]) -> bool:
    """Whether train.py with ``argv`` has a finished run (its 'last' state says so)."""
    return saved_state(run_paths(parse_args(argv)).last) == 'finished'


def pretraining_finished(weights: str) -> bool:
    """Whether the pretraining that writes ``weights`` (pretrain.py --out) has finished: its 'last' state says so."""
    last = weights_paths(weights).last
    try:
        return os.path.isfile(last) and bool(read_file(last, 'resume state').get('finished'))
    except (UserError, AttributeError):
        return False


# the reference's meta-training rates for a pretrained encoder (train.py's defaults), on the demo's schedule
PRETRAINED_RATES = ['--lr_network', '0.0001', '--lr', '0.01']


def pretrained_encoder(save_dir: str, pretrain_extra: list, done: list) -> str:
    """The Conv-4 of pretrain.py --demo mixed in save_dir, pretrained once (continued when unfinished)."""
    weights = os.path.join(save_dir, 'pretrained-convnet-demo-mixed.pth')
    command = ['--demo', 'mixed', '--save_dir', save_dir, '--out', weights, *pretrain_extra]
    if not pretraining_finished(weights):
        run_stage(['pretrain.py', *command, '--resume'], os.path.join(save_dir, 'pretrain.log'), done)
    return weights


def variant_stage(base: str, flags: list) -> Optional[tuple[list, str]]:
    """What run_variant runs for ``flags``: (command, log), train.py (with --resume for an unfinished run; test.py
    for a finished run without figures); None when base.test.json exists."""
    if os.path.isfile(base + '.test.json'):
        return None
    state = saved_state(run_paths(parse_args(flags)).last)
    command = 'test.py' if state == 'finished' else 'train.py'
    # --resume only where this run has a state to continue: with runs at once, another seed's unfinished run
    # would make --resume refuse a run that has not started
    return [command, *flags, *(['--resume'] if state == 'unfinished' else []), '--json', base + '.test.json'], base + '.log'


def variant_figures(base: str, flags: list) -> dict:
    """The test's figures of a variant that has run, with GLoFA's strengths at each validation from its log."""
    with open(base + '.test.json') as f:
        figures = json.load(f)['settings'][0]
    with open(run_paths(parse_args(flags)).log) as f:  # GLoFA's strengths at each validation
        entries = [json.loads(line) for line in f if line.strip()]
    figures['validation_strengths'] = [
        f"episode {e['episode']}: {e['alpha_task']:.3f}, {e['alpha_cls']:.3f}" for e in entries if 'alpha_task' in e]
    return figures


def run_variant(base: str, flags: list, done: list) -> dict:
    """train.py with ``flags`` (test.py for a finished run without figures; nothing when base.test.json exists):
    the test's figures, with GLoFA's strengths at each validation from the run's log."""
    stage = variant_stage(base, flags)
    if stage is not None:
        run_stage(*stage, done)
    return variant_figures(base, flags)
