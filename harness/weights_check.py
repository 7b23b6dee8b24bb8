"""The check of data and weights before any meta-training (test.py --model_name protonet --pretrained FILE):
ProtoNet on the pretrained encoder itself, Euclidean and cosine, beside the figures FEAT's maintainer quotes
for FEAT's encoders on mini-ImageNet."""
import numpy as np
import torch

from harness.checkpoints import build_model
from harness.device import place_model
from harness.device import EvalOptions
from harness.embeddings import split_features
from harness.evaluation import draw_episodes, end_of_test, result_lines, run_episodes
from arguments import with_setting


# the benchmarks a dataset is compared with: classes per split (train, val, test), and images per class
# where the benchmark fixes it
BENCHMARKS = {'mini-ImageNet': ((64, 16, 20), 600), 'tiered-ImageNet': ((351, 97, 160), None),
              "FEAT's CUB split": ((100, 50, 50), None)}


def looks_like_mini_imagenet_test(dataset) -> bool:
    """Whether a test split has mini-ImageNet's shape (20 classes of 600 images): where figures quoted for
    mini-ImageNet may be printed beside ours."""
    (_, _, classes), per_class = BENCHMARKS['mini-ImageNet']
    counts = np.bincount(np.asarray(dataset.labels), minlength=len(dataset.class_names))
    return len(counts) == classes and bool((counts == per_class).all())


# ProtoNet on FEAT's pretrained encoders, no meta-training, 5-way 1-shot on mini-ImageNet's test split, as
# FEAT's maintainer gives them to check that weights and data copy match (quoted, not measured here)
PRETRAINED_FIGURES = {
    ('resnet', 'euclidean'): "almost 55 % for FEAT's Res12-pre.pth (Sha-Lab/FEAT issue 33)",
    ('resnet', 'cosine'): "around 62 % for FEAT's Res12-pre.pth (Sha-Lab/FEAT issue 33)",
    ('convnet', 'euclidean'): "about 46 % for FEAT's con-pre.pth, metric not stated (Sha-Lab/FEAT issue 16)",
    ('convnet', 'cosine'): "about 46 % for FEAT's con-pre.pth, metric not stated (Sha-Lab/FEAT issue 16)",
}


def check_pretrained(args, settings: list[tuple[int, int]], dataset, device) -> dict:
    """ProtoNet on the pretrained encoder, Euclidean and cosine on one encoding of the split, each line
    beside FEAT's maintainer's figure where it applies (5-way 1-shot)."""
    model = place_model(build_model(with_setting(args, *settings[0])), args, device)
    options = EvalOptions.from_args(args, device)
    weights = None if args.pretrained.lower() == 'none' else args.pretrained
    features = split_features(args, model, weights, dataset, options)  # one encoding for both metrics
    untrained = args.pretrained.lower() == 'none'
    if untrained:
        print(f'ProtoNet on an untrained {args.network_name} encoder (random initialisation, seed {args.seed}), no '
              f'training: the floor any training must beat')
    else:
        print(f'ProtoNet on the pretrained encoder {args.pretrained}, no meta-training: the check that data and '
              f'weights match')
    benchmark = looks_like_mini_imagenet_test(dataset)
    if args.network_name == 'resnet' and args.normalization != 'feat' and not untrained:
        print("note: FEAT's Res12-pre.pth was pretrained with FEAT's normalisation; evaluate FEAT's weights "
              "with --normalization feat")
    results = {}
    for n, k in settings:
        for metric in ('euclidean', 'cosine'):
            model.metric = metric
            episodes, mode = draw_episodes(args, dataset, torch.Generator().manual_seed(args.seed),
                                            args.n_testing_episodes, n, k)
            result = run_episodes(model, dataset, episodes, mode, options, features, desc=f'{metric} {n}-way {k}-shot')
            quoted = PRETRAINED_FIGURES.get((args.network_name, metric)) if (n, k) == (5, 1) and benchmark \
                and not untrained else None  # FEAT's figures are for mini-ImageNet's test split
            lines = result_lines(result, n, k)
            lines[0] = f'{metric}: {lines[0]}' + (f'   [quoted on mini-ImageNet: {quoted}]' if quoted else '')
            print('\n'.join(lines))
            results[(n, k, metric)] = result
    end_of_test(args, features, results, pretrained=args.pretrained)
    return results
