"""The architecture (STYLE.md, "Our shape"): a strict stack of packages checked by import-linter's
contracts in pyproject.toml, no import cycle between any two modules, and click only in the scripts."""

import ast
import os
import shutil
import subprocess
import sys

import grimp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ['evaluation', 'sampling', 'training', 'torch_utils', 'dnnlib']

def test_import_linter_contracts_hold():
    exe = shutil.which('lint-imports')
    if exe is None:
        pytest.fail('lint-imports is not installed: pip install import-linter')
    r = subprocess.run([exe], cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'BROKEN' not in r.stdout and 'KEPT' in r.stdout

def _cycles(graph, modules):
    """Every module that can reach itself through imports (a cycle), with one such path."""
    found = {}
    for m in modules:
        for imported in graph.find_modules_directly_imported_by(m):
            if imported in modules:
                chain = graph.find_shortest_chain(importer=imported, imported=m)
                if chain:
                    found[m] = (m,) + tuple(chain)
    return found

def test_no_import_cycle():
    sys.path.insert(0, REPO)
    graph = grimp.build_graph(*PACKAGES)
    modules = {m for m in graph.modules if m.split('.')[0] in PACKAGES}
    assert not _cycles(graph, modules)

def test_cycle_check_finds_a_cycle(tmp_path):
    # The check itself: two modules of a made-up package that import each other.
    pkg = tmp_path / 'cyclepkg'
    pkg.mkdir()
    (pkg / '__init__.py').write_text('')
    (pkg / 'a.py').write_text('from cyclepkg import b\n')
    (pkg / 'b.py').write_text('import cyclepkg.a\n')
    sys.path.insert(0, str(tmp_path))
    try:
        graph = grimp.build_graph('cyclepkg', cache_dir=None)
    finally:
        sys.path.remove(str(tmp_path))
    assert set(_cycles(graph, {'cyclepkg.a', 'cyclepkg.b'})) == {'cyclepkg.a', 'cyclepkg.b'}

def test_click_only_in_top_level_scripts():
    offenders = []
    for pkg in PACKAGES:
        for root, _, files in os.walk(os.path.join(REPO, pkg)):
            for name in files:
                if name.endswith('.py'):
                    path = os.path.join(root, name)
                    tree = ast.parse(open(path, encoding='utf-8').read())
                    for node in ast.walk(tree):
                        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                                [node.module or ''] if isinstance(node, ast.ImportFrom) else []
                        if any(n.split('.')[0] in ('click', 'gradio') for n in names):
                            offenders.append(os.path.relpath(path, REPO))
    assert not offenders, offenders
