"""What a command writes beside its report (--json figures, pictures, a study's folder), and the rule that keeps
it off the command's inputs and off any file of the user's: every such file carries OUTPUT_MARK."""
import csv
import json
import os
import re
import stat
from typing import Optional, Sequence

from base.console import UserError
from base.files import atomic_write, check_output_folder


# Every JSON file and picture the programs write carries this mark (a CSV, its header): an existing file
# with it is theirs to replace; any other existing file is replaced only with --overwrite.
OUTPUT_MARK = 'GLoFA-reproduction'


FOLDER_MARK = '.glofa-output'  # in a folder of outputs (a study's --out): the folder is the programs'


PICTURE_FORMATS = {'.png': 'Software', '.pdf': 'Creator', '.svg': 'Creator'}  # and the metadata key of the mark


TEMPORARY_SUFFIX = len('..') + 8 + len('.part')  # what atomic_write's temporary name adds to the file name


def check_file_name(path: str, flag: str) -> None:
    """Before any work, that ``path`` can be written as a file here (one line naming ``flag`` otherwise): a file
    name, not a folder or a name ending in a separator; short enough for its temporary name (``atomic_write``);
    nothing there, or a regular file (a pipe or a device is never read or replaced); '-' is not standard output."""
    if path == '-':
        raise UserError(f'{flag} -: the output is written to a file, not to standard output; give a file name')
    if path.endswith(('/', os.sep)) or os.path.isdir(path):
        raise UserError(f'{flag} {path} is a folder, not a file name: give a file name, e.g. '
                        f'{os.path.join(path, "out.json")}')
    name = os.path.basename(path)
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        limit = os.pathconf(folder, 'PC_NAME_MAX')
    except (OSError, ValueError, AttributeError):
        limit = 255
    if len(os.fsencode(name)) + TEMPORARY_SUFFIX > limit:
        raise UserError(f'{flag} {path}: the file name is {len(os.fsencode(name))} bytes long, and this folder takes '
                        f'{limit - TEMPORARY_SUFFIX} at most (the file is first written under a longer temporary '
                        f'name): choose a shorter name')
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise UserError(f'{flag} {path} is not a regular file (a pipe, a device or a socket): the output is written '
                        f'whole to a file; give a file name')


def written_here(path: str, header: Optional[Sequence[str]] = None) -> bool:
    """Whether ``path`` was written by these programs, by its structure: a JSON object whose top-level
    'written_by' is OUTPUT_MARK; a picture whose metadata field (PICTURE_FORMATS) is OUTPUT_MARK; a CSV whose header
    row starts with ``header``. Never by the mark appearing somewhere in the file."""
    extension = os.path.splitext(path)[1].lower()
    try:
        if header is not None:
            with open(path, newline='', encoding='utf-8') as f:
                return next(csv.reader(f), [])[:len(header)] == list(header)
        if extension == '.json':
            with open(path, encoding='utf-8') as f:
                content = json.load(f)
            return isinstance(content, dict) and content.get('written_by') == OUTPUT_MARK
        if extension == '.png':
            from PIL import Image
            with Image.open(path) as image:
                return image.info.get(PICTURE_FORMATS['.png']) == OUTPUT_MARK
        if extension in ('.pdf', '.svg'):
            with open(path, 'rb') as f:
                content = f.read(1 << 24)
            field = (rb'/Creator \(' + re.escape(OUTPUT_MARK.encode()) + rb'\)' if extension == '.pdf' else
                     rb'<dc:creator>\s*<cc:Agent>\s*<dc:title>' + re.escape(OUTPUT_MARK.encode()) + rb'</dc:title>')
            return re.search(field, content) is not None
    except (OSError, ValueError, UnicodeDecodeError, StopIteration):
        return False
    return False


def check_output(path: str, flag: str, inputs: Sequence[str] = (), overwrite: Optional[bool] = None,
                 formats: Optional[Sequence[str]] = None, header: Optional[Sequence[str]] = None) -> None:
    """The one rule for a file a program writes, checked before any work (one line naming ``flag`` and the path
    otherwise): a name that can be written (``check_file_name``); not one of the command's ``inputs`` (every
    file it reads; the same file by any name, a link too), with or without --overwrite; a file name ending in one
    of ``formats`` when given; new, or written by these programs (``written_here``; ``header``: a CSV's), or
    ``overwrite`` (the command's --overwrite; None for a command without one); its folder writable."""
    check_file_name(path, flag)
    if formats and os.path.splitext(path)[1].lower() not in formats:
        raise UserError(f'{flag} {path}: expected a file ending in {" or ".join(formats)}')
    if os.path.exists(path):  # the same file as an input, by any name (a link, a hard link)
        target = os.stat(path)
        for given in inputs:
            try:
                info = os.stat(given)
            except (OSError, TypeError, ValueError):
                continue
            if (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino):
                raise UserError(f'{flag} {path} is an input of this command ({given}): refused, nothing written '
                                f'(choose another file)')
    if os.path.lexists(path) and not overwrite and not written_here(path, header):
        instead = 'remove it first' if overwrite is None else 'add --overwrite'
        raise UserError(f'{flag} {path} exists and was not written by this program: refused, so nothing of yours is '
                        f'replaced (choose another file, or {instead})')
    check_output_folder(os.path.dirname(path) or '.', flag)


def claim_output_folder(path: str, flag: str) -> None:
    """Before any work: ``path`` is a new or empty folder, or one a program of this repository made (it holds
    FOLDER_MARK), and can be written; it is marked as theirs. Anything else is refused, naming it."""
    mark = os.path.join(path, FOLDER_MARK)
    if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(mark):
        raise UserError(f'{flag} {path} is not empty and was not made by this program (no {FOLDER_MARK} file): '
                        f'refused, so nothing of yours is replaced; choose a new or empty folder')
    check_output_folder(path, flag)
    if not os.path.isfile(mark):
        atomic_write(mark, lambda f: f.write(OUTPUT_MARK + '\n'), binary=False)


def write_json(path: str, obj: dict) -> None:
    """A JSON output, atomically, carrying OUTPUT_MARK (under 'written_by')."""
    atomic_write(path, lambda f: json.dump({**obj, 'written_by': OUTPUT_MARK}, f, indent=1), binary=False)


def save_figure(figure, path: str) -> None:
    """Write a matplotlib figure to ``path`` atomically, carrying OUTPUT_MARK in its metadata (matplotlib is
    imported by the caller); its format is that of the name's extension (PICTURE_FORMATS)."""
    extension = os.path.splitext(path)[1].lower()
    key = PICTURE_FORMATS.get(extension, 'Software')
    atomic_write(path, lambda f: figure.savefig(f, format=extension[1:] or 'png', metadata={key: OUTPUT_MARK}))


def command_inputs(args, *datasets) -> list[str]:
    """What no output of a command may be (``check_output``): its weights files and every file of its data."""
    weights = [getattr(args, flag, None) for flag in ('pretrained', 'model_path')]
    return [p for p in weights if p and p.lower() != 'none'] + [path for d in datasets for path in d.files()]


def write_figures(path: str, settings: list[dict], **extra) -> None:
    """Write the figures of one or more settings to a JSON file (its folder is created)."""
    write_json(path, {**extra, 'settings': settings})
