"""Speed: two ways of the same work, timed side by side in one process, in one table.

    python scripts/dev/benchmark.py [SECTION ...] [--network convnet|resnet] [--device all|cpu|cuda] [--json PATH]

Sections (none named: the quick set, evaluation loading training settings):
  evaluation  cached vs episodic evaluation at mini-ImageNet's test proportions (10000 episodes of N*(K+15)
              images over 12000 images: the split and the episode count are shrunk together)
  head        the head on cached 640-d embeddings (GLoFA, strengths above 0): one episode at a time vs
              many at once, and a whole cached test of --full_episodes with --episode_batch 1 vs auto
  loading     training episodes per second from the loader, 0 workers vs --n_workers
  training    seconds per training episode: with the loader vs the model alone (one episode in memory);
              plain vs --channels_last, and plain vs --amp on CUDA
  allocator   seconds and page faults per training step (one episode's images in memory, the CPU), with glibc's
              default allocator vs harness.device.keep_freed_memory as the entry points set it (the weights bit for bit)
  settings    test.py's choices: 3 episodes auto vs the whole split cached; --K 1 5 in one command vs
              two commands (the accuracy lines identical)
  cache       test.py of one checkpoint on --data_path's test split (default a small generated one), three
              processes: the first call (encodes, stores the embeddings) vs a second (reuses them), and
              --feature_cache off vs the second (the accuracies identical)
Every row is | section | what | A | B | A / B | same results |; --json writes the rows. Data is written
in the real on-disk formats under --work_dir (a temporary folder by default). Speed is never asserted.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from harness import checkpoints  # noqa: E402
from arguments import DEFAULT_WORKERS, parse_args  # noqa: E402
from dataloader import FewShotDataset, eval_transform, generate_data_loader, open_split, train_transform  # noqa: E402
from harness.demo import write_colour_dataset  # noqa: E402
from harness.embeddings import content_digest, episode_batch_size  # noqa: E402
from harness.device import EvalOptions  # noqa: E402
from harness.embeddings import SplitFeatures  # noqa: E402
from harness.evaluation import Episodes, accuracy_line, choose_eval_mode, run_episodes  # noqa: E402
from models.classifier import EncoderClassifier  # noqa: E402
from dataloader import query_targets  # noqa: E402
from models.glofa import GLoFA  # noqa: E402
from networks import build_encoder  # noqa: E402
from harness.checkpoints import atomic_save, model_state_dict  # noqa: E402
from base.console import exits_cleanly  # noqa: E402
from harness.device import autocast, keep_freed_memory, place_model  # noqa: E402
from harness.outputs import check_output, write_json  # noqa: E402


class Labels:
    """A split known by its labels alone (all the episode sampler reads), for embeddings made in memory."""

    def __init__(self, labels, class_names):
        self.labels, self.class_names = list(labels), list(class_names)
        self.split, self.location, self.source_names = 'test', 'embeddings in memory', ['memory']

    def __len__(self) -> int:
        return len(self.labels)


def given(embeddings: torch.Tensor) -> SplitFeatures:
    """Embeddings computed elsewhere, (n_images, d) in the split's order, as the cached way takes them."""
    features = SplitFeatures(torch.nn.Identity(), None, None)
    features.features = embeddings
    return features


