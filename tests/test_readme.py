"""docs/flags.md and docs/pretrain.md document every flag, and CI runs the test command the README gives."""
import os
import re

from arguments import get_parser
from pretrain import get_pretrain_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_every_flag_is_in_the_flag_table():
    table = read(os.path.join('docs', 'flags.md'))
    for action in get_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith('--') and flag != '--help':
                assert f'| `{flag}` |' in table, flag


def test_ci_runs_the_readme_commands():
    readme, ci = read('README.md'), read('.ci/run')
    assert 'python -m pytest -q' in readme and 'python -m pytest -q' in ci
    assert 'pip install -r requirements.txt' in readme and '-r requirements.txt' in ci


def documented_default(action) -> str:
    """A parser default as the flag tables write it."""
    if action.dest == 'n_workers':
        return 'min(8, CPUs)'
    if action.default is False:
        return 'off'
    if isinstance(action.default, list):
        return ' '.join(map(str, action.default))
    return str(action.default)


def test_pretrain_flag_table_matches_its_parser():
    rows = dict(re.findall(r'^\| `(--\w+)` \| `([^`]*)` \|', read(os.path.join('docs', 'pretrain.md')), flags=re.M))
    actions = {a.option_strings[0]: a for a in get_pretrain_parser()._actions if a.option_strings[0] != '-h'}
    assert set(rows) == set(actions)
    for flag, action in actions.items():
        if action.default is not None:  # None: a default that depends on other flags, explained in the table
            assert rows[flag] == documented_default(action), flag
