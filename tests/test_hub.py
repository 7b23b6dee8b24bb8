"""hubconf.py: torch.hub.load(repo, ..., source='local') gives the trained model, the encoder alone, or a fresh one."""
import os

import pytest
import torch

import train
from conftest import pretrained_file, tiny_run_flags
from harness.checkpoints import atomic_save, build_model, load_model_checkpoint
from arguments import parse_args
from base.console import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hub(entry: str, **kwargs):
    return torch.hub.load(REPO, entry, source='local', trust_repo=True, **kwargs)


@pytest.fixture(scope='module')
def trained(tiny_dataset, tmp_path_factory):
    flags = tiny_run_flags(tiny_dataset, tmp_path_factory.mktemp('hub'), '--tau', '2', '--delta', '0.5')
    return flags, train.main(flags)['paths'].best


def test_glofa_from_a_checkpoint_is_the_trained_model(trained):
    flags, path = trained
    model = hub('glofa', checkpoint=path)
    assert (model.tau, model.delta, model.training) == (2.0, 0.5, False)  # the run's flags, from its record
    args = parse_args(flags)
    reference = build_model(args, pretrained=False)
    load_model_checkpoint(reference, path, args)
    reference.eval()
    images = torch.randn(2 * 3, 3, 84, 84, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sets = [model.encode(images[[n, n + 2]]) for n in range(2)]  # two classes of two support images
        logits, adaptation = model.logits_for_sets(sets, model.encode(images[4:]))
        expected, _ = reference.logits_for_sets([reference.encode(images[[n, n + 2]]) for n in range(2)],
                                                reference.encode(images[4:]))
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert logits.shape == (2, 2) and adaptation.alpha.shape == (2,) and adaptation.m_cls.shape == (2, 64)


def test_the_encoder_alone_from_pretrained_weights_and_from_a_checkpoint(trained, tmp_path):
    expected = pretrained_file(tmp_path / 'con-pre.pth')
    encoder = hub('encoder', checkpoint=str(tmp_path / 'con-pre.pth'), network_name='convnet')
    for key, value in expected.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key
    model = hub('glofa', checkpoint=trained[1])
    encoder = hub('encoder', checkpoint=trained[1])  # the network is read from the checkpoint's record
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key


def test_a_file_without_a_record_gets_the_network_its_tensors_fit(tmp_path):
    """FEAT's checkpoints hold {'params': ...} and no config: the Conv-4 they fit is found, not the default ResNet-12."""
    torch.manual_seed(4)
    expected = build_model(parse_args(['--network_name', 'convnet', '--model_name', 'feat']), pretrained=False)
    atomic_save({'params': expected.state_dict()}, str(tmp_path / 'feat.pth'))
    model = hub('feat', checkpoint=str(tmp_path / 'feat.pth'))
    assert model.encoder.out_dim == 64
    for key, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    atomic_save({'params': {'encoder.other.weight': torch.zeros(3)}}, str(tmp_path / 'other.pth'))
    with pytest.raises(UserError, match='other.pth'):
        hub('protonet', checkpoint=str(tmp_path / 'other.pth'))


def test_a_fresh_model_takes_its_flags_and_refuses_others():
    model = hub('glofa', network_name='convnet', tau=3.0)
    assert model.tau == 3.0 and model.encoder.out_dim == 64
    with pytest.raises(TypeError, match='metric'):
        hub('glofa', network_name='convnet', metric='cosine')
    assert hub('protonet', network_name='convnet', metric='cosine').metric == 'cosine'
