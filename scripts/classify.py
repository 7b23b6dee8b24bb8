"""Few-shot classification of your own images: python scripts/classify.py --model_path RUN.model --support DIR --query PATH ...

DIR holds one sub-folder per class, named as the class, with that class's example images (any number of
classes from 2, any number of images each); every query is an image file or a folder of them. With
--pretrained FILE --model_name protonet the encoder alone classifies (no meta-training). The model, the
network and the normalisation come from the checkpoint's record, as in test.py. Prints one line per query
(its predicted class, the probability, the runner-up); --out writes a CSV with every class's probability,
--picture draws the support images by class beside each query and its prediction. The model always answers one
of the given classes, also for a query of none of them. The probabilities are the softmax of the model's logits
over the given classes: they rank the classes, they are not a calibrated confidence (GLoFA's logits are inner
products with normalised prototypes divided by tau: how peaked they are depends on tau and on the length of the
query's embedding, and no threshold on them says "none of these").

Classes with different numbers of images are classified exactly as the method defines them: GLoFA's set
functions take each class's set as it is (f_class sums over the class's K_n images, f_task and h over the
whole support), and a prototype is the mean over its class's images. --shots K keeps the first K images
(by file name) of every class.
"""
import argparse
import csv
import io
import os
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from arguments import parse_args  # noqa: E402
from harness.rebuild import build, resolve  # noqa: E402
from dataloader import NORMALIZATIONS, eval_transform, to_rgb, too_large  # noqa: E402
from harness.embeddings import content_digest, feature_cache  # noqa: E402
from harness.device import EvalOptions  # noqa: E402
from networks import NETWORKS  # noqa: E402
from base.console import UserError, exits_cleanly, interrupt_on_sigterm  # noqa: E402
from harness.device import select_device  # noqa: E402
from base.files import write_text  # noqa: E402
from harness.outputs import PICTURE_FORMATS, check_output, save_figure  # noqa: E402

CSV_HEADER = ['file', 'prediction', 'probability']  # then one column per class; also the mark of a CSV of ours


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model_path', default=None, help="a checkpoint of train.py (<run>.model), or FEAT's {'params'} file")
    p.add_argument('--pretrained', default=None, help='with --model_name protonet: encoder weights alone')
    p.add_argument('--model_name', default=None, choices=['glofa', 'protonet', 'feat'],
                   help="default: the checkpoint's (protonet with --pretrained)")
    p.add_argument('--network_name', default=None, choices=list(NETWORKS),
                   help="default: the checkpoint's record, else the network its tensors fit")
    p.add_argument('--normalization', default=None, choices=list(NORMALIZATIONS),
                   help="default: the checkpoint's record, else imagenet")
    p.add_argument('--metric', default=None, choices=['euclidean', 'cosine'],
                   help="protonet with --pretrained (default euclidean); a checkpoint's own otherwise")
    p.add_argument('--support', required=True, help='a folder with one sub-folder of example images per class')
    p.add_argument('--query', nargs='+', required=True, help='image files, or folders of them, to classify')
    p.add_argument('--shots', type=int, default=None, help='use the first K images (by name) of every class')
    p.add_argument('--out', default=None, help='write the predictions to this CSV file')
    p.add_argument('--picture', default=None,
                   help='draw the support images and each query with its prediction (.png, .pdf or .svg)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --out or --picture that this '
                                                            'program did not write')
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    p.add_argument('--save_dir', default='saves', help='where the support set\'s embeddings are stored (features/)')
    p.add_argument('--feature_cache', default='on', choices=['on', 'off'],
                   help="store the support set's embeddings, and reuse them while its files and the weights are the same")
    return p


# ------------------------------------------------------------------ images
def read_image(path: str) -> Optional[Image.Image]:
    """The image at ``path`` as 8-bit RGB, or None when the file is no image; a mode that cannot be
    converted faithfully, or a size past PIL's limit, is a UserError naming the file."""
    try:
        with Image.open(path) as image:
            return to_rgb(image, path)
    except Image.DecompressionBombError as error:
        raise UserError(f'image {path} cannot be read ({too_large(error)})') from None
    except (OSError, ValueError, SyntaxError):
        return None


def skipped_note(where: str, folders: int, others: int) -> str:
    parts = [f'{folders} sub-folder(s)' if folders else '', f'{others} file(s) that are not images' if others else '']
    return f'note: {where}: skipped {" and ".join(p for p in parts if p)}'


def folder_images(folder: str, where: str, notes: list) -> list[str]:
    """The readable images of ``folder`` by file name; what it held besides is added to ``notes``: (where,
    sub-folders, files that are not images)."""
    inside = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if not f.startswith('.')]
    files = [path for path in inside if os.path.isfile(path)]
    images = [path for path in files if read_image(path) is not None]
    if len(images) < len(inside):
        notes.append((where, len(inside) - len(files), len(files) - len(images)))
    return images


