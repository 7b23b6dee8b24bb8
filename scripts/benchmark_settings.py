"""Evaluation costs of test.py's choices, two ways side by side in one process.

    python scripts/benchmark_settings.py --data_path DIR [--network resnet] [--episodes 2000]

(a) a small question: 3 test episodes with --eval_mode auto (episodic here: 3 episodes encode 240
    images) against --eval_mode cached (what test.py always did before: the whole split encoded);
(b) several settings: --K 1 5 in one command (the split encoded once, shared by both settings) against
    two commands, --K 1 and --K 5 (encoded twice); the accuracy lines must be identical.
Each way runs what test.py runs: the test split opened, the model built, then evaluation.run_episodes.
The model is a randomly initialised GLoFA of --network (the costs do not depend on the weights).
Without --data_path a small dataset in the real format is written to a temporary folder.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import runs  # noqa: E402
from arguments import parse_args  # noqa: E402
from dataloader import eval_transform, open_split  # noqa: E402
from demo import write_colour_dataset  # noqa: E402
from evaluation import Episodes, EvalOptions, SplitFeatures, choose_eval_mode, run_episodes  # noqa: E402
from utils import accuracy_line  # noqa: E402


def timed_test(args, settings: list[tuple[int, int]], n_episodes: int, eval_mode: str) -> tuple[float, list[str]]:
    """Seconds of one test.py command's work for these settings, and its accuracy lines."""
    start = time.perf_counter()
    dataset = open_split(runs.data_path(args), 'test', eval_transform())
    torch.manual_seed(0)
    model = runs.build_model(args, pretrained=False).eval()
    options = EvalOptions(torch.device('cpu'), args.n_workers)
    features = SplitFeatures(model.encoder, dataset, options)  # shared by the settings, as in test.py
    lines = []
    for n, k in settings:
        episodes = Episodes(n_episodes, n, k, args.Q, torch.Generator().manual_seed(args.seed))
        mode = choose_eval_mode(eval_mode, len(dataset), n_episodes, episodes.images_per_episode)
        results = run_episodes(model, dataset, episodes, mode, options, features, desc=f'{n}-way {k}-shot')
        lines.append(accuracy_line('test', results.accuracies, n, k))
    return time.perf_counter() - start, lines


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
        args = parse_args(['--data_path', data, '--network_name', opts.network, '--pretrained', 'none',
                           '--n_workers', str(opts.n_workers)])
        figures = {}
        if 'a' not in opts.skip:
            auto, _ = timed_test(args, [(5, 1)], 3, 'auto')
            cached, _ = timed_test(args, [(5, 1)], 3, 'cached')
            figures['a'] = {'auto_s': auto, 'cached_s': cached}
            print(f'(a) 3 test episodes: auto {auto:.1f} s, whole split cached {cached:.1f} s: '
                  f'{cached / auto:.1f}x faster')
        if 'b' not in opts.skip:
            together, lines = timed_test(args, [(5, 1), (5, 5)], opts.episodes, 'auto')
            one, line_1 = timed_test(args, [(5, 1)], opts.episodes, 'auto')
            five, line_5 = timed_test(args, [(5, 5)], opts.episodes, 'auto')
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
