"""Distinct runs never share files, and a run's files are never replaced silently."""
import dataclasses
import hashlib
import os

import pytest
import arguments
from base import console
from harness import checkpoints, finding, runs, stages as stage_runner
import train
from harness.demo import write_colour_dataset


def flags(data, save_dir, *extra):
    return ['--data_path', str(data), '--save_dir', str(save_dir), '--network_name', 'convnet', '--pretrained',
            'none', '--N', '2', '--K', '1', '--Q', '1', '--n_training_episodes', '2', '--episode_gap', '1',
            '--n_validating_episodes', '2', '--n_testing_episodes', '2', '--n_workers', '0', *extra]


def digests(paths: dict) -> dict:
    found = {}
    for key, path in dataclasses.asdict(paths).items():
        if os.path.isfile(path):
            with open(path, 'rb') as f:
                found[key] = hashlib.sha256(f.read()).hexdigest()
    return found


def test_two_seeds_keep_two_runs(tiny_dataset, tmp_path):
    a = train.main(flags(tiny_dataset, tmp_path, '--seed', '1'))
    b = train.main(flags(tiny_dataset, tmp_path, '--seed', '2'))
    assert a['paths'].best != b['paths'].best
    for result in (a, b):
        for path in result['paths'].files():
            assert os.path.isfile(path), path
    assert 'seed1' in os.path.basename(a['paths'].best) and 'seed2' in os.path.basename(b['paths'].best)
    assert len(finding.list_runs(str(tmp_path), '.model')) == 2


def test_finished_run_is_kept_unless_overwrite(tiny_dataset, tmp_path, capsys):
    first = train.main(flags(tiny_dataset, tmp_path))
    before = digests(first['paths'])
    assert set(before) == {'best', 'last', 'stat', 'log', 'identity'}
    capsys.readouterr()
    for extra in ([], ['--resume']):
        with pytest.raises(SystemExit) as exit_info:
            train.main(flags(tiny_dataset, tmp_path, *extra))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert first['paths'].best in err
        assert '--overwrite' in err and 'test.py' in err
        assert digests(first['paths']) == before  # byte-identical
    # --overwrite replaces them: the same run again, a new log of its own
    with open(first['paths'].log, 'a') as f:
        f.write('{"episode": 99}\n')  # a mark that only the old log carries
    again = train.main(flags(tiny_dataset, tmp_path, '--overwrite'))
    assert 'removed the 4 files of the earlier run' in capsys.readouterr().out  # the identity is rewritten
    with open(again['paths'].log) as f:
        assert '"episode": 99' not in f.read()
    after = digests(again['paths'])
    assert after['best'] == before['best']  # deterministic: the same best checkpoint again


def test_other_data_of_the_same_name_is_another_run_and_a_moved_dataset_keeps_its_run(tmp_path, capsys):
    import shutil
    import test as test_script
    a = write_colour_dataset(tmp_path / 'a' / 'data')
    b = write_colour_dataset(tmp_path / 'b' / 'data', seed=1)  # the same folder name, other images
    save_dir = tmp_path / 'saves'
    first = train.main(flags(a, save_dir))
    second = train.main(flags(b, save_dir))  # no refusal: another run
    assert first['paths'].best != second['paths'].best
    assert os.path.isfile(first['paths'].best) and os.path.isfile(second['paths'].best)
    moved = shutil.move(str(tmp_path / 'a'), str(tmp_path / 'elsewhere'))
    capsys.readouterr()
    results = test_script.main(flags(os.path.join(moved, 'data'), save_dir))  # finds the run trained before the move
    assert f'loaded {first["paths"].best}' in capsys.readouterr().out
    assert results[(2, 1)].accuracies.tolist() == first['test_accuracies'].tolist()


def test_identity_file_names_the_run(tiny_dataset, tmp_path):
    import json
    result = train.main(flags(tiny_dataset, tmp_path, '--seed', '7', '--json', str(tmp_path / 'test.json')))
    with open(result['paths'].identity) as f:
        identity = json.load(f)
    with open(tmp_path / 'test.json') as f:
        (figures,) = json.load(f)['settings']  # train.py --json: the final test's figures
    assert (figures['N'], figures['K'], figures['episodes']) == (2, 1, 2)
    assert figures['accuracy'] == pytest.approx(100 * result['test_accuracies'].mean())
    assert identity['seed'] == 7 and identity['data'] == [runs.root_digest(str(tiny_dataset))]
    assert identity['run'] == os.path.basename(result['paths'].best)[:-len('.model')]


