"""Shared fixtures: a small dataset in the real on-disk format (written by demo.py, the one writer), the spec's
keys; and ``exits_with``, how the tests run an entry point that must stop."""
import pytest

from demo import write_colour_dataset


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory):
    """4 / 3 / 3 classes of 6 images: enough for 3-way episodes with K + Q <= 6."""
    return write_colour_dataset(tmp_path_factory.mktemp('data') / 'tiny')


@pytest.fixture(scope='session')
def spec_encoder_keys() -> set:
    """The state-dict keys of the ResNet-12, as the spec lists them."""
    keys = set()
    for i in range(1, 5):
        for conv in ('conv1', 'conv2', 'conv3', 'downsample.0'):
            keys.add(f'layer{i}.0.{conv}.weight')
        for bn in ('bn1', 'bn2', 'bn3', 'downsample.1'):
            for name in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'):
                keys.add(f'layer{i}.0.{bn}.{name}')
    return keys


@pytest.fixture(scope='session')
def spec_model_keys(spec_encoder_keys) -> set:
    """The state-dict keys of GLoFA on the ResNet-12, as the spec lists them."""
    keys = {f'encoder.{k}' for k in spec_encoder_keys}
    for f in ('f_task', 'f_class', 'h'):
        for part in ('psi', 'rho'):
            for layer in (0, 2):
                for name in ('weight', 'bias'):
                    keys.add(f'{f}.{part}.{layer}.{name}')
    return keys


def exits_with(main, argv, capsys, code=2) -> str:
    """Run an entry point's ``main(argv)``, which must exit with ``code`` (2: a user mistake, 130: an
    interrupt) and no traceback; returns the last line it printed on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    return err.strip().splitlines()[-1]
