"""The README's "Use it from Python" snippet runs as written, from another folder, on a trained checkpoint."""
import os
import re
import subprocess
import sys

import train
from conftest import tiny_run_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_snippet() -> str:
    with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
        text = f.read()
    section = text[text.index('## Use it from Python'):]
    return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_the_readme_snippet_runs_as_written(tiny_dataset, tmp_path):
    checkpoint = train.main(tiny_run_flags(tiny_dataset, tmp_path / 'saves', '--normalization', 'feat'))['paths'].best
    snippet = readme_snippet()
    assert "'path/to/GLoFA'" in snippet and "'saves/trained_models/<run>.model'" in snippet
    code = snippet.replace("'path/to/GLoFA'", repr(REPO)).replace("'saves/trained_models/<run>.model'",
                                                                   repr(str(checkpoint)))
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, '-c', code], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'})
    assert done.returncode == 0, done.stderr
    assert 'torch.Size([64])' in done.stdout and 'torch.Size([3, 64])' in done.stdout
