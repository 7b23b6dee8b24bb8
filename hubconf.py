"""torch.hub entry points, from a copy of this repository:

    model = torch.hub.load(REPO_DIR, 'glofa', source='local', checkpoint='saves/trained_models/<run>.model')
    transform = torch.hub.load(REPO_DIR, 'transform', source='local', checkpoint='saves/trained_models/<run>.model')
    encoder = torch.hub.load(REPO_DIR, 'encoder', source='local', checkpoint='Res12-pre.pth', network_name='resnet')

A checkpoint is evaluated as it was trained: its network, normalisation and model flags come from its record
(train.py writes one; for a file without one, FEAT's, the network its tensors fit); a flag given that differs is
used and named. Without a checkpoint the model is freshly initialised from ``network_name`` (default resnet) and
the flags given (e.g. ``tau=2``), checked as the command line checks them. Models come in eval mode, on the CPU.
Images go in as the 'transform' entry makes them: (B, 3, 84, 84), normalised as the checkpoint was trained.

The repository's modules (arguments, dataloader, harness, models, networks) are imported for each call and then
taken out of ``sys.modules`` again: a caller's own modules of those names are not touched.
"""
import contextlib
import functools
import io
import os
import sys

dependencies = ['torch', 'torchvision', 'numpy', 'PIL']

_HERE = os.path.dirname(os.path.abspath(__file__))
_PACKAGES = ('arguments', 'dataloader', 'harness', 'models', 'networks')
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


def checkpoint_args(checkpoint: str = None, model_name: str = None, network_name: str = None,
                    normalization: str = None, **flags):
    """train.py's flags of the model in ``checkpoint``, as it was trained (``harness.checkpoints.as_trained``: its
    record's, a flag given here wins and is named; a file without a record gets the network its tensors fit);
    ``flags``: the model's own (e.g. tau=2). No checkpoint: the defaults and the flags given. Every flag is checked
    as the command line checks it (one UserError naming it)."""
    return _resolve(checkpoint, model_name, network_name, normalization, flags)[0]


def _resolve(checkpoint, model_name, network_name, normalization, flags, say: bool = True):
    """(train.py's args, the checkpoint's (record, state dict) or None); ``say``: print as_trained's notes."""
    from arguments import DOMAINS, MODEL_FLAGS, check_domains, parse_args
    from harness.checkpoints import as_trained, fitting_network, model_of, read_checkpoint
    from base.console import UserError
    from networks import NETWORKS
    if checkpoint is not None and not (isinstance(checkpoint, (str, os.PathLike)) and str(checkpoint)):
        raise UserError(f'checkpoint {checkpoint!r}: expected the path of a checkpoint file (leave it out for a '
                        f'freshly initialised model)')
    checkpoint = None if checkpoint is None else str(checkpoint)
    read = read_checkpoint(checkpoint) if checkpoint else None
    config = read[0].get('config') if read and isinstance(read[0].get('config'), dict) else {}
    model_name = model_name or config.get('model_name') or (model_of(read[1]) if read else 'glofa')
    if model_name not in MODEL_FLAGS:
        raise UserError(f'model_name {model_name!r}: expected one of {", ".join(MODEL_FLAGS)}')
    unknown = [flag for flag in flags if flag not in MODEL_FLAGS[model_name]]
    if unknown:
        raise TypeError(f'{model_name} has no flag {unknown[0]} (its flags: {", ".join(MODEL_FLAGS[model_name])})')
    given = {'network_name': network_name, 'normalization': normalization, **flags}
    argv = ['--model_name', model_name, '--pretrained', 'none']
    for flag, value in given.items():
        if value is not None:
            argv.append(f'--{flag}={value}')
    if read and network_name is None and 'network_name' not in config:  # FEAT's files: the network they fit
        network_name = fitting_network(checkpoint)
        if network_name is None:
            raise UserError(f'checkpoint {checkpoint} holds no encoder of a known network ({", ".join(NETWORKS)})')
        argv += ['--network_name', network_name]
    refusal = io.StringIO()
    try:
        with contextlib.redirect_stderr(refusal):
            args = parse_args(argv)
    except SystemExit:  # argparse's refusal (a wrong type or choice), as one error naming the argument
        raise UserError(refusal.getvalue().strip().splitlines()[-1].split('error: ', 1)[-1]) from None
    check_domains(args, DOMAINS)
    if read:
        notes = as_trained(args, read[0], checkpoint)
        for line in notes if say else ():
            print(line)
    return args, read


def build(args, checkpoint: str = None, read: tuple = None):
    """The model of train.py's ``args`` in eval mode: its weights from ``checkpoint`` (``read``: its record and
    state dict, when read already), else its encoder's from --pretrained (none: fresh)."""
    from harness.checkpoints import build_model, load_model_checkpoint
    from harness.runs import model_config
    model = build_model(args, pretrained=checkpoint is None)
    if checkpoint:
        load_model_checkpoint(model, checkpoint, model_config(args), read)
    return model.eval()


def _model(model_name: str, checkpoint, network_name: str, flags: dict):
    args, read = _resolve(checkpoint, model_name, network_name, None, flags)
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
    from networks import build_encoder
    network_name = _resolve(checkpoint, 'protonet', network_name, None, {}, say=False)[0].network_name
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
    args = _resolve(checkpoint, None, None, normalization, {})[0]
    return eval_transform(args.normalization)
