"""A model rebuilt from a checkpoint's record, as torch.hub (hubconf.py) and scripts/classify.py load one: its flags
as it was trained (``checkpoints.as_trained``), checked as the command line checks them, then the model."""
import contextlib
import io
import os

from arguments import DOMAINS, MODEL_FLAGS, check_domains, parse_args
from base.console import UserError
from harness.checkpoints import (as_trained, build_model, fitting_network, load_model_checkpoint, model_of,
                                 read_checkpoint)
from networks import NETWORKS


def resolve(checkpoint, model_name: str = None, network_name: str = None, normalization: str = None,
            flags: dict = None, say: bool = True) -> tuple:
    """(train.py's flags of the model in ``checkpoint``, its (record, state dict)): as it was trained (its record's;
    a flag given here wins and is named; a file without a record gets the network its tensors fit); ``flags``: the
    model's own (e.g. tau=2). No checkpoint: the defaults and the flags given, and None. Every flag is checked as the
    command line checks it (one UserError naming it); ``say``: print as_trained's notes."""
    flags = flags or {}
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
    model = build_model(args, pretrained=checkpoint is None)
    if checkpoint:
        load_model_checkpoint(model, checkpoint, args, read)
    return model.eval()
