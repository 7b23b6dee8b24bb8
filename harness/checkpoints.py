"""Weights: atomic saves, strict loading with one-line errors, and a model built from its flags and weights."""
import hashlib
import io
import os
from typing import Any, Optional

import torch
import torch.nn as nn

from base.console import UserError
from base.files import atomic_write
from models import FewShotModel, model_on
from networks import NETWORKS, build_encoder


# BLAKE2b of the bytes each file was read from, by real path: what this process loaded, even if the file
# has been replaced since (a stored embedding is keyed by the weights that made it)
LOADED_DIGESTS: dict = {}


def weights_digest(path: str) -> str:
    """A weights file's digest as this process loaded it, else as it is now: how weights are known by content."""
    loaded = LOADED_DIGESTS.get(os.path.realpath(path))
    if loaded is not None:
        return loaded
    digest = hashlib.blake2b(digest_size=20)
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_save(obj: Any, path: str) -> None:
    """torch.save, whole or not at all (``atomic_write``)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def strip_module(state_dict: dict) -> dict:
    """Remove DataParallel's ``module.`` parts from every key."""
    return {k.replace('module.', ''): v for k, v in state_dict.items()}


def model_state_dict(model: nn.Module) -> dict:
    """The model's state dict with the spec's keys, also when the encoder is wrapped in DataParallel."""
    return strip_module(model.state_dict())


def read_file(path: str, what: str, weights_only: bool = True) -> Any:
    """A torch file, read once into memory and loaded from those bytes (their digest kept in LOADED_DIGESTS);
    anything that is not such a file is one line naming it."""
    if not os.path.isfile(path):
        raise UserError(f'{what} {path} not found')
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as error:
        raise UserError(f'{what} {path} cannot be read ({error.strerror or error})') from None
    LOADED_DIGESTS[os.path.realpath(path)] = hashlib.blake2b(data, digest_size=20).hexdigest()
    try:
        return torch.load(io.BytesIO(data), map_location='cpu', weights_only=weights_only)
    except Exception as error:  # noqa: BLE001 (torch's loader raises many kinds on a file that is not its own)
        text = str(error).strip()
        reason = text.splitlines()[0].split('. ')[0].rstrip('.') if text else type(error).__name__
        if 'Weights only load failed' in text and 'unsupported global' in text.lower():
            raise UserError(f'{what} {path} holds objects other than tensors and plain containers, which could run '
                            f'code when read: refused (read with weights_only=True)') from None
        raise UserError(f'{what} {path} is not a PyTorch checkpoint ({reason})') from None


