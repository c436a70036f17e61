"""Only what we wrote is ever replaced (issue 21, class 4): generate.py --force deletes only the files an
earlier generate.py run recorded in its generation_options.json; compress.py and fid.py refuse an existing
output of another kind, with or without --force, and replace their own only with --force."""

import json
import os

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import compress
import fid
import generate
from evaluation import metrics


def _invoke(cli, args):
    return CliRunner().invoke(cli, [str(a) for a in args])

def _refused(cli, args, message):
    result = _invoke(cli, args)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output + repr(result.exception)
    assert message in result.output, result.output
    return result.output

# Every file under a folder with its bytes (what must survive a refused command).
def _contents(folder):
    return {os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), 'rb').read()
            for root, _dirs, names in os.walk(folder) for name in names}

def _user_pngs(folder, num=10):
    folder.mkdir()
    for i in range(num):
        PIL.Image.fromarray(np.full((4, 4), 10 * i, np.uint8)).save(folder / f'{i:06d}.png')
    return _contents(folder)

# A folder of the user's own 000000.png..000009.png was never a generate.py run: --force leaves it alone.
def test_generate_force_refuses_a_folder_that_is_not_a_generate_run(net_file, tmp_path):
    mine = _user_pngs(tmp_path / 'mine')
    _refused(generate.main, ['--network', net_file, '--outdir', tmp_path / 'mine', '--seeds', '0-3', '--force'],
             'is not the folder of an earlier generate.py run')
    assert _contents(tmp_path / 'mine') == mine

# In a generate.py folder, --force removes exactly what the earlier run wrote (with --subdirs too), and
# refuses when the folder also holds a file of someone else.
def test_generate_force_replaces_only_the_recorded_files(net_file, tmp_path):
    out = tmp_path / 'out'
    assert _invoke(generate.main, ['--network', net_file, '--outdir', out, '--seeds', '0-9,998-1001', '--subdirs']).exit_code == 0
    options = json.loads((out / 'generation_options.json').read_text())
    assert options['images'] == '0-9,998-1001'
    (out / 'notes.txt').write_text('mine')
    before = _contents(out)
    _refused(generate.main, ['--network', net_file, '--outdir', out, '--seeds', '0-3', '--force'], 'e.g. notes.txt')
    assert _contents(out) == before
    os.remove(out / 'notes.txt')
    result = _invoke(generate.main, ['--network', net_file, '--outdir', out, '--seeds', '0-3', '--force'])
    assert result.exit_code == 0, result.output
    assert sorted(_contents(out)) == sorted(['generation_options.json', 'grid.png', 'latents.npz'] + [f'{i:06d}.png' for i in range(4)])

# compress.py decode into a generate.py folder would overwrite its PNGs and leave its latents.npz describing
# other images: refused, with or without --force. Its own earlier output is replaced with --force.
def test_compress_decode_refuses_a_generate_folder(net_file, tmp_path):
    codes = tmp_path / 'codes.bin'
    assert _invoke(compress.main, ['encode', '--network', net_file, '--data', 'digits', '--max-images', 4, '--out', codes]).exit_code == 0
    gen = tmp_path / 'gen'
    assert _invoke(generate.main, ['--network', net_file, '--outdir', gen, '--seeds', '0-9']).exit_code == 0
    before = _contents(gen)
    decode = ['decode', '--network', net_file, '--codes', codes, '--outdir', gen]
    _refused(compress.main, decode, 'is not empty')
    _refused(compress.main, [*decode, '--force'], 'is not the folder of an earlier compress.py decode run')
    assert _contents(gen) == before
    dec = tmp_path / 'dec'
    assert _invoke(compress.main, ['decode', '--network', net_file, '--codes', codes, '--outdir', dec]).exit_code == 0
    assert sorted(_contents(dec)) == ['000000.png', '000001.png', '000002.png', '000003.png', 'decode_options.json']
    _refused(compress.main, ['decode', '--network', net_file, '--codes', codes, '--outdir', dec], 'is not empty')
    assert _invoke(compress.main, ['decode', '--network', net_file, '--codes', codes, '--outdir', dec, '--force']).exit_code == 0
    # generate.py does not take over a decode folder either.
    _refused(generate.main, ['--network', net_file, '--outdir', dec, '--force'], 'is not the folder of an earlier generate.py run')

