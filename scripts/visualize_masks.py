"""Draw the masks GLoFA makes for one episode: python scripts/visualize_masks.py --N 5 --K 1 [--out masks.png].

Loads a trained model (the run's best checkpoint, or --model_path), samples one N-way K-shot episode
of --split with --episode_seed, and draws the support images, the task mask, the class masks (all
over the feature dimensions, sorted by the task mask) and the two strengths alpha_task, alpha_cls.
The same numbers are printed, one line per mask.
"""
import argparse
import os
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import arguments  # noqa: E402

from harness import checkpoints, finding, runs  # noqa: E402
from arguments import parse_args  # noqa: E402
from harness.checkpoints import load_model_checkpoint  # noqa: E402
from dataloader import (NORMALIZATIONS, SPLITS, episode_sampler,  # noqa: E402
                        eval_transform, open_split)
from harness.device import EvalOptions  # noqa: E402
from harness.embeddings import stored_features  # noqa: E402
from models.glofa import Adaptation  # noqa: E402
from base.console import UserError, exits_cleanly  # noqa: E402
from harness.device import select_device  # noqa: E402
from harness.outputs import PICTURE_FORMATS, check_output, save_figure  # noqa: E402

CAPTION = (
    'How to read this figure. Top: the support images of the episode, one column per class. Bottom: one row per '
    'mask, one column per feature dimension; the columns are sorted by the task mask, largest first, so the top row '
    'falls from left to right and every row uses the same order. A class n scales feature d of every image by '
    '(1 + alpha_task * m_task[d]) * (1 + alpha_cls * m_cls[n, d]): 0 (dark) leaves the feature as it is, larger '
    '(brighter) values amplify it more; the task mask and the class masks each have their own colour scale. The task mask is shared by all classes and should pick the coarse patterns useful '
    'for the whole task; where a class row departs from the task row are the details that class adds. The strengths '
    'at right say how much each mask acts.')


def get_parser() -> argparse.ArgumentParser:
    """This script's own flags; every other flag is train.py's / test.py's and picks the model."""
    p = argparse.ArgumentParser(
        description="Draw the task mask, the class masks and the strengths a trained GLoFA model makes "
                    "for one episode.",
        epilog="Any other flag is one of train.py's / test.py's (python test.py --help): --N, --K, "
               "--network_name, --save_dir, --model_path, --data_path ... pick the model and the data.",
        allow_abbrev=False)
    p.add_argument('--split', type=str, default='test', choices=list(SPLITS), help='split the episode is drawn from')
    p.add_argument('--episode_seed', type=int, default=0, help='seed of the episode sampler')
    p.add_argument('--out', type=str, default=None,
                   help='PNG file to write (default: beside the checkpoint, <checkpoint without .model>.masks.png)')
    return p


