"""torch.hub entry points, from a copy of this repository:

    model = torch.hub.load(REPO_DIR, 'glofa', source='local', checkpoint='saves/trained_models/<run>.model')
    encoder = torch.hub.load(REPO_DIR, 'encoder', source='local', checkpoint='Res12-pre.pth', network_name='resnet')

A checkpoint gives the model's network and flags (train.py's record; for a file without one, FEAT's, the network
its tensors fit); those given win. Without a checkpoint the model is freshly initialised from ``network_name``
(default resnet) and the flags given (e.g. ``tau=2``). Models come in eval mode, on the CPU. Images go in as
``dataloader.eval_transform()`` makes them: (B, 3, 84, 84), normalised.
"""
dependencies = ['torch', 'torchvision', 'numpy', 'PIL']


def checkpoint_args(checkpoint: str = None, model_name: str = None, network_name: str = None,
                    normalization: str = None, **flags):
    """train.py's flags of the model in ``checkpoint``: each the one given, else its record's (train.py writes one),
    else what its tensors fit (FEAT's files have none); ``flags``: the model's own (e.g. tau=2). No checkpoint: the
    defaults and the flags given."""
    from arguments import MODEL_FLAGS, parse_args
    from harness.checkpoints import fitting_network, model_of, read_checkpoint
    from harness.console import UserError
    from networks import NETWORKS
    record, state = read_checkpoint(checkpoint) if checkpoint else ({}, None)
    config = record['config'] if isinstance(record.get('config'), dict) else {}
    model_name = model_name or config.get('model_name') or (model_of(state) if state else 'glofa')
    network_name = network_name or config.get('network_name') or (fitting_network(checkpoint) if state else 'resnet')
    if network_name is None:
        raise UserError(f'checkpoint {checkpoint} holds no encoder of a known network ({", ".join(NETWORKS)})')
    args = parse_args(['--model_name', model_name, '--network_name', network_name, '--pretrained', 'none',
                       '--normalization', normalization or config.get('normalization', 'imagenet')])
    for flag in MODEL_FLAGS[model_name]:
        given = flags.pop(flag, config.get(flag))
        setattr(args, flag, getattr(args, flag) if given is None else given)
    if flags:
        raise TypeError(f'{model_name} has no flag {next(iter(flags))} '
                        f'(its flags: {", ".join(MODEL_FLAGS[model_name])})')
    return args


def build(args, checkpoint: str = None):
    """The model of train.py's ``args`` in eval mode: its weights from ``checkpoint``, else its encoder's from
    --pretrained (none: fresh)."""
    from harness.checkpoints import build_model, load_model_checkpoint
    from harness.runs import model_config
    model = build_model(args, pretrained=checkpoint is None)
    if checkpoint:
        load_model_checkpoint(model, checkpoint, model_config(args))
    return model.eval()


def _model(model_name: str, checkpoint, network_name: str, flags: dict):
    return build(checkpoint_args(checkpoint, model_name, network_name, **flags), checkpoint)


def glofa(checkpoint: str = None, network_name: str = None, **flags):
    """GLoFA (models.glofa.GLoFA): a train.py checkpoint's, or a fresh one with GLoFA's ``flags``."""
    return _model('glofa', checkpoint, network_name, flags)


def protonet(checkpoint: str = None, network_name: str = None, **flags):
    """ProtoNet (models.protonet.ProtoNet): a train.py checkpoint's, or on a fresh encoder."""
    return _model('protonet', checkpoint, network_name, flags)


def feat(checkpoint: str = None, network_name: str = None, **flags):
    """FEAT (models.feat.FEAT): a train.py checkpoint's, or a fresh one."""
    return _model('feat', checkpoint, network_name, flags)


def encoder(checkpoint: str = None, network_name: str = None):
    """The encoder alone, (B, 3, 84, 84) -> (B, d): from pretrained weights (FEAT's files, pretrain.py's) or from a
    train.py checkpoint (its encoder's tensors), else freshly initialised."""
    from harness.checkpoints import load_encoder_weights
    from networks import build_encoder
    network_name = checkpoint_args(checkpoint, 'protonet', network_name).network_name
    model = build_encoder(network_name)
    if checkpoint:
        load_encoder_weights(model, checkpoint, network_name)
    return model.eval()