def support_sets(folder: str, shots: Optional[int]) -> tuple[list[str], list[list[str]], list[tuple]]:
    """(class names, each class's image files, what was skipped: (where, sub-folders, files that are not
    images)): sub-folders in name order, images by file name."""
    if not os.path.isdir(folder):
        raise UserError(f'--support {folder} is not a folder (expected one sub-folder of images per class)')
    names = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith('.'))
    if len(names) < 2:
        raise UserError(f'--support {folder} holds {len(names)} class folder{"" if len(names) == 1 else "s"}: a '
                        f'few-shot task needs at least 2 classes, one sub-folder of example images each')
    files, notes = [], []
    for name in names:
        class_dir = os.path.join(folder, name)
        images = folder_images(class_dir, f'class {name}', notes)
        if not images:
            raise UserError(f'class folder {class_dir} holds no readable image')
        if shots is not None:
            if len(images) < shots:
                raise UserError(f'--shots {shots}: class {name} has {len(images)} image(s) ({class_dir})')
            images = images[:shots]
        files.append(images)
    return names, files, notes


def query_files(paths: list[str], notes: list) -> list[str]:
    """Every query image: the files given, and the images of the folders given (in name order); what a folder
    held besides is said in ``notes``."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            found += folder_images(path, f'query folder {path}', notes)
        elif not os.path.isfile(path):
            raise UserError(f'query {path} not found')
        elif read_image(path) is None:
            raise UserError(f'query {path} is not an image PIL can read')
        else:
            found.append(path)
    if not found:
        raise UserError(f'no query image in {" ".join(paths)}')
    return found


# ------------------------------------------------------------------ the model
def model_args(opts) -> tuple[object, Optional[str], Optional[tuple]]:
    """train.py's flags of the model that classifies (from the checkpoint's record, ``harness.rebuild.resolve``),
    the checkpoint's path (None: the encoder of --pretrained alone) and its (record, state dict), read once."""
    if opts.pretrained and opts.pretrained.lower() == 'none':
        raise UserError('--pretrained none: this script classifies with trained weights; give --pretrained FILE '
                        '(encoder weights) or --model_path RUN.model')
    if opts.pretrained:
        if opts.model_path or (opts.model_name or 'protonet') != 'protonet':
            raise UserError('--pretrained FILE evaluates the encoder alone: give it with --model_name protonet, '
                            'without --model_path')
        return parse_args(['--model_name', 'protonet', '--pretrained', opts.pretrained, '--metric',
                           opts.metric or 'euclidean', '--network_name', opts.network_name or 'resnet']), None, None
    if not opts.model_path:
        raise UserError('give --model_path RUN.model (a trained run) or --pretrained FILE --model_name protonet')
    args, read = resolve(opts.model_path, opts.model_name, opts.network_name, opts.normalization)
    return args, opts.model_path, read


@torch.no_grad()
def embed(encoder, paths: list[str], transform, device) -> torch.Tensor:
    """(len(paths), d): the images encoded in eval mode, in batches of 64."""
    out = []
    for start in range(0, len(paths), 64):
        batch = torch.stack([transform(read_image(p)) for p in paths[start:start + 64]]).to(device)
        out.append(encoder(batch).float())
    return torch.cat(out)


def support_embeddings(opts, args, model, weights: str, files: list[list[str]], transform, device) -> tuple[list, Optional[str]]:
    """Each class's embeddings (K_n, d): stored under --save_dir/features by the first call with these support
    files' contents and weights (the same cache as test.py's), reused by the next ones; and why they could not
    be stored, if so (said after the predictions)."""
    paths = [p for class_files in files for p in class_files]
    cache = None
    if opts.feature_cache == 'on':
        cache = feature_cache(opts.save_dir, weights, lambda: {'split': 'support', 'content': content_digest(paths)},
                              args.normalization, args.network_name, EvalOptions(device))
    features = cache.load(len(paths), getattr(model.encoder, 'out_dim', None)) if cache is not None else None
    if features is None:
        features = embed(model.encoder, paths, transform, device)
        if cache is not None:
            cache.save(features)
    return (list(features.to(device).split([len(class_files) for class_files in files])),
            cache.warning if cache is not None else None)