def denormalise(image: torch.Tensor, normalization: str = 'imagenet') -> torch.Tensor:
    """(3, H, W) normalised -> (H, W, 3) in [0, 1]."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in NORMALIZATIONS[normalization])
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0)


def feature_order(adaptation: Adaptation) -> torch.Tensor:
    """Feature dimensions sorted by the task mask, largest first (by the mean class mask when the task mask is off)."""
    key = adaptation.m_task if bool(adaptation.m_task.any()) else adaptation.m_cls.mean(dim=0)
    return torch.argsort(key, descending=True, stable=True)


def mask_line(name: str, mask: torch.Tensor, delta: float) -> str:
    above = (mask > delta / 2).float().mean().item()
    return (f'{name}: mean {mask.mean().item():.4f}, min {mask.min().item():.4f}, max {mask.max().item():.4f}, '
            f'{100 * above:.1f} % of {mask.numel()} features above delta/2 = {delta / 2:g}')


def draw(images: torch.Tensor, class_names: list[str], adaptation: Adaptation, n_way: int, n_shot: int,
         delta: float, title: str, out: str, normalization: str = 'imagenet') -> None:
    """images: (N*K, 3, H, W) normalised, shot-major. One PNG: support grid, mask heat map, strengths, caption."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    order = feature_order(adaptation)
    rows = torch.cat([adaptation.m_task[None], adaptation.m_cls])[:, order].cpu().numpy()  # (1 + N, d)
    d = rows.shape[1]
    alpha = adaptation.alpha.cpu().tolist()

    image_height = min(1.7, 9.0 / n_shot)
    heat_height = 0.9 + 0.32 * (n_way + 1)
    fig = Figure(figsize=(12, 0.5 + n_shot * image_height + heat_height + 0.8), dpi=120, layout='constrained')
    FigureCanvasAgg(fig)
    top, bottom, caption = fig.subfigures(3, 1, height_ratios=[n_shot * image_height, heat_height, 0.8])

    # ---------------- support images: K rows of N, shot-major
    axes = top.subplots(n_shot, n_way, squeeze=False)
    for i in range(n_shot * n_way):
        k, n = divmod(i, n_way)
        ax = axes[k][n]
        ax.imshow(denormalise(images[i], normalization).numpy())
        ax.set_xticks([])
        ax.set_yticks([])
        if k == 0:
            ax.set_title(class_names[n], fontsize=9)
    top.suptitle(title, fontsize=11)

    # ---------------- masks, one row each, columns sorted by the task mask; strengths beside them. The task
    # mask and the class masks each get their own colour scale (0 to their largest value), since class masks
    # are often far smaller than the task mask and would all look alike on a common 0..delta scale
    grid = bottom.subplots(2, 2, width_ratios=[6, 1], height_ratios=[1, n_way], squeeze=False)
    (ax_task, ax_alpha), (ax_cls, ax_empty) = grid
    ax_empty.axis('off')
    labels = ['task mask'] + [f'class {name}' for name in class_names]
    for ax, part, names in ((ax_task, rows[:1], labels[:1]), (ax_cls, rows[1:], labels[1:])):
        top_value = float(part.max()) if part.max() > 0 else delta
        heat = ax.imshow(part, aspect='auto', interpolation='nearest', cmap='viridis', vmin=0, vmax=top_value)
        ax.set_yticks(range(len(names)), [f'{label} (max {row.max():.3f})' for label, row in zip(names, part)],
                      fontsize=8)  # the colour bar beside each panel runs from 0 to that panel's largest value
        bar = bottom.colorbar(heat, ax=ax, fraction=0.04, pad=0.01)
        bar.ax.tick_params(labelsize=7)
    ax_task.set_xticks([])
    ax_task.set_title(f'masks in [0, delta = {delta:g}], each panel on its own colour scale', fontsize=10)
    ax_cls.set_xlabel(f'feature dimension ({d}), sorted by the task mask (largest first)')
    if alpha[0] == 0 and alpha[1] == 0:  # said on the figure, where the masks are
        ax_cls.text(0.5, 0.5, 'alpha_task = alpha_cls = 0: these masks have NO effect on this episode\n'
                    '(the model is normalised-prototype ProtoNet here)', transform=ax_cls.transAxes, ha='center',
                    va='center', fontsize=11, color='white', weight='bold',
                    bbox=dict(facecolor='tab:red', alpha=0.85, edgecolor='none'))
    bars = ax_alpha.bar([0, 1], alpha, color=['tab:blue', 'tab:orange'])
    ax_alpha.set_xticks([0, 1], ['alpha_task', 'alpha_cls'], fontsize=8)
    ax_alpha.bar_label(bars, fmt='%.3f', fontsize=8)
    ax_alpha.set_ylim(0, max(max(alpha) * 1.25, 1e-3))
    ax_alpha.set_title('strengths', fontsize=10)

    caption.text(0.01, 0.95, CAPTION, ha='left', va='top', wrap=True, fontsize=8.5)
    save_figure(fig, out)


