"""A DataParallel-wrapped encoder keeps the spec's checkpoint keys and loads plain checkpoints."""
import torch
import torch.nn as nn
from harness.checkpoints import load_strict, model_state_dict
from models.glofa import GLoFA
from networks.convnet import ConvNet


def test_wrapped_encoder_saves_and_loads_plain_keys():
    plain = GLoFA(ConvNet(), 64)
    wrapped = GLoFA(ConvNet(), 64)
    wrapped.encoder = nn.DataParallel(wrapped.encoder)
    assert any('.module.' in k for k in wrapped.state_dict())
    saved = model_state_dict(wrapped)
    assert saved.keys() == plain.state_dict().keys()
    load_strict(wrapped, model_state_dict(plain), 'plain.model', 'checkpoint')
    reloaded = model_state_dict(wrapped)
    for key, value in plain.state_dict().items():
        assert torch.equal(reloaded[key], value), key
