"""docs/flags.md documents every flag, and CI runs the test command the README gives."""
import os

from arguments import get_parser

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
