"""The library names no command-line flag: below the scripts, messages name keyword arguments and files,
and the scripts (cli.py) turn library errors into usage errors that name the flags.

Every string literal of training/, sampling/, evaluation/ and torch_utils/ that is not a docstring (error
messages, hints, tables of descriptions) is scanned for a `--flag`. Comments and docstrings may say which
script option feeds an argument: they are documentation, not messages."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ('training', 'sampling', 'evaluation', 'torch_utils')
FLAG = re.compile(r'(?<![\w-])--[a-z][\w-]*')

# Other programs' command lines that a message may quote (pip's own options are not ours).
FOREIGN = re.compile(r'pip install [^\n]*')

# Files known to still name flags (strict xfail: once clean, the marker must go). None now.
PENDING = {}

def _files():
    return sorted(str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob('*.py'))

# (line, text) of every non-docstring string literal of a module that names a --flag.
def flags_in(source):
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.add(id(first.value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            and FLAG.search(FOREIGN.sub('', node.value))]

def test_scanner_finds_flags_in_messages_not_in_docstrings():
    source = '''"""Module doc: generate.py --seeds feeds `seeds`."""
def f(x):
    """Doc --x."""
    # comment --y
    if x:
        raise ValueError(f'bad {x}: pass --trust-pickle')
    HINT = 'use --resume'
    return 'a -- b', 'x--y', '-1'
'''
    assert sorted(line for line, _ in flags_in(source)) == [6, 7]

@pytest.mark.parametrize('path', [pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=PENDING[p])) if p in PENDING else p
                                  for p in _files()])
def test_library_messages_name_no_flags(path):
    found = flags_in((ROOT / path).read_text())
    assert not found, f'{path} names command-line flags: ' + '; '.join(f'line {n}: {t[:80]!r}' for n, t in found)

# ----------------------------------------------------------------------------
# The scripts name the flags: a library ValueError becomes a usage error about the options that caused it.

def test_zscg_uses_generate_chooser_rule():
    from click.testing import CliRunner
    import zscg
    result = CliRunner().invoke(zscg.main, ['--network', 'unused', '--temperature', '0.3', '--topk', '2'])
    assert result.exit_code == 2 and '--temperature/--topk' in result.output and 'give one of them' in result.output

def test_generate_names_the_missing_guide_option():
    import cli
    import dnnlib
    from click import UsageError
    opts = dnnlib.EasyDict(guide='inpaint', guide_image=None, guide_mask=None, guide_bits=None, guide_classifier=None,
                           class_idx=None, guide_text=None, guide_style=None, guide_features=None)
    net = dnnlib.EasyDict(img_channels=1, img_resolution=8)
    with pytest.raises(UsageError, match=r"guide 'inpaint' .* needs --guide-image and --guide-mask$"):
        cli.build_guide(opts, net, 'cpu')