def backward_and_step(loss, optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

FULL_IMAGES, FULL_EPISODES = 12000, 10000  # mini-ImageNet's test split and the reference protocol
MIB, GIB = 2 ** 20, 2 ** 30
QUICK = ['evaluation', 'loading', 'training', 'settings']


@dataclass
class Row:
    """One measurement: way A against way B (B absent for a single figure), and whether they agreed."""
    section: str
    what: str
    a: str
    a_value: float
    b: str = ''
    b_value: Optional[float] = None
    unit: str = 's'
    same: Optional[bool] = None

    def cells(self) -> list[str]:
        ratio = f'{self.a_value / self.b_value:.2f}x' if self.b_value else ''
        same = '' if self.same is None else ('yes' if self.same else 'NO')
        b = f'{self.b} {self.b_value:.4g} {self.unit}' if self.b_value is not None else ''
        return [self.section, self.what, f'{self.a} {self.a_value:.4g} {self.unit}', b, ratio, same]


def print_table(rows: list[Row]) -> None:
    print('| section | what | A | B | A / B | same results |\n|---|---|---|---|---|---|')
    for row in rows:
        print('| ' + ' | '.join(row.cells()) + ' |', flush=True)


def timed(fn, device: torch.device = torch.device('cpu')):
    """(seconds, fn()) with CUDA synchronised around it."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def shrunk_split(opts, work: str) -> str:
    """A split of --classes classes of K + 15 images: episodes at mini-ImageNet's test proportions."""
    c = opts.classes
    return write_colour_dataset(os.path.join(work, f'split-{opts.K}shot'), (c, c, c), opts.K + 15, (84, 84))


def model_and_args(opts, root: str, device: torch.device):
    args = parse_args(['--data_path', root, '--network_name', opts.network, '--pretrained', 'none', '--N', '5',
                       '--K', str(opts.K), '--n_workers', str(opts.n_workers)])
    torch.manual_seed(0)
    return place_model(checkpoints.build_model(args, pretrained=False), args, device), args


# ------------------------------------------------------------------ evaluation, head, loading, training
def evaluation(opts, device: torch.device, work: str) -> list[Row]:
    root = shrunk_split(opts, work)
    model, _ = model_and_args(opts, root, device)
    test_set = FewShotDataset(root, 'test', eval_transform())
    n = opts.eval_episodes or round(len(test_set) * FULL_EPISODES / FULL_IMAGES)
    for mode in ('cached', 'episodic'):  # warm-up
        run_episodes(model, test_set, Episodes(1, 5, opts.K, 15), mode, EvalOptions(device), desc='warm-up')
    seconds, accuracies = {}, {}
    for mode in ('episodic', 'cached'):
        episodes = Episodes(n, 5, opts.K, 15, torch.Generator().manual_seed(1))
        seconds[mode], out = timed(lambda: run_episodes(model, test_set, episodes, mode,
                                                        EvalOptions(device, opts.n_workers), desc=mode), device)
        accuracies[mode] = out.accuracies
    at = 'at test proportions' if opts.eval_episodes is None else 'NOT at test proportions'
    return [Row('evaluation', f'{device.type} {opts.network} 5-way {opts.K}-shot, {n} episodes over {len(test_set)} '
                f'images ({at}; a full cached test ~{seconds["cached"] * FULL_IMAGES / len(test_set):.0f} s)',
                'episodic', seconds['episodic'], 'cached', seconds['cached'],
                same=bool(np.array_equal(accuracies['episodic'], accuracies['cached'])))]


def head(opts, device: torch.device, work: str) -> list[Row]:
    d, rows = 640, []
    labels = torch.arange(20).repeat_interleave(FULL_IMAGES // 20)  # mini-ImageNet's test split: 20 classes of 600
    split = Labels(labels.tolist(), [f'n{c:08d}' for c in range(20)])
    g = torch.Generator().manual_seed(0)
    embeddings = (torch.randn(20, d, generator=g).relu()[labels] + 2.5 * torch.randn(len(split), d, generator=g)).relu()
    embeddings = embeddings.to(device)
    torch.manual_seed(0)
    model = GLoFA(torch.nn.Identity(), d, h_bias_init=1.0).to(device).eval()  # strengths above 0: the masks act
    for k in (1, 5):
        indices = torch.randint(len(split), (opts.head_episodes, 5 * (k + 15)), generator=g).to(device)
        batch = opts.head_batch or episode_batch_size(EvalOptions(device), Episodes(opts.head_episodes, 5, k, 15), d)
        with torch.no_grad():
            model.episode(embeddings[indices[0]], 5, k)  # warm-up
            alone, _ = timed(lambda: [model.episode(embeddings[i], 5, k) for i in indices], device)
            together, _ = timed(lambda: [model.episode(embeddings[indices[s:s + batch]], 5, k)
                                         for s in range(0, len(indices), batch)], device)
        rows.append(Row('head', f'{device.type} 5-way {k}-shot, 640-d, per episode', 'one at a time',
                        1000 * alone / opts.head_episodes, f'{batch} at once', 1000 * together / opts.head_episodes, 'ms'))
        results = {}
        for label, episode_batch in (('--episode_batch 1', 1), ('auto', 0)):  # the test's head work, encoding given
            episodes = Episodes(opts.full_episodes, 5, k, 15, torch.Generator().manual_seed(1))
            results[label] = timed(lambda: run_episodes(model, split, episodes, 'cached', EvalOptions(
                device, episode_batch=episode_batch), given(embeddings), desc=label), device)
        (one, a), (auto, b) = results.values()
        rows.append(Row('head', f'{device.type} 5-way {k}-shot, a cached test of {opts.full_episodes} episodes, '
                        f'encoding excluded', '--episode_batch 1', one, 'auto', auto,
                        same=bool(np.array_equal(a.accuracies, b.accuracies))))
    return rows


def loading(opts, device: torch.device, work: str) -> list[Row]:
    root, speed = shrunk_split(opts, work), {}
    for workers in (0, opts.n_workers):
        loader = generate_data_loader(open_split(root, 'train', train_transform()), opts.loader_episodes, 5, opts.K + 15,
                                      n_workers=workers, pin_memory=device.type == 'cuda')
        batches = iter(loader)
        next(batches)  # workers' start-up is not counted
        seconds, count = timed(lambda: sum(1 for _ in batches))
        speed[workers] = count / seconds
    return [Row('loading', f'training episodes per second, 5-way {opts.K}-shot, 84 x 84 JPEGs', '0 workers', speed[0],
                f'{opts.n_workers} workers', speed[opts.n_workers], 'ep/s')]


def training(opts, device: torch.device, work: str) -> list[Row]:
    root = shrunk_split(opts, work)
    model, args = model_and_args(opts, root, device)
    optimizer = checkpoints.build_optimizer(args, model)
    targets = query_targets(5, 15, device)
    loader = generate_data_loader(open_split(root, 'train', train_transform()), opts.train_episodes + 1, 5, opts.K + 15,
                                  n_workers=opts.n_workers, pin_memory=device.type == 'cuda')

    def step(images, amp=False):
        with autocast(device, amp):
            logits = model.episode(model.encode(images.to(device, non_blocking=True)), 5, opts.K)[0]
        backward_and_step(torch.nn.functional.cross_entropy(logits.float(), targets), optimizer)

    def per_episode(images, amp=False) -> float:
        step(images, amp)  # warm-up
        return timed(lambda: [step(images, amp) for _ in range(opts.train_episodes)], device)[0] / opts.train_episodes

    model.train()
    batches = iter(loader)
    kept, _ = next(batches)
    alone = per_episode(kept)
    with_loader = timed(lambda: [step(images) for images, _ in batches], device)[0] / opts.train_episodes
    what = f'{device.type} {opts.network} 5-way {opts.K}-shot, seconds per training episode'
    rows = [Row('training', what, f'with the loader ({opts.n_workers} workers)', with_loader, 'model alone', alone)]
    model.encoder.to(memory_format=torch.channels_last)
    rows.append(Row('training', what + ', model alone', 'plain', alone, '--channels_last',
                    per_episode(kept.contiguous(memory_format=torch.channels_last))))
    model.encoder.to(memory_format=torch.contiguous_format)
    if device.type == 'cuda':
        rows.append(Row('training', what + ', model alone', 'plain', alone, '--amp', per_episode(kept, amp=True)))
    return rows


# ------------------------------------------------------------------ allocator: glibc's default vs kept freed memory
def allocator_steps(network: str, K: int, steps: int, warmup: int, kept: bool) -> dict:
    """In a fresh process: training steps of the encoder and a classifier on one episode's images in memory, with
    the C allocator as a process starts or as the entry points set it (``kept``: harness.device.keep_freed_memory);
    seconds and page faults per step after the warm-up, and a digest of the weights."""
    import resource  # Unix only
    if kept:
        keep_freed_memory()
    torch.manual_seed(0)
    model = EncoderClassifier(build_encoder(network), 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(5 * (K + 15), 3, 84, 84)
    labels = torch.randint(64, (len(images),))

    def step() -> None:
        backward_and_step(torch.nn.functional.cross_entropy(model(images), labels), optimizer)
    for _ in range(warmup):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds = timed(lambda: [step() for _ in range(steps)])[0] / steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    digest = hashlib.sha256(b''.join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    return {'s_per_step': seconds, 'faults_per_step': faults, 'digest': digest}


def allocator(opts, device: torch.device, work: str) -> list[Row]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    figures = {}
    for mode in ('default', 'kept'):  # each in a process of its own, started afresh (spawn), its allocator untouched
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as pool:
            figures[mode] = pool.submit(allocator_steps, opts.network, opts.K, opts.steps, opts.warmup,
                                        mode == 'kept').result()
    default, kept = figures['default'], figures['kept']
    what = f'cpu {opts.network}, a training step of {5 * (opts.K + 15)} images in memory'
    same = default['digest'] == kept['digest']  # bit for bit the same weights
    return [Row('allocator', what + ', seconds', "glibc's default", default['s_per_step'], 'keep_freed_memory',
                kept['s_per_step'], same=same),
            Row('allocator', what + ', minor page faults', "glibc's default", default['faults_per_step'],
                'keep_freed_memory', kept['faults_per_step'], unit='faults', same=same)]


# ------------------------------------------------------------------ test.py's choices
def timed_test(args, settings: list[tuple[int, int]], n_episodes: int, eval_mode: str) -> tuple[float, list[str]]:
    """Seconds of one test.py command's work for these settings (split opened, model built, episodes), and
    its accuracy lines."""
    start, lines = time.perf_counter(), []
    dataset = open_split(args.data_path, 'test', eval_transform())
    torch.manual_seed(0)
    model = checkpoints.build_model(args, pretrained=False).eval()
    options = EvalOptions(torch.device('cpu'), args.n_workers)
    features = SplitFeatures(model.encoder, dataset, options)  # shared by the settings, as in test.py
    for n, k in settings:
        episodes = Episodes(n_episodes, n, k, args.Q, torch.Generator().manual_seed(args.seed))
        mode = choose_eval_mode(eval_mode, len(dataset), n_episodes, episodes.images_per_episode)
        results = run_episodes(model, dataset, episodes, mode, options, features, desc=f'{n}-way {k}-shot')
        lines.append(accuracy_line('test', results.accuracies, n, k))
    return time.perf_counter() - start, lines


def settings(opts, device: torch.device, work: str) -> list[Row]:
    data = opts.data_path or write_colour_dataset(os.path.join(work, 'settings'), (5, 5, 5), 20, (48, 48))
    args = parse_args(['--data_path', data, '--network_name', opts.network, '--pretrained', 'none', '--n_workers',
                       str(opts.n_workers)])
    auto, _ = timed_test(args, [(5, 1)], 3, 'auto')
    cached, _ = timed_test(args, [(5, 1)], 3, 'cached')
    together, lines = timed_test(args, [(5, 1), (5, 5)], opts.episodes, 'auto')
    (one, line_1), (five, line_5) = (timed_test(args, [setting], opts.episodes, 'auto') for setting in ((5, 1), (5, 5)))
    return [Row('settings', f'{opts.network}, 3 test episodes', 'the whole split cached', cached, 'auto', auto),
            Row('settings', f'{opts.network}, --K 1 5, {opts.episodes} episodes each', 'two commands', one + five,
                'one command', together, same=lines == line_1 + line_5)]


# ------------------------------------------------------------------ the stored embeddings
def cache(opts, device: torch.device, work: str) -> list[Row]:
    """test.py three times, each its own process, on one checkpoint: the first call (encodes the split and
    stores its embeddings), a second (reuses them), and the same call with --feature_cache off."""
    data = opts.data_path or write_colour_dataset(os.path.join(work, 'data'), (5, 5, 5), 20, (84, 84))
    args = parse_args(['--data_path', data, '--network_name', opts.network, '--pretrained', 'none'])
    torch.manual_seed(0)
    checkpoint = os.path.join(work, f'random-{opts.network}.model')
    atomic_save({'state_dict': model_state_dict(checkpoints.build_model(args, pretrained=False))}, checkpoint)
    figures, seconds = {}, {}
    for call, extra in (('first', []), ('second', []), ('off', ['--feature_cache', 'off'])):
        out = os.path.join(work, f'{call}.json')
        seconds[call], _ = timed(lambda: subprocess.run(
            [sys.executable, os.path.join(ROOT, 'test.py'), '--data_path', data, '--network_name', opts.network,
             '--model_path', checkpoint, '--save_dir', os.path.join(work, 'saves'), '--eval_mode', 'cached',
             '--n_testing_episodes', str(opts.cache_episodes), '--n_workers', str(opts.n_workers), '--device',
             device.type, '--json', out, *extra], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with open(out) as f:
            figures[call] = [(s['accuracy'], s['ci95']) for s in json.load(f)['settings']]
    split = open_split(data, 'test')
    n = len(split)
    same = figures['first'] == figures['second'] == figures['off']
    what = f'{device.type} {opts.network}, test.py of one checkpoint, {opts.cache_episodes} episodes over {n} images'

    def sizes_and_times() -> str:  # the key the store had before: every file's size and modification time
        digest = hashlib.sha256()
        for path in split.files():
            info = os.stat(path)
            digest.update(f'{path}:{info.st_size}:{info.st_mtime_ns};'.encode())
        return digest.hexdigest()
    by_content, _ = timed(lambda: content_digest(split.files()))  # the page cache is warm for both: the second test.py's case
    by_times, _ = timed(sizes_and_times)
    return [Row('cache', what, 'first call (encodes, stores)', seconds['first'], 'second call (reuses)',
                seconds['second'], same=same),
            Row('cache', what, '--feature_cache off', seconds['off'], 'second call (reuses)', seconds['second'],
                same=same),
            Row('cache', f'the test split\'s key, {n} images and the split file', 'by content (BLAKE2b)', by_content,
                'by sizes and times (the former key)', by_times)]


SECTIONS = {'evaluation': evaluation, 'head': head, 'loading': loading, 'training': training, 'allocator': allocator,
            'settings': settings, 'cache': cache}
PER_DEVICE = ('evaluation', 'head', 'loading', 'training', 'cache')  # the others time CPU work


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('sections', nargs='*', metavar='SECTION',
                   help=f'sections to run: {", ".join(SECTIONS)} (default: {" ".join(QUICK)})')
    p.add_argument('--network', default='convnet', choices=['convnet', 'resnet'], help='encoder to time')
    p.add_argument('--K', type=int, default=1, help='shots of the 5-way episodes (15 queries per class)')
    p.add_argument('--classes', type=int, default=5, help='classes of the shrunk split (evaluation, loading, training)')
    p.add_argument('--device', default='all', choices=['all', 'cpu', 'cuda'], help='where the per-device sections run')
    p.add_argument('--n_workers', type=int, default=DEFAULT_WORKERS, help="loader workers")
    p.add_argument('--eval_episodes', type=int, default=None,
                   help="evaluation: episodes (default: mini-ImageNet's proportion; another count gives no fair ratio)")
    p.add_argument('--loader_episodes', type=int, default=20, help='loading: episodes timed')
    p.add_argument('--train_episodes', type=int, default=5, help='training: episodes timed')
    p.add_argument('--head_episodes', type=int, default=1000, help='head: episodes timed one at a time and batched')
    p.add_argument('--head_batch', type=int, default=0, help='head: episodes at once (default: chosen by memory)')
    p.add_argument('--full_episodes', type=int, default=10000, help='head: episodes of the whole cached test')
    p.add_argument('--data_path', default=None, help='settings, cache: a folder-form dataset (default: generated)')
    p.add_argument('--steps', type=int, default=3, help='allocator: timed steps')
    p.add_argument('--warmup', type=int, default=1, help='allocator: untimed steps first')
    p.add_argument('--episodes', type=int, default=2000, help='settings: episodes of each setting')
    p.add_argument('--cache_episodes', type=int, default=10000, help="cache: test.py's --n_testing_episodes")
    p.add_argument('--work_dir', default=None, help='where data is written (default: a temporary folder)')
    p.add_argument('--json', default=None, help='also write the rows to this JSON file')
    return p


def run_sections(opts, names: list[str]) -> list[Row]:
    """The rows of the named sections, on every device --device asks for that this machine has."""
    devices = [torch.device('cpu')] if opts.device != 'cuda' else []
    if opts.device != 'cpu' and torch.cuda.is_available():
        devices.append(torch.device('cuda'))
    torch.backends.cudnn.benchmark = True
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for device in devices if name in PER_DEVICE else [torch.device('cpu')]:
                work = os.path.join(opts.work_dir or tmp, f'{name}-{device.type}')
                os.makedirs(work, exist_ok=True)
                rows += SECTIONS[name](opts, device, work)
    return rows


@exits_cleanly
def main(argv: Optional[list[str]] = None) -> list[Row]:
    parser = get_parser()
    opts = parser.parse_args(argv)
    unknown = [name for name in opts.sections if name not in SECTIONS]
    if unknown:
        parser.error(f'unknown section {unknown[0]}: choose from {", ".join(SECTIONS)}')
    keep_freed_memory()  # as train.py, test.py and pretrain.py do
    if opts.json:
        check_output(opts.json, '--json', formats=['.json'])
    rows = run_sections(opts, opts.sections or QUICK)
    print_table(rows)
    if opts.json:
        write_json(opts.json, {'rows': [asdict(row) for row in rows]})
    return rows


if __name__ == '__main__':
    main(sys.argv[1:])
