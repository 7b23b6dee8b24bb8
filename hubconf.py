"""torch.hub entry points, from a copy of this repository:

    model = torch.hub.load(REPO_DIR, 'glofa', source='local', checkpoint='saves/trained_models/<run>.model')
    transform = torch.hub.load(REPO_DIR, 'transform', source='local', checkpoint='saves/trained_models/<run>.model')
    encoder = torch.hub.load(REPO_DIR, 'encoder', source='local', checkpoint='Res12-pre.pth', network_name='resnet')

A checkpoint is evaluated as it was trained: its network, normalisation and model flags come from its record
(train.py writes one; for a file without one, FEAT's, the network its tensors fit); a flag given that differs is
used and named. Without a checkpoint the model is freshly initialised from ``network_name`` (default resnet) and
the flags given (e.g. ``tau=2``), checked as the command line checks them. Models come in eval mode, on the CPU.
Images go in as the 'transform' entry makes them: (B, 3, 84, 84), normalised as the checkpoint was trained.

The repository's modules (arguments, base, data, dataloader, harness, models, networks) are imported for each
call and then taken out of ``sys.modules`` again: a caller's own modules of those names are not touched.
"""
import functools
import os
import sys

dependencies = ['torch', 'torchvision', 'numpy', 'PIL']

_HERE = os.path.dirname(os.path.abspath(__file__))
_PACKAGES = ('arguments', 'base', 'data', 'dataloader', 'harness', 'models', 'networks')
_ours: dict = {}  # this repository's modules, loaded by an earlier call of this file's entries


def _is_ours(module) -> bool:
    path = getattr(module, '__file__', None)
    return bool(path) and os.path.abspath(path).startswith(_HERE + os.sep)


def _repository_modules(entry):
    """Run ``entry`` with this repository's modules under their names, and give the caller's back afterwards."""
    @functools.wraps(entry)
    def call(*args, **kwargs):
        named = {n: m for n, m in sys.modules.items() if n.split('.')[0] in _PACKAGES}
        theirs = {n: m for n, m in named.items() if not _is_ours(m)}
        for name in theirs:
            del sys.modules[name]
        for name, module in _ours.items():
            sys.modules.setdefault(name, module)
        sys.path.insert(0, _HERE)
        try:
            return entry(*args, **kwargs)
        finally:
            sys.path.remove(_HERE)
            for name in [n for n in sys.modules if n.split('.')[0] in _PACKAGES]:
                if name not in named or name in theirs:  # loaded for this call: kept aside, not left to the caller
                    _ours[name] = sys.modules.pop(name)
            sys.modules.update(theirs)
    return call


def _model(model_name: str, checkpoint, network_name: str, flags: dict):
    from harness.rebuild import build, resolve
    args, read = resolve(checkpoint, model_name, network_name, None, flags)
    return build(args, checkpoint and str(checkpoint), read)


@_repository_modules
def glofa(checkpoint: str = None, network_name: str = None, **flags):
    """GLoFA (models.glofa.GLoFA): a train.py checkpoint's, or a fresh one with GLoFA's ``flags``."""
    return _model('glofa', checkpoint, network_name, flags)


@_repository_modules
def protonet(checkpoint: str = None, network_name: str = None, **flags):
    """ProtoNet (models.protonet.ProtoNet): a train.py checkpoint's, or on a fresh encoder."""
    return _model('protonet', checkpoint, network_name, flags)


@_repository_modules
def feat(checkpoint: str = None, network_name: str = None, **flags):
    """FEAT (models.feat.FEAT): a train.py checkpoint's, or a fresh one."""
    return _model('feat', checkpoint, network_name, flags)


@_repository_modules
def encoder(checkpoint: str = None, network_name: str = None):
    """The encoder alone, (B, 3, 84, 84) -> (B, d): from pretrained weights (FEAT's files, pretrain.py's) or from a
    train.py checkpoint (its encoder's tensors), else freshly initialised."""
    from harness.checkpoints import load_encoder_weights
    from harness.rebuild import resolve
    from networks import build_encoder
    network_name = resolve(checkpoint, 'protonet', network_name, None, {}, say=False)[0].network_name
    model = build_encoder(network_name)
    if checkpoint:
        load_encoder_weights(model, str(checkpoint), network_name)
    return model.eval()


@_repository_modules
def transform(checkpoint: str = None, normalization: str = None):
    """The evaluation transform of the images a model takes (PIL image -> (3, 84, 84): Resize 92, CenterCrop 84,
    normalised): with the normalisation ``checkpoint`` was trained with, else ``normalization`` (default
    imagenet)."""
    from dataloader import eval_transform
    from harness.rebuild import resolve
    args = resolve(checkpoint, None, None, normalization, {})[0]
    return eval_transform(args.normalization)
