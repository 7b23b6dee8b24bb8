"""Speed of evaluation, loading and training, two ways side by side in one process.

    python scripts/benchmark.py [--network convnet|resnet] [--json bench.json]

(a) evaluation, cached vs episodic, at mini-ImageNet's test proportions: 10000 5-way 1-shot
    episodes of 80 images over a 12000-image split encode each image 66.7 times (83.3 times for
    5-shot); the split and the episode count are shrunk together so that the proportion stays;
(b) loader episodes per second with 0 and with --n_workers workers;
(c) seconds per training episode, the model alone (one episode kept in memory) and with the loader;
(d) the same on CUDA when present;
(e) training with --channels_last (and --amp on CUDA), the model alone;
(f) the head on cached 640-d embeddings (set functions, masks, prototypes, logits), 5-way 1-shot and
    5-shot: one episode at a time against --head_batch episodes at once, and a whole cached test of
    --full_episodes episodes over a 12000-image split (encoding excluded) with --episode_batch 1 against
    the batch chosen by memory; same accuracies checked.
Data is generated in the real on-disk format under --work_dir.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import runs  # noqa: E402
from arguments import default_workers, parse_args  # noqa: E402
from demo import write_colour_dataset  # noqa: E402
from dataloader import FewShotDataset, LabelledSplit, eval_transform, generate_data_loader  # noqa: E402
from evaluation import Episodes, EvalOptions, SplitFeatures, episode_batch_size, run_episodes  # noqa: E402
from models.glofa import GLoFA  # noqa: E402
from utils import autocast  # noqa: E402

# mini-ImageNet's test split and the reference protocol
FULL_IMAGES, FULL_EPISODES = 12000, 10000


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def bench_device(device: torch.device, opts, root: str) -> dict:
    N, K, Q = 5, opts.K, 15
    flags = ['--data_path', root, '--network_name', opts.network, '--pretrained', 'none', '--N', str(N),
             '--K', str(K), '--Q', str(Q), '--n_workers', str(opts.n_workers)]
    args = parse_args(flags)
    torch.manual_seed(0)
    model = runs.place_model(runs.build_model(args, pretrained=False), args, device)
    test_set = FewShotDataset(root, 'test', eval_transform())
    images_per_episode = N * (K + Q)
    n_episodes = round(len(test_set) * FULL_EPISODES / FULL_IMAGES)  # same encodes per image as the full test
    n_episodes = opts.eval_episodes or n_episodes
    row = {'at_test_proportions': opts.eval_episodes is None, 'device': str(device), 'network': opts.network,
           'shot': K, 'split_images': len(test_set),
           'eval_episodes': n_episodes, 'encodes_per_image_episodic': n_episodes * images_per_episode / len(test_set)}

    # (a) evaluation, cached vs episodic, same episodes (after one warm-up episode of each)
    for mode in ('cached', 'episodic'):
        run_episodes(model, test_set, Episodes(1, N, K, Q), mode, EvalOptions(device), desc='warm-up')
    results = {}
    for mode in ('cached', 'episodic'):
        episodes = Episodes(n_episodes, N, K, Q, torch.Generator().manual_seed(1))
        seconds, out = timed(lambda: run_episodes(model, test_set, episodes, mode, EvalOptions(device, opts.n_workers),
                                                  desc=f'eval {mode}'), device)
        results[mode] = (seconds, out.accuracies)
    row['eval_cached_s'], row['eval_episodic_s'] = results['cached'][0], results['episodic'][0]
    row['eval_speedup'] = row['eval_episodic_s'] / row['eval_cached_s']
    row['eval_episodic_s_per_ep'] = row['eval_episodic_s'] / n_episodes
    row['eval_same_accuracies'] = bool(np.array_equal(results['cached'][1], results['episodic'][1]))
    row['full_test_cached_s_estimate'] = row['eval_cached_s'] * FULL_IMAGES / len(test_set)

    # (b) loader episodes per second, 0 vs n workers
    for workers in (0, opts.n_workers):
        loader = generate_data_loader(root, 'train', opts.loader_episodes, N, K + Q, n_workers=workers, seed=0,
                                      pin_memory=device.type == 'cuda')
        iterator = iter(loader)
        next(iterator)  # worker start-up is not counted
        seconds, count = timed(lambda: sum(1 for _ in iterator), device)
        row[f'loader_eps_per_s_{workers}_workers'] = count / seconds
        del iterator, loader

    # (c) seconds per training episode: model alone vs with the loader
    optimizer = runs.build_optimizer(args, model)
    targets = torch.arange(N * Q, device=device) % N
    loader = generate_data_loader(root, 'train', opts.train_episodes + 1, N, K + Q, n_workers=opts.n_workers,
                                  seed=0, pin_memory=device.type == 'cuda')

    def step(images, amp=False):
        with autocast(device, amp):
            logits = model(images.to(device, non_blocking=True), N, K)
        loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.train()
    iterator = iter(loader)
    kept, _ = next(iterator)
    step(kept)  # warm-up
    seconds, _ = timed(lambda: [step(kept) for _ in range(opts.train_episodes)], device)
    row['train_model_only_s_per_ep'] = seconds / opts.train_episodes
    seconds, _ = timed(lambda: [step(images) for images, _ in iterator], device)
    row['train_with_loader_s_per_ep'] = seconds / opts.train_episodes
    row['loader_bound'] = row['train_with_loader_s_per_ep'] > 1.2 * row['train_model_only_s_per_ep']

    # (e) the optional speed-ups, model alone: --channels_last anywhere, --amp on CUDA
    model.encoder.to(memory_format=torch.channels_last)
    kept_cl = kept.contiguous(memory_format=torch.channels_last)
    step(kept_cl)
    seconds, _ = timed(lambda: [step(kept_cl) for _ in range(opts.train_episodes)], device)
    row['train_channels_last_s_per_ep'] = seconds / opts.train_episodes
    model.encoder.to(memory_format=torch.contiguous_format)
    if device.type == 'cuda':
        step(kept, amp=True)
        seconds, _ = timed(lambda: [step(kept, amp=True) for _ in range(opts.train_episodes)], device)
        row['train_amp_s_per_ep'] = seconds / opts.train_episodes
    return row


def bench_head(device: torch.device, opts) -> dict:
    """(f): GLoFA's head on 640-d embeddings, one episode at a time against many at once."""
    row, d = {}, 640
    labels = torch.arange(20).repeat_interleave(FULL_IMAGES // 20)  # mini-ImageNet's test split: 20 classes of 600
    split = LabelledSplit(labels.tolist(), [f'n{c:08d}' for c in range(20)])
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(20, d, generator=g).relu()
    embeddings = (centres[labels] + 2.5 * torch.randn(len(split), d, generator=g)).relu().to(device)
    torch.manual_seed(0)
    model = GLoFA(torch.nn.Identity(), d, h_bias_init=1.0).to(device).eval()  # strengths above 0: the masks act
    for K in (1, 5):
        N, Q = 5, 15
        episodes = Episodes(opts.head_episodes, N, K, Q)
        indices = torch.randint(len(split), (opts.head_episodes, N * (K + Q)), generator=g).to(device)
        with torch.no_grad():
            model.episode(embeddings[indices[0]], N, K)  # warm-up
            alone, _ = timed(lambda: [model.episode(embeddings[i], N, K) for i in indices], device)
            batch = opts.head_batch or episode_batch_size(EvalOptions(device), episodes, d)
            together, _ = timed(lambda: [model.episode(embeddings[indices[s:s + batch]], N, K)
                                         for s in range(0, len(indices), batch)], device)
        row[f'head_{K}shot_one_ms'] = 1000 * alone / opts.head_episodes
        row[f'head_{K}shot_batched_ms'] = 1000 * together / opts.head_episodes
        row[f'head_{K}shot_batch'] = batch
        row[f'head_{K}shot_speedup'] = alone / together

        def full_test(episode_batch: int):
            # the embeddings are given: the test's head work alone
            return run_episodes(model, split, Episodes(opts.full_episodes, N, K, Q, torch.Generator().manual_seed(1)),
                                'cached', EvalOptions(device, episode_batch=episode_batch),
                                SplitFeatures.given(embeddings), desc=f'{opts.full_episodes} episodes, batch {episode_batch or "auto"}')

        one, one_results = timed(lambda: full_test(1), device)
        auto, auto_results = timed(lambda: full_test(0), device)
        row[f'full_{K}shot_one_s'], row[f'full_{K}shot_batched_s'], row[f'full_{K}shot_speedup'] = one, auto, one / auto
        row[f'full_{K}shot_same_accuracies'] = bool(np.array_equal(one_results.accuracies, auto_results.accuracies))
    row['full_episodes'] = opts.full_episodes
    return row


def print_table(rows: list[dict]) -> None:
    for row in rows:
        print(f"\n== {row['device']}, {row['network']}, 5-way {row['shot']}-shot ==")
        at = "at mini-ImageNet's test proportions" if row['at_test_proportions'] else 'NOT at test proportions'
        print(f"(a) evaluation {at} ({row['eval_episodes']} episodes over "
              f"{row['split_images']} images, {row['encodes_per_image_episodic']:.1f} encodes per image episodic)")
        print(f"    episodic {row['eval_episodic_s']:8.2f} s | cached {row['eval_cached_s']:8.2f} s | "
              f"cached is {row['eval_speedup']:.1f}x faster | same accuracies: {row['eval_same_accuracies']}")
        print(f"    episodic: {row['eval_episodic_s_per_ep']:.3f} s per episode | full 10000-episode test, "
              f"cached, estimated: {row['full_test_cached_s_estimate']:.0f} s")
        workers = [k for k in row if k.startswith('loader_eps_per_s_')]
        print('(b) loader, training episodes per second: ' +
              ' | '.join(f"{k.split('_')[4]} workers {row[k]:.2f}" for k in workers))
        print(f"(c) training, seconds per episode: model alone {row['train_model_only_s_per_ep']:.3f} | "
              f"with loader {row['train_with_loader_s_per_ep']:.3f} | loader-bound: {row['loader_bound']}")
        extra = f" | --amp {row['train_amp_s_per_ep']:.3f}" if 'train_amp_s_per_ep' in row else ''
        print(f"(e) training, model alone, seconds per episode: --channels_last "
              f"{row['train_channels_last_s_per_ep']:.3f}{extra}")
        for K in (1, 5):
            print(f"(f) head on 640-d embeddings, 5-way {K}-shot: one at a time {row[f'head_{K}shot_one_ms']:.3f} ms | "
                  f"{row[f'head_{K}shot_batch']} at once {row[f'head_{K}shot_batched_ms']:.3f} ms per episode | "
                  f"{row[f'head_{K}shot_speedup']:.1f}x")
            print(f"    cached test of {row['full_episodes']} episodes, encoding excluded: --episode_batch 1 "
                  f"{row[f'full_{K}shot_one_s']:.2f} s | auto {row[f'full_{K}shot_batched_s']:.2f} s | "
                  f"{row[f'full_{K}shot_speedup']:.1f}x | same accuracies: {row[f'full_{K}shot_same_accuracies']}")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--network', default='convnet', choices=['convnet', 'resnet'], help='encoder to time')
    p.add_argument('--K', type=int, default=1, help='shots of the 5-way episodes (15 queries per class)')
    p.add_argument('--classes', type=int, default=5, help='classes of the shrunk split (5-way needs 5)')
    p.add_argument('--images_per_class', type=int, default=None,
                   help='images per class (default: K + 15, the fewest an episode needs)')
    p.add_argument('--image_size', type=int, default=84, help='side of the generated JPEGs')
    p.add_argument('--n_workers', type=int, default=default_workers(), help='workers for the n-worker figures')
    p.add_argument('--loader_episodes', type=int, default=20, help='episodes timed for the loader')
    p.add_argument('--train_episodes', type=int, default=5, help='episodes timed for training')
    p.add_argument('--eval_episodes', type=int, default=None,
                   help="episodes timed in (a) (default: mini-ImageNet's proportion; another count gives "
                        "per-episode times, not a fair ratio)")
    p.add_argument('--head_episodes', type=int, default=1000, help='episodes timed for the head in (f)')
    p.add_argument('--head_batch', type=int, default=0, help='episodes at once in (f) (default: chosen by memory)')
    p.add_argument('--full_episodes', type=int, default=10000, help='episodes of the whole cached test in (f)')
    p.add_argument('--device', default='all', choices=['all', 'cpu', 'cuda'], help='where to run')
    p.add_argument('--work_dir', default=None, help='where to write the data (default: a temporary folder)')
    p.add_argument('--json', default=None, help='also write the figures to this JSON file')
    opts = p.parse_args(argv)
    opts.images_per_class = opts.images_per_class or opts.K + 15
    torch.backends.cudnn.benchmark = True
    devices = [torch.device('cpu')] if opts.device != 'cuda' else []
    if opts.device != 'cpu' and torch.cuda.is_available():
        devices.append(torch.device('cuda'))
    with tempfile.TemporaryDirectory() as tmp:
        c = opts.classes
        root = write_colour_dataset(os.path.join(opts.work_dir or tmp, 'bench_data'), (c, c, c), opts.images_per_class,
                                    (opts.image_size, opts.image_size))
        rows = [{**bench_device(device, opts, root), **bench_head(device, opts)} for device in devices]
    print_table(rows)
    if opts.json:
        with open(opts.json, 'w') as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == '__main__':
    main()