# ------------------------------------------------------------------ stage_runner.run_stages: stages several at a time
WAIT_FOR = '''import os, sys, time
mine, theirs = sys.argv[1], sys.argv[2]
with open(mine, 'w') as f:
    f.write(f"{os.getpid()} {os.environ.get('OMP_NUM_THREADS', '')}")
deadline = time.time() + 60
while not os.path.exists(theirs):
    if time.time() > deadline:
        sys.exit(5)
    time.sleep(0.05)
print('saw', theirs)
'''


def script(tmp_path, name: str, text: str) -> str:
    path = tmp_path / f'{name}.py'
    path.write_text(text)
    return str(path)


def test_stages_run_at_once_each_on_its_share_of_the_cores(tmp_path):
    """Each stage ends only once it has seen the other's file, so they finish only if they run at the same time."""
    wait = script(tmp_path, 'wait', WAIT_FOR)
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    stages = [([wait, a, b], str(tmp_path / 'a.log')), ([wait, b, a], str(tmp_path / 'b.log'))]
    done, finished = [], []
    stage_runner.run_stages(stages, done, jobs=2, finished=finished.append)
    assert sorted(finished) == [0, 1] and len(done) == 2
    for mine, log in ((a, 'a.log'), (b, 'b.log')):
        with open(mine) as f:
            assert f.read().split()[1] == str(max(1, (os.cpu_count() or 1) // 2))
        text = (tmp_path / log).read_text()
        assert text.startswith('$ python ') and 'saw' in text


def test_a_failed_stage_stops_the_others_and_names_its_log(tmp_path):
    wait = script(tmp_path, 'wait', WAIT_FOR)
    fail = script(tmp_path, 'fail', 'import os, sys, time\nwhile not os.path.exists(sys.argv[1]):\n'
                                    '    time.sleep(0.05)\nsys.exit(3)\n')  # once the waiting stage has started
    started, never, third = (str(tmp_path / n) for n in ('started', 'never', 'third'))
    stages = [([wait, started, never], str(tmp_path / 'wait.log')), ([fail, started], str(tmp_path / 'fail.log')),
              ([wait, third, never], str(tmp_path / 'third.log'))]
    done = []
    with pytest.raises(console.UserError) as error:
        stage_runner.run_stages(stages, done, jobs=2)
    assert str(tmp_path / 'fail.log') in str(error.value) and 'code 3' in str(error.value)
    assert done == [] and not os.path.exists(third)  # the third stage never started
    with open(started) as f:  # the waiting stage was stopped, not left running
        pid = int(f.read().split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_one_job_runs_the_stages_one_after_another(tmp_path):
    """jobs=1: the second stage starts after the first has ended (it fails if the first has not)."""
    first = script(tmp_path, 'first', 'import sys, time\ntime.sleep(0.5)\nopen(sys.argv[1], "w").close()\n')
    second = script(tmp_path, 'second', 'import os, sys\nsys.exit(0 if os.path.exists(sys.argv[1]) else 4)\n')
    ended = str(tmp_path / 'ended')
    done, finished = [], []
    stage_runner.run_stages([([first, ended], str(tmp_path / 'first.log')), ([second, ended], str(tmp_path / 'second.log'))],
                    done, jobs=1, finished=finished.append)
    assert finished == [0, 1] and len(done) == 2


def test_a_variant_resumes_only_its_own_unfinished_run(tiny_dataset, tmp_path):
    """With runs at once, another seed's unfinished run must not make a new run's command carry --resume."""
    base = str(tmp_path / 'variant')
    fresh = flags(tiny_dataset, tmp_path, '--seed', '1')
    command, log = stage_runner.variant_stage(base, fresh)
    assert command[0] == 'train.py' and '--resume' not in command and log == base + '.log'
    train.main(fresh)
    assert stage_runner.variant_stage(base, fresh)[0][0] == 'test.py'  # finished, without figures: only its test
    paths = runs.run_paths(arguments.parse_args(fresh))
    state = checkpoints.read_file(paths.last, 'resume state')
    checkpoints.atomic_save({**state, 'finished': False}, paths.last)  # as a run stopped part-way leaves it
    command = stage_runner.variant_stage(base, fresh)[0]
    assert command[0] == 'train.py' and '--resume' in command
    (tmp_path / 'variant.test.json').write_text('{}')
    assert stage_runner.variant_stage(base, fresh) is None


def test_test_py_reads_the_data_for_the_run_identity_once(tiny_dataset, tmp_path, monkeypatch):
    """A meta-trained ProtoNet run found by its flags: the data's digest (a scan of images/) is made once."""
    import test
    run = flags(tiny_dataset, tmp_path, '--model_name', 'protonet')
    train.main(run)
    calls = []
    digest = runs.root_digest
    monkeypatch.setattr(runs, 'root_digest', lambda root: calls.append(root) or digest(root))
    test.main(run)
    assert calls == [str(tiny_dataset)]
