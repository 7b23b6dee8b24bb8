"""The benchmark script runs and reports both ways side by side (no timing is asserted)."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))

import benchmark  # noqa: E402


def test_benchmark_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    rows = benchmark.main(['--device', 'cpu', '--n_workers', '0', '--loader_episodes', '2', '--train_episodes', '1',
                           '--head_episodes', '8', '--full_episodes', '20', '--work_dir', str(tmp_path),
                           '--json', str(out)])
    (row,) = json.loads(out.read_text())
    assert row == json.loads(json.dumps(rows[0]))
    assert row['split_images'] == 80 and row['eval_episodes'] == 67  # 10000 * 80 / 12000 episodes
    assert row['eval_same_accuracies'] is True
    assert row['full_1shot_same_accuracies'] is True and row['full_5shot_same_accuracies'] is True
    assert row['full_episodes'] == 20 and 1 <= row['head_5shot_batch'] <= row['head_1shot_batch'] <= 8
    for key in ('eval_cached_s', 'eval_episodic_s', 'loader_eps_per_s_0_workers', 'train_model_only_s_per_ep',
                'train_with_loader_s_per_ep', 'train_channels_last_s_per_ep', 'head_1shot_one_ms',
                'head_5shot_batched_ms', 'full_1shot_one_s', 'full_5shot_batched_s'):
        assert row[key] > 0
    assert 'faster' in capsys.readouterr().out


def test_settings_benchmark_runs_and_compares_lines(capsys):
    import benchmark_settings
    figures = benchmark_settings.main(['--episodes', '4', '--n_workers', '0'])
    assert figures['b']['identical_lines'] is True
    assert figures['a']['auto_s'] > 0 and figures['a']['cached_s'] > 0
    out = capsys.readouterr().out
    assert '(a) 3 test episodes' in out and '(b) --K 1 5' in out


def test_format_benchmark_runs_and_reports_both_layouts(tmp_path, capsys):
    import benchmark_formats
    out = tmp_path / 'formats.json'
    figures = benchmark_formats.main(['--images', '40', '--reads', '10', '--workers', '1', '--contexts', 'fork',
                                      '--work_dir', str(tmp_path), '--json', str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(figures))
    assert all(v > 0 for v in figures['read_cost'].values())
    rows = {row['reader']: row for row in figures['memory']}
    assert set(rows) == {'memmap', 'naive np.load'}
    assert rows['memmap']['pickled_bytes'] < 5000 < rows['naive np.load']['pickled_bytes']
    assert rows['memmap']['workers_Pss'] > 0
    printed = capsys.readouterr().out
    assert 'JPEG folder' in printed and 'tiered memmap' in printed and 'ratio' in printed
