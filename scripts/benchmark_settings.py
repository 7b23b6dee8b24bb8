"""Evaluation costs of test.py, two ways side by side in one process.

    python scripts/benchmark_settings.py --data_path DIR [--network resnet] [--episodes 2000]

(a) a small question: --n_testing_episodes 3 with --eval_mode auto (episodic here: 3 episodes encode
    240 images) against --eval_mode cached (what test.py always did before: the whole split encoded);
(b) several settings: one command with --K 1 5 against two commands, --K 1 and --K 5; the split is
    encoded once in the first, twice in the second, and the accuracy lines must be identical.
The checkpoint is a randomly initialised GLoFA of --network (the costs do not depend on the weights).
Without --data_path a small dataset in the real format is written to a temporary folder.
"""
import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import runs  # noqa: E402
import test as test_script  # noqa: E402
from arguments import parse_args  # noqa: E402
from demo import write_colour_dataset  # noqa: E402
from checkpoints import atomic_save, model_state_dict  # noqa: E402

LINE = re.compile(r'^test accuracy: .*$', re.M)


def timed_test(argv: list[str]) -> tuple[float, list[str]]:
    """Seconds of test.main(argv) and its accuracy lines (its output is kept off the screen)."""
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        test_script.main(argv)
    return time.perf_counter() - start, LINE.findall(out.getvalue())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data_path', default=None, help='dataset root (default: a small generated one)')
    p.add_argument('--network', default='convnet', choices=['convnet', 'resnet'], help='encoder')
    p.add_argument('--episodes', type=int, default=2000, help='test episodes of each setting in (b)')
    p.add_argument('--n_workers', type=int, default=2, help='loader workers')
    p.add_argument('--skip', default='', help="'a' or 'b' to leave that part out")
    opts = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = opts.data_path
        if data is None:
            data = write_colour_dataset(os.path.join(tmp, 'data'), classes_per_split=(5, 5, 5), images_per_class=20,
                                        size=(48, 48))
        flags = ['--data_path', data, '--network_name', opts.network, '--pretrained', 'none', '--device', 'cpu',
                 '--n_workers', str(opts.n_workers), '--model_path', os.path.join(tmp, 'model.model')]
        args = parse_args(flags)
        torch.manual_seed(0)
        model = runs.build_model(args, pretrained=False)
        atomic_save({'state_dict': model_state_dict(model), 'validating_accuracy': 0.0, 'epoch': 0,
                     'config': runs.run_identity(args)}, os.path.join(tmp, 'model.model'))
        figures = {}
        if 'a' not in opts.skip:
            auto, _ = timed_test(flags + ['--n_testing_episodes', '3'])
            cached, _ = timed_test(flags + ['--n_testing_episodes', '3', '--eval_mode', 'cached'])
            figures['a'] = {'auto_s': auto, 'cached_s': cached}
            print(f'(a) 3 test episodes: auto {auto:.1f} s, whole split cached {cached:.1f} s: '
                  f'{cached / auto:.1f}x faster')
        if 'b' not in opts.skip:
            episodes = ['--n_testing_episodes', str(opts.episodes)]
            together, lines = timed_test(flags + episodes + ['--K', '1', '5'])
            one, line_1 = timed_test(flags + episodes + ['--K', '1'])
            five, line_5 = timed_test(flags + episodes + ['--K', '5'])
            same = lines == line_1 + line_5
            figures['b'] = {'together_s': together, 'separate_s': one + five, 'identical_lines': same}
            print(f'(b) --K 1 5, {opts.episodes} episodes each: one command {together:.1f} s, two commands '
                  f'{one:.1f} + {five:.1f} = {one + five:.1f} s: {(one + five) / together:.2f}x; '
                  f'identical lines: {"yes" if same else "NO"}')
            for line in lines:
                print('   ', line)
    return figures


if __name__ == '__main__':
    main()