# ------------------------------------------------------------------ output
def draw(names: list[str], files: list[list[str]], queries: list[str], predictions: list[int],
         probabilities: torch.Tensor, out: str) -> None:
    """Support images by class (a column each, up to 3 shown) above the queries, each with its prediction."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    shown, per_row = min(3, max(len(f) for f in files)), min(6, len(queries))
    query_rows = -(-len(queries) // per_row)
    fig = Figure(figsize=(max(2 * len(names), 2 * per_row), 2.1 * (shown + query_rows) + 0.8), dpi=100,
                 layout='constrained')
    FigureCanvasAgg(fig)
    top, bottom = fig.subfigures(2, 1, height_ratios=[shown, query_rows])
    axes = top.subplots(shown, len(names), squeeze=False)
    for n, (name, paths) in enumerate(zip(names, files)):
        for k in range(shown):
            ax = axes[k][n]
            ax.axis('off')
            if k < len(paths):
                ax.imshow(read_image(paths[k]))
            if k == 0:
                ax.set_title(f'{name} ({len(paths)} image{"s" if len(paths) > 1 else ""})', fontsize=9)
    top.suptitle('support: the examples of each class', fontsize=10)
    axes = bottom.subplots(query_rows, per_row, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis('off')
        if i < len(queries):
            ax.imshow(read_image(queries[i]))
            name = os.path.basename(queries[i])
            name = name if len(name) <= 24 else f'{name[:10]}...{name[-11:]}'  # fits above its image
            ax.set_title(f'{name}\n-> {names[predictions[i]]} ({100 * probabilities[i, predictions[i]]:.0f} %)',
                         fontsize=8)
    bottom.suptitle('queries and what the model predicts', fontsize=10)
    save_figure(fig, out)


@exits_cleanly
def main(argv: Optional[list[str]] = None) -> dict:
    opts = get_parser().parse_args(argv)
    interrupt_on_sigterm()  # a cluster's SIGTERM ends it as Ctrl-C does: one line, exit 130
    if opts.shots is not None and opts.shots < 1:
        raise UserError(f'--shots must be at least 1, got {opts.shots}')
    args, checkpoint, read = model_args(opts)
    names, files, notes = support_sets(opts.support, opts.shots)
    queries = query_files(opts.query, notes)
    inputs = [checkpoint, args.pretrained, *queries, *(p for paths in files for p in paths)]
    if opts.out:
        check_output(opts.out, '--out', inputs, opts.overwrite, ['.csv'], header=CSV_HEADER)
    if opts.picture:
        check_output(opts.picture, '--picture', inputs, opts.overwrite, list(PICTURE_FORMATS))
    device = select_device(opts.device, [0])
    model = build(args, checkpoint, read).to(device)
    for skipped in notes:
        print(skipped_note(*skipped))
    supports = {os.path.realpath(p) for paths in files for p in paths}
    repeated = [q for q in queries if os.path.realpath(q) in supports]
    if repeated:
        print(f'warning: {len(repeated)} quer{"y is" if len(repeated) == 1 else "ies are"} also in the support set '
              f'(e.g. {repeated[0]}): their predictions say little')
    transform = eval_transform(args.normalization)
    sets, warning = support_embeddings(opts, args, model, checkpoint or args.pretrained, files, transform, device)
    logits, adaptation = model.logits_for_sets(sets, embed(model.encoder, queries, transform, device))  # (M, N)
    probabilities = torch.softmax(logits.float(), dim=1).cpu()
    shots = sorted({len(f) for f in files})
    print(f'{len(names)}-way task, {"-".join(map(str, shots))} support image(s) a class ({args.model_name} on '
          f'{args.network_name}, {checkpoint or args.pretrained}); {len(queries)} quer{"y" if len(queries) == 1 else "ies"}')
    print(f'each query gets one of these {len(names)} classes, also when it shows none of them; the probabilities '
          f'(softmax of the logits) rank the classes, they are not a calibrated confidence')
    predictions = []
    for path, p in zip(queries, probabilities):
        order = torch.argsort(p, descending=True).tolist()
        predictions.append(order[0])
        print(f'{path}: {names[order[0]]} ({100 * p[order[0]]:.1f} %), runner-up {names[order[1]]} '
              f'({100 * p[order[1]]:.1f} %)')
    if adaptation is not None:
        alpha = adaptation.alpha.tolist()
        print(f'adaptors: alpha_task {alpha[0]:.4f}, alpha_cls {alpha[1]:.4f}'
              + ('; both 0: the masks have no effect, the model is normalised-prototype ProtoNet on this task'
                 if alpha[0] == 0 and alpha[1] == 0 else ''))
    if warning:
        print(warning)
    if opts.out:
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow([*CSV_HEADER, *names])
        for path, n, p in zip(queries, predictions, probabilities):
            writer.writerow([path, names[n], f'{p[n]:.6f}', *(f'{v:.6f}' for v in p.tolist())])
        write_text(opts.out, text.getvalue())
        print(f'wrote {opts.out}')
    if opts.picture:
        draw(names, files, queries, predictions, probabilities, opts.picture)
        print(f'wrote {opts.picture}')
    return {'classes': names, 'queries': queries, 'predictions': [names[n] for n in predictions],
            'skipped': notes,
            'probabilities': probabilities, 'logits': logits.cpu(), 'adaptation': adaptation}


if __name__ == '__main__':
    main(sys.argv[1:])
