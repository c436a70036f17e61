"""The bad-input table of issues 10 and 21 (tests/scripts/bad_input_table.py): at least 150 cases over
every script, in ten classes; prints the table, and fails if a case that no other branch owns is not ok
(a clear one-line error, or success for fine input)."""

import importlib.util
import os
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), 'scripts', 'bad_input_table.py')

def _table():
    spec = importlib.util.spec_from_file_location('bad_input_table', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

@pytest.mark.skipif(sys.platform == 'win32', reason='FIFOs, SIGALRM and process groups are POSIX')
def test_bad_input_table(tmp_path, capsys):
    table = _table()
    with capsys.disabled():
        print()
        rows = table.run(str(tmp_path / 'work'))
    assert len(rows) >= 150
    assert {row.case.cls for row in rows} == set(range(1, 11))
    failed = [table.format_row(row) for row in rows if row.outcome != 'ok']
    assert not failed, '\n'.join(failed)
