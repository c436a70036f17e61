"""Convert a network file to the safe format (.safetensors) or to our snapshot pickle (.pkl).

    python convert.py --network training-runs/00000-digits/network-snapshot-000048.pkl --out net.safetensors
    python convert.py --network net.pkl --out net.safetensors --trust-pickle    # a pickle of another layout
    python convert.py --network net.safetensors --out net.pkl                   # back to EDM's pickle format

The input is anything `--network` accepts (file, URL, run folder). A .safetensors output loads with no
code execution anywhere (generate.py, zscg.py, tree.py, compress.py, train.py --transfer); share that
one. Convert a pickle with --trust-pickle only if you trust where it came from: loading it runs it.
"""

import os

import click

import cli
from training import snapshot

OUT_EXTS = (snapshot.SAFE_EXT, snapshot.PICKLE_EXT)

@click.command()
@click.option('--network', help='Network file, URL or run folder (its newest snapshot)', metavar='PATH|URL|DIR', required=True)
@click.option('--out', help='Output file: .safetensors (safe) or .pkl (pickle: dict(ema=...))', metavar='FILE', required=True)
@click.option('--trust-code', '--trust-pickle', 'trust_pickle', help='Load a pickle that is not a plain ddn snapshot (it runs code)', is_flag=True)
@click.option('--force', help='Replace an existing --out file', is_flag=True)
def main(network, out, trust_pickle, force):
    """Convert a network file to the safe format or to a snapshot pickle."""
    # Check the output before any work.
    ext = os.path.splitext(out)[1].lower()
    if ext not in OUT_EXTS:
        raise click.BadParameter(f'{out}: the extension must be one of {", ".join(OUT_EXTS)}', param_hint='--out')
    if os.path.isdir(out):
        raise click.BadParameter(f'{out} is a folder; give a file name', param_hint='--out')
    if os.path.exists(out) and not force:
        raise click.BadParameter(f'{out} exists; add --force to replace it', param_hint='--out')
    cli.check_writable(out, '--out')
    path, net = cli.load_network(network, 'cpu', trust_pickle=trust_pickle)
    if os.path.abspath(path) == os.path.abspath(out):
        raise click.BadParameter(f'{out} is the input file', param_hint='--out')
    try:
        if ext == snapshot.SAFE_EXT:
            snapshot.save_network_safe(net, out, extra_metadata=dict(converted_from=os.path.basename(path)))
        else:
            snapshot.save_network_pickle(net, out)
    except (OSError, ValueError) as e:
        raise click.ClickException(f'--out {out}: {e}') from None
    params = sum(p.numel() for p in net.parameters())
    click.echo(f'{path} -> {out}: {type(net).__name__}, L={net.num_layers}, {params} parameters')

if __name__ == '__main__':
    main()