def load_strict(module: nn.Module, state_dict: dict, path: str, what: str) -> int:
    """Load every tensor of ``module`` (BatchNorm's counters may be absent), or a UserError naming the key at fault;
    the number of tensors loaded."""
    own = module.state_dict()
    actual = {k.replace('module.', ''): k for k in own}  # keys of DataParallel-wrapped parts
    expected = {k: own[a] for k, a in actual.items()}
    missing = [k for k in expected if k not in state_dict and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        raise UserError(f'{what} {path} lacks key {missing[0]} ({len(missing)} of {len(expected)} tensors missing; '
                        f'was it written for another network?)')
    if unexpected:
        raise UserError(f'{what} {path} has unexpected key {unexpected[0]} ({len(unexpected)} unexpected; '
                        f'was it written for another network?)')
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise UserError(f'{what} {path}: key {k} holds a {type(v).__name__}, not a tensor')
        if v.shape != expected[k].shape:
            raise UserError(f'{what} {path}: key {k} has shape {tuple(v.shape)}, the model expects '
                            f'{tuple(expected[k].shape)} (was it written for another network?)')
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise UserError(f'{what} {path}: tensor {k} holds {bad} non-finite value{"s" if bad > 1 else ""} (nan or '
                            f'inf): the file is damaged, or was saved by a run that diverged')
    module.load_state_dict({actual[k]: v for k, v in state_dict.items()}, strict=False)
    return len(state_dict)


def tensors_of(obj: Any) -> Optional[dict]:
    """The state dict inside a file: FEAT's {'params': ...}, a {'state_dict': ...} record, or a bare one."""
    if isinstance(obj, dict):
        for key in ('params', 'state_dict', 'model'):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    return None


def load_pretrained(encoder: nn.Module, path: str) -> int:
    """``encoder`` from pretrained weights, strictly, anything else dropped: FEAT's {'params': {'encoder.<...>'}},
    a bare state dict, DataParallel's ``module.`` keys, keys without ``encoder.``. The number loaded."""
    state = tensors_of(read_file(path, 'pretrained weights'))
    if state is None:
        raise UserError(f'pretrained weights {path} hold no state dict (expected a dict of tensors or {{"params": ...}})')
    state = strip_module(state)
    own = set(encoder.state_dict())
    prefixed = {k[len('encoder.'):]: v for k, v in state.items() if k.startswith('encoder.')}
    bare = {k: v for k, v in state.items() if k in own}  # an encoder's own keys; a classifier is dropped
    # the encoder's own keys may start with 'encoder.' too (Conv-4): take the reading that fits best
    state = max((prefixed, bare), key=lambda s: len(own.intersection(s)))
    if not own.intersection(state):
        state = prefixed
    if not state:
        raise UserError(f'pretrained weights {path} hold no encoder tensors (expected keys like '
                        f'encoder.{next(iter(own))} or {next(iter(own))})')
    return load_strict(encoder, state, path, 'pretrained weights')


def check_config(record: dict, config: dict, path: str) -> None:
    """Refuse a checkpoint whose recorded configuration (network, N, K, ...) differs from this run's."""
    saved = record.get('config')
    if isinstance(saved, dict):
        for key, value in config.items():
            if key in saved and saved[key] != value:
                raise UserError(f'checkpoint {path} was trained with {key} = {saved[key]}, '
                                f'but this run has {key} = {value}')


# the parameters that tell the models' checkpoints apart (the encoder's are everybody's)
HEAD_KEYS = {'glofa': 'f_task.', 'feat': 'slf_attn.'}


def model_of(state_dict: dict) -> str:
    """Which model a state dict is of: glofa (f_task.*), feat (slf_attn.*), else protonet (the encoder alone)."""
    for name, prefix in HEAD_KEYS.items():
        if any(k.startswith(prefix) for k in state_dict):
            return name
    return 'protonet'


def read_checkpoint(path: str) -> tuple[dict, dict]:
    """A model checkpoint's record and its state dict (``module.`` parts removed), or a UserError naming the file."""
    record = read_file(path, 'checkpoint')
    state = tensors_of(record)
    if state is None:
        raise UserError(f"checkpoint {path} is not a model checkpoint (expected a dict with a 'state_dict' "
                        f"or FEAT's 'params')")
    return record, strip_module(state)


def as_trained(args, record: dict, path: str) -> list[str]:
    """Set on ``args`` the settings ``path`` was trained with (its record's config): the model, network and image
    normalisation, and the model's own flags (tau, delta, ...). A flag the user gave (``args.given``) wins and is
    named; a setting the record lacks (an older file, FEAT's) keeps the flag's value, and is named too. The
    lines to print, one per kind."""
    from arguments import MODEL_FLAGS
    config = record.get('config') if isinstance(record.get('config'), dict) else {}
    given = getattr(args, 'given', set())
    if 'model_name' in config and 'model_name' not in given and config['model_name'] in MODEL_FLAGS:
        args.model_name = config['model_name']
    differ, lacking = [], []
    for flag in ('network_name', 'normalization', *MODEL_FLAGS[args.model_name]):
        if flag not in config:
            lacking.append(f'--{flag} {getattr(args, flag)}')
        elif flag in given and config[flag] != getattr(args, flag):
            differ.append(f'--{flag} {getattr(args, flag)} (trained with {config[flag]})')
        else:
            setattr(args, flag, config[flag])
    lines = []
    if differ:
        lines.append(f'note: evaluating {path} with {", ".join(differ)}, as given, not as it was trained')
    if lacking:
        lines.append(f'note: {path} does not record {"these settings" if len(lacking) > 1 else "this setting"}: '
                     f'using {", ".join(lacking)}')
    return lines


def load_model_checkpoint(model: nn.Module, path: str, args=None, read: Optional[tuple] = None) -> dict:
    """Load a checkpoint into ``model``: train.py's record {'state_dict', 'validating_accuracy', 'epoch', 'config'},
    a 'last' state, or FEAT's {'params': ...}; with ``args``, its network and model must be theirs (no parameter
    depends on N, K, Q or on the flags that only change the logits: those are evaluated as given). The record.
    ``read``: the file's (record, state dict) when ``read_checkpoint`` has read it already."""
    record, state = read or read_checkpoint(path)
    if args is not None:
        check_config(record, {'network_name': args.network_name, 'model_name': args.model_name}, path)
        held = model_of(state)
        if held != args.model_name:
            raise UserError(f'checkpoint {path} holds a {held} model, not {args.model_name}: pass --model_name {held}')
    load_strict(model, state, path, 'checkpoint')
    config = record.get('config') if isinstance(record.get('config'), dict) else {}
    if isinstance(config.get('N'), int) and isinstance(config.get('K'), int):  # the model's call: trained as N-way K-shot
        model.n_way, model.n_shot = config['N'], config['K']
    return record


FEAT_WEIGHTS = {'resnet': 'Res12-pre.pth', 'convnet': 'con-pre.pth'}


# ------------------------------------------------------------------ model
def build_model(args, pretrained: bool = True) -> FewShotModel:
    """--model_name on the chosen encoder; with ``pretrained``, the encoder starts from --pretrained."""
    encoder = build_encoder(args.network_name)
    if pretrained and args.pretrained.lower() != 'none':
        if not os.path.isfile(args.pretrained):
            raise UserError(f'pretrained weights {args.pretrained} not found: download FEAT\'s '
                            f'{FEAT_WEIGHTS[args.network_name]} (github.com/Sha-Lab/FEAT) and pass --pretrained PATH, '
                            f'or use --pretrained none to train from scratch')
        n = load_encoder_weights(encoder, args.pretrained, args.network_name)
        print(f'loaded {n} encoder tensors from {args.pretrained}')
    return model_on(args, encoder, encoder.out_dim)


def build_optimizer(args, model) -> torch.optim.SGD:
    """SGD with Nesterov momentum: the encoder at --lr_network, the head (GLoFA's three set functions, FEAT's
    attention layer) at --lr; ProtoNet has the encoder's group only."""
    head = model.head_parameters()
    return torch.optim.SGD([{'params': list(model.encoder.parameters()), 'lr': args.lr_network}]
                           + ([{'params': head, 'lr': args.lr}] if head else []),
                           momentum=args.mo, nesterov=True, weight_decay=args.wd)


def load_encoder_weights(encoder: nn.Module, path: str, network_name: str) -> int:
    """load_pretrained, and for a file that does not fit: the --network_name it does fit, when there is one."""
    try:
        return load_pretrained(encoder, path)
    except UserError:
        other = fitting_network(path, [name for name in NETWORKS if name != network_name])
        if other is not None:
            raise UserError(f'pretrained weights {path} hold a {other} encoder, not a {network_name} one: pass '
                            f'--network_name {other}') from None
        raise


def fitting_network(path: str, networks=NETWORKS) -> Optional[str]:
    """The first of ``networks`` whose encoder the file's tensors fit (``load_pretrained``), or None."""
    for name in networks:
        try:
            load_pretrained(build_encoder(name), path)
            return name
        except UserError:
            continue
    return None
