"""scripts/dev/benchmark.py: every section runs, tiny, and reports both ways side by side in one table and one
JSON file (no timing is asserted: these machines are shared)."""
import json
import os
import platform

import pytest


import benchmark  # from scripts/ (pytest.ini puts it on the path)

TINY = ['--device', 'cpu', '--n_workers', '0', '--loader_episodes', '2', '--train_episodes', '1',
        '--head_episodes', '8', '--full_episodes', '20', '--episodes', '4', '--steps', '1', '--warmup', '0']


def test_every_quick_section_runs_into_one_table_and_json(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    rows = benchmark.main(['evaluation', 'head', 'loading', 'training', 'settings', *TINY,
                           '--work_dir', str(tmp_path), '--json', str(out)])
    saved = json.loads(out.read_text())['rows']
    assert [row['section'] for row in saved] == [row.section for row in rows]
    assert {row.section for row in rows} == {'evaluation', 'head', 'loading', 'training', 'settings'}
    for row in rows:
        assert row.a_value > 0 and (row.b_value is None or row.b_value > 0), row
        assert row.same is not False, row  # cached = episodic, batched = one at a time, lines alike
    (evaluation,) = [row for row in rows if row.section == 'evaluation']
    assert '67 episodes over 80 images' in evaluation.what and evaluation.same  # 10000 * 80 / 12000
    printed = capsys.readouterr().out
    assert sum(line.startswith('| ') for line in printed.splitlines()) == len(rows) + 1  # the header, then a row each


def test_the_cache_section_times_three_calls_with_the_same_accuracies(tmp_path, capsys):
    rows = benchmark.main(['cache', *TINY, '--cache_episodes', '20', '--work_dir', str(tmp_path)])
    assert len(rows) == 3 and all(row.same for row in rows[:2])
    assert rows[2].a_value > 0 and rows[2].b_value > 0  # the split's key by content and by sizes and times
    assert len(os.listdir(tmp_path / 'cache-cpu' / 'saves' / 'features')) == 2  # one array and its record


def test_an_unknown_section_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        benchmark.main(['evaluations'])
    assert stop.value.code == 2 and 'evaluations' in capsys.readouterr().err


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason="keep_freed_memory sets glibc's allocator")
def test_kept_freed_memory_changes_no_weight_and_spares_the_page_faults(capsys):
    """A Conv-4 step on 80 images (its first activations are 144 MB, above glibc's largest heap block): with
    glibc's default every step maps and faults its large blocks in again, with keep_freed_memory the heap
    serves them after the warm-up; the weights after the steps are bit for bit the same."""
    # the kept heap can still grow on a timed step now and then (up to about 70000 faults seen on one step,
    # against about 425000 with glibc's default): two timed steps after two warm-up ones, most faults spared
    seconds, faults = benchmark.main(['allocator', '--steps', '2', '--warmup', '2'])
    assert seconds.same and faults.same
    assert faults.a_value > 4 * faults.b_value
