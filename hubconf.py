"""torch.hub entry points, from a copy of this repository:

    model = torch.hub.load(REPO_DIR, 'glofa', source='local', checkpoint='saves/trained_models/<run>.model')
    encoder = torch.hub.load(REPO_DIR, 'encoder', source='local', checkpoint='Res12-pre.pth', network_name='resnet')

A train.py checkpoint carries its network and the model's flags, which are used; without a checkpoint the
model is freshly initialised from ``network_name`` and the flags given (e.g. ``tau=2``). Models come in eval
mode, on the CPU. Images go in as ``dataloader.eval_transform()`` makes them: (B, 3, 84, 84), normalised.
"""
dependencies = ['torch', 'torchvision', 'numpy', 'PIL']


def _model(model_name: str, checkpoint, network_name: str, flags: dict):
    from arguments import MODEL_FLAGS, parse_args
    from harness.checkpoints import load_model_checkpoint, read_file
    from harness.runs import model_config
    from models import model_on
    from networks import build_encoder
    config = (read_file(checkpoint, 'checkpoint').get('config') or {}) if checkpoint else {}
    args = parse_args(['--model_name', model_name, '--network_name', config.get('network_name', network_name)])
    for flag in MODEL_FLAGS[model_name]:
        setattr(args, flag, flags.pop(flag, config.get(flag, getattr(args, flag))))
    if flags:
        raise TypeError(f'{model_name} has no flag {next(iter(flags))} (its flags: {", ".join(MODEL_FLAGS[model_name])})')
    encoder = build_encoder(args.network_name)
    model = model_on(args, encoder, encoder.out_dim)
    if checkpoint:
        load_model_checkpoint(model, checkpoint, model_config(args))
    return model.eval()


def glofa(checkpoint: str = None, network_name: str = 'resnet', **flags):
    """GLoFA (models.glofa.GLoFA): a train.py checkpoint's, or a fresh one with GLoFA's ``flags``."""
    return _model('glofa', checkpoint, network_name, flags)


def protonet(checkpoint: str = None, network_name: str = 'resnet', **flags):
    """ProtoNet (models.protonet.ProtoNet): a train.py checkpoint's, or on a fresh encoder."""
    return _model('protonet', checkpoint, network_name, flags)


def feat(checkpoint: str = None, network_name: str = 'resnet', **flags):
    """FEAT (models.feat.FEAT): a train.py checkpoint's, or a fresh one."""
    return _model('feat', checkpoint, network_name, flags)


def encoder(checkpoint: str = None, network_name: str = 'resnet'):
    """The encoder alone, (B, 3, 84, 84) -> (B, d): from pretrained weights (FEAT's files, pretrain.py's) or from a
    train.py checkpoint (its encoder's tensors), else freshly initialised."""
    from harness.checkpoints import load_encoder_weights, read_file
    from networks import build_encoder
    if checkpoint:
        config = read_file(checkpoint, 'weights')
        network_name = (config.get('config') or {}).get('network_name', network_name) if isinstance(config, dict) \
            else network_name
    model = build_encoder(network_name)
    if checkpoint:
        load_encoder_weights(model, checkpoint, network_name)
    return model.eval()