@exits_cleanly
def main(argv: Optional[list[str]] = None) -> Adaptation:
    own, rest = get_parser().parse_known_args(argv)
    args = parse_args(rest)
    arguments.check_domains(argparse.Namespace(N=args.N, K=args.K, Q=args.Q), arguments.DOMAINS)
    if args.model_name != 'glofa':
        raise UserError(f'--model_name {args.model_name} has no masks to draw: this script draws GLoFA\'s')
    device = select_device(args.device, args.devices)
    model_path = args.model_path or runs.run_paths(args).best
    if not args.model_path and not os.path.isfile(model_path):
        raise UserError(finding.missing_run_message('checkpoint', model_path, args.save_dir, '.model'))

    # ---------------- model (as it was trained: checkpoints.as_trained) and episode
    checkpoint = checkpoints.read_checkpoint(model_path)
    for line in checkpoints.as_trained(args, checkpoint[0], model_path):
        print(line)
    if args.model_name != 'glofa':
        raise UserError(f'{model_path} holds a {args.model_name} model, which has no masks to draw: this script '
                        f'draws GLoFA\'s')
    model = checkpoints.build_model(args, pretrained=False)
    record = load_model_checkpoint(model, model_path, args, checkpoint)
    model.to(device).eval()
    dataset = open_split(args.data_path, own.split, eval_transform(args.normalization))
    out = own.out or os.path.splitext(model_path)[0] + '.masks.png'
    check_output(out, '--out', [model_path, *dataset.files()], args.overwrite, list(PICTURE_FORMATS))
    sampler = episode_sampler(dataset, 1, args.N, args.K, torch.Generator().manual_seed(own.episode_seed),
                              args.task_mix)
    indices = sampler.sample()  # (K*N,), shot-major: the support set
    images = torch.stack([dataset[int(i)][0] for i in indices])  # (N*K, 3, 84, 84)
    class_names = [dataset.class_names[dataset.labels[int(i)]] for i in indices[:args.N]]
    stored = stored_features(args, model_path, dataset, EvalOptions(device))  # test.py's, when it stored them
    stored = stored().load(len(dataset), getattr(model.encoder, "out_dim", None)) if stored is not None else None
    with torch.no_grad():
        support = stored[indices].to(device) if stored is not None else model.encode(images.to(device))  # (N*K, d)
        adaptation = Adaptation(*(t.float().cpu() for t in model.masks_and_strengths(support, args.N, args.K)))

    # ---------------- numbers, then the picture
    accuracy = record.get('validating_accuracy')
    accuracy_text = f'{100 * float(accuracy):.2f} %' if isinstance(accuracy, (int, float)) else 'unknown'
    print(f'model {model_path} (validation accuracy {accuracy_text}, episode {record.get("epoch")}); '
          f'{own.split} episode with seed {own.episode_seed}, {args.N}-way {args.K}-shot: {", ".join(class_names)}')
    alpha_task, alpha_cls = adaptation.alpha.tolist()
    print(f'alpha_task = {alpha_task:.4f}, alpha_cls = {alpha_cls:.4f}')
    print(mask_line('task mask', adaptation.m_task, args.delta))
    width = max(len(name) for name in class_names)
    for name, mask in zip(class_names, adaptation.m_cls):
        print(mask_line(f'class {name:<{width}} mask', mask, args.delta))
    print(f'resulting scale (1 + alpha_task m_task)(1 + alpha_cls m_cls): min {adaptation.scale.min().item():.4f}, '
          f'max {adaptation.scale.max().item():.4f}')
    title = (f'GLoFA masks: {own.split} split, {args.N}-way {args.K}-shot, episode seed {own.episode_seed}; '
             f'alpha_task = {alpha_task:.3f}, alpha_cls = {alpha_cls:.3f}')
    draw(images, class_names, adaptation, args.N, args.K, args.delta, title, out, args.normalization)
    print(f'wrote {out}')
    return adaptation


if __name__ == '__main__':
    main(sys.argv[1:])