# compress.py encode --out: an existing file is kept without --force; --force replaces only a codes file.
def test_compress_encode_out_is_replaced_only_when_ours(net_file, tmp_path):
    encode = ['encode', '--network', net_file, '--data', 'digits', '--max-images', 2]
    thesis = tmp_path / 'thesis.bin'
    thesis.write_bytes(b'my own data')
    _refused(compress.main, [*encode, '--out', thesis], 'exists; choose a new name, or add --force')
    _refused(compress.main, [*encode, '--out', thesis, '--force'], 'is not a DDN codes file')
    assert thesis.read_bytes() == b'my own data'
    _refused(compress.main, [*encode, '--out', tmp_path], 'is a folder')
    codes = tmp_path / 'codes.bin'
    assert _invoke(compress.main, [*encode, '--out', codes]).exit_code == 0
    _refused(compress.main, [*encode, '--out', codes], 'add --force')
    assert _invoke(compress.main, [*encode, '--max-images', 3, '--out', codes, '--force']).exit_code == 0
    assert compress.read_codes_file(codes)[0].shape[0] == 3

# fid.py ref --dest and calc --out: an existing file is refused before any work; --force replaces
# only reference statistics (resp. a results file).
def test_fid_outputs_are_replaced_only_when_ours(tmp_path):
    other = tmp_path / 'other.npz'
    np.savez(other, weights=np.zeros(3))
    before = other.read_bytes()
    ref = ['ref', '--data', tmp_path / 'no-such-data', '--detector', tmp_path / 'no-such-detector.pt']
    _refused(fid.cli, [*ref, '--dest', other], 'exists; choose a new name, or add --force')
    _refused(fid.cli, [*ref, '--dest', other, '--force'], 'is not reference statistics')
    assert other.read_bytes() == before
    mine = tmp_path / 'ref.npz'
    metrics.save_ref(mine, np.zeros(2), np.eye(2))
    assert fid.is_reference_file(mine) and not fid.is_reference_file(other)
    _refused(fid.cli, [*ref, '--dest', mine], 'add --force')
    # With --force the check passes and the command goes on to its work (here: a missing detector).
    result = _invoke(fid.cli, [*ref, '--dest', mine, '--force'])
    assert result.exit_code != 0 and '--force' not in result.output and 'exists' not in result.output, result.output
    notes = tmp_path / 'notes.json'
    notes.write_text('{"mine": 1}')
    calc = ['calc', '--images', tmp_path / 'no-such-images', '--ref', mine]
    _refused(fid.cli, [*calc, '--out', notes], 'add --force')
    _refused(fid.cli, [*calc, '--out', notes, '--force'], 'is not a results file of fid.py calc')
    assert notes.read_text() == '{"mine": 1}'

# The figure scripts: an existing --out is refused without --force; --force replaces only a file of the
# kind they write (PNG, .npy, GIF), never, say, a text file named like one.
@pytest.mark.parametrize('script,args,name,magic', [
    ('tree', ['--network', 'missing.safetensors'], 'fig.png', b'\x89PNG\r\n\x1a\n'),
    ('zscg', ['--network', 'missing.safetensors'], 'fig.png', b'\x89PNG\r\n\x1a\n'),
    ('toy_2d', ['--density', 'no-such-density', '--steps', '1'], 'points.npy', b'\x93NUMPY'),
    ('toy_2d', ['--density', 'no-such-density', '--steps', '1', '--gif'], 'anim.gif', b'GIF89a'),
])
def test_figure_outputs_are_replaced_only_when_of_their_kind(tmp_path, script, args, name, magic):
    import toy_2d
    import tree
    import zscg
    main = dict(tree=tree.main, zscg=zscg.main, toy_2d=toy_2d.main)[script]
    path = tmp_path / name
    args = [*args, path] if args[-1] == '--gif' else [*args, '--out', path]
    path.write_text('my notes')
    _refused(main, args, 'exists; choose a new name, or add --force')
    _refused(main, [*args, '--force'], 'exists and is not a')
    assert path.read_text() == 'my notes'
    path.write_bytes(magic + b'...')
    result = _invoke(main, [*args, '--force'])           # Passes the check; then fails on the missing input.
    assert result.exit_code != 0 and 'exists' not in result.output, result.output
    assert path.read_bytes() == magic + b'...'
