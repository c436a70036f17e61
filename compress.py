"""Latent compression with a trained DDN: images -> packed bit strings -> images.

`python compress.py encode` encodes dataset images to their DDN latents (L2-guided selection,
`net.encode`) and writes them packed with `training.latent.pack_codes` (mixed-radix, exactly
ceil(sum log2 K_l) bits per image; see that module) into a small file; it reports bits per image and
the PSNR of the reconstructions. `python compress.py decode` reads such a file and writes the decoded
images, which are bit-identical to the reconstructions `encode` measured. With a K=2 network
("Taiji-DDN") every image becomes a plain binary string of L bits, one per layer.

File format (little endian): b'DDNZ', version (uint8), number of images N (uint32), L (uint32), the L
values K_l (uint32 each), then the packed codes of the N images (`packed_size(ks, N)` bytes). The K_l
must match the decoding network.

Pixels follow training/images.py: the net works in [-1, 1], images are uint8 (x * 127.5 + 128, clipped);
PSNR = 10 log10(255^2 / MSE) on the uint8 images, averaged over images.

SECURITY: --network loads without running code from the file (training/snapshot.py) unless --trust-pickle.
"""

import os
import struct

import click
import numpy as np
import torch
import tqdm

import cli
from torch_utils import distributed as dist
from torch_utils import limits
from torch_utils.checkpoint import write_atomic
from training.dataset import open_dataset
from sampling.generation import generate_batches, num_batches
from training.images import image_path, save_png
from training.latent import latent_bits, pack_codes, packed_size, stored_bits, unpack_codes
from training.snapshot import fingerprint, load_network

MAGIC = b'DDNZ'
VERSION = 2     # 2 adds the 8-byte fingerprint of the network (training.snapshot.fingerprint); 1 is still read.

# ----------------------------------------------------------------------------
# The codes file.

def write_codes_file(path, codes, ks, network=None):
    codes = np.asarray(codes, dtype=np.int64)
    payload = pack_codes(codes, ks)
    version = 1 if network is None else VERSION
    header = MAGIC + struct.pack('<BII', version, codes.shape[0], len(ks)) + struct.pack(f'<{len(ks)}I', *ks)
    if network is not None:
        header += bytes.fromhex(network)[:8].ljust(8, b'\0')
    write_atomic(path, lambda f: f.write(header + payload.tobytes()))
    return len(header), payload.size

# (codes (N, L), ks) of a codes file; with `with_network` also the fingerprint of the network that
# wrote it (None for version 1 files).
def read_codes_file(path, with_network=False):
    try:
        limits.require_regular_file(path, f'--codes {path}')
        with open(path, 'rb') as f:
            data = f.read()
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    if data[:4] != MAGIC or len(data) < 13:
        raise click.ClickException(f'{path} is not a DDN codes file (written by `compress.py encode`)')
    version, num, L = struct.unpack_from('<BII', data, 4)
    if version not in (1, VERSION):
        raise click.ClickException(f'{path}: codes file version {version}, this script reads versions 1 and {VERSION}')
    start = 13 + 4 * L + (8 if version >= 2 else 0)
    if L < 1 or len(data) < start:
        raise click.ClickException(f'{path}: the header names L={L} layers, but the file is {len(data)} bytes '
                                   '(a damaged or truncated codes file)')
    ks = list(struct.unpack_from(f'<{L}I', data, 13))
    if min(ks) < 1:
        raise click.ClickException(f'{path}: the header has K=0 at layer {ks.index(0)} (a damaged codes file)')
    network = data[13 + 4 * L:start].hex() if version >= 2 else None
    if len(data) - start != packed_size(ks, num):
        raise click.ClickException(f'{path}: {len(data) - start} bytes of codes, expected {packed_size(ks, num)} for {num} images')
    try:
        codes = unpack_codes(data[start:], ks, num)
    except ValueError as e:
        raise click.ClickException(f'{path}: {e}') from None
    return (codes, ks, network) if with_network else (codes, ks)

# PSNR (dB) of each uint8 image pair (B, C, H, W), in float64; inf for identical images.
def psnr(a, b):
    mse = (a.to(torch.float64) - b.to(torch.float64)).square().flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse)


def _load(network, device, trust_pickle=False):
    try:
        return load_network(network, device, trust_pickle)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from e

def _open_dataset(data, net):
    try:
        dataset = open_dataset(data, resolution=net.img_resolution) if data in (None, 'digits') else open_dataset(data)
    except (OSError, ValueError) as e:
        raise click.ClickException(f'Cannot open dataset {data}: {e}') from e
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    if list(dataset.image_shape) != shape:
        raise click.ClickException(f'Dataset images are {dataset.image_shape}, the network makes {shape}')
    return dataset

def _psnr_line(values):
    values = torch.cat(values)
    finite = values[torch.isfinite(values)]
    mean = float(finite.mean()) if finite.numel() else float('inf')
    return f'psnr={mean:.2f} dB (mean over {values.numel()} images, {values.numel() - finite.numel()} exact)'

# ----------------------------------------------------------------------------

# The options both commands share: which network, on which device, how many images at once.
def _network_options(fn):
    fn = click.option('--trust-pickle', help='Load a --network pickle that is not a plain ddn snapshot (it runs code)', is_flag=True)(fn)
    fn = cli.device_option()(fn)
    fn = click.option('--batch', help='Images per batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)(fn)
    return click.option('--network', help='Network snapshot (.safetensors or .pkl), URL, or run folder (latest snapshot)', metavar='FILE|URL|DIR', required=True)(fn)

@click.group()
def main():
    """Compress images to DDN latents (bit strings) and back.

    \b
    python compress.py encode --network RUN_OR_PKL --data digits --max-images 100 --out codes.bin
    python compress.py decode --network RUN_OR_PKL --codes codes.bin --outdir decoded
    """

@main.command()
@_network_options
@click.option('--data',         help='Dataset folder or zip, or "digits"', metavar='ZIP|DIR', default='digits', show_default=True)
@click.option('--max-images',   help='Encode the first N images', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--out',          help='Output codes file', metavar='BIN', required=True)
def encode(network, data, max_images, out, batch, device, trust_pickle):
    """Encode dataset images to packed latents; report bits/image and PSNR."""
    if os.path.isdir(out):
        raise click.BadParameter(f'{out} is a folder; give a file name', param_hint='--out')
    cli.check_output_file(out, '--out')
    device = dist.pick_device(device)
    path, net = _load(network, device, trust_pickle)
    dataset = _open_dataset(data, net)
    num = len(dataset) if max_images is None else min(max_images, len(dataset))
    all_codes, values = [], []
    for b in tqdm.tqdm(generate_batches(net, range(num), batch, dataset=dataset), total=num_batches(num, batch), desc='encode', leave=False):
        all_codes.append(b.codes.cpu())
        values.append(psnr(b.images.cpu(), b.originals.cpu()))
    codes = torch.cat(all_codes).numpy()
    try:
        header, payload = write_codes_file(out, codes, net.ks, network=fingerprint(net))
    except OSError as e:
        raise cli.write_error(e, '--out', out) from None
    click.echo(f'Network: {path} (L={net.num_layers}, K per layer {_describe_ks(net.ks)})')
    click.echo(f'Encoded {num} images to {out}: {payload} bytes of codes + {header} bytes of header')
    click.echo(f'bits_per_image={stored_bits(net.ks)} (information {latent_bits(net.ks):.2f}; '
               f'raw {net.img_channels * net.img_resolution ** 2 * 8} bits)')
    click.echo(_psnr_line(values))

@main.command()
@_network_options
@click.option('--codes',        help='Codes file written by `encode`', metavar='BIN', type=click.Path(exists=True, dir_okay=False), required=True)
@click.option('--outdir',       help='Where to write the decoded images', metavar='DIR', required=True)
@click.option('--data',         help='Also report the PSNR against these originals (the encoded dataset)', metavar='ZIP|DIR', default=None)
def decode(network, codes, outdir, data, batch, device, trust_pickle):
    """Decode a codes file to images {index:06d}.png."""
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.UsageError(f'--outdir: {outdir} exists and is not a folder')
    cli.check_writable_dir(outdir if os.path.isdir(outdir) else os.path.dirname(os.path.abspath(outdir)), '--outdir')
    device = dist.pick_device(device)
    path, net = _load(network, device, trust_pickle)
    all_codes, ks, made_by = read_codes_file(codes, with_network=True)
    if list(ks) != list(net.ks):
        raise click.ClickException(f'{codes} was written for K per layer {_describe_ks(ks)}, but {path} has {_describe_ks(net.ks)}')
    if made_by is not None and made_by != fingerprint(net):
        click.echo(f'WARNING: {codes} was written by another network (fingerprint {made_by}, {path} is {fingerprint(net)}); '
                   'the same codes decode to different images', err=True)
    num = all_codes.shape[0]
    dataset = _open_dataset(data, net) if data is not None else None
    if dataset is not None and len(dataset) < num:
        raise click.ClickException(f'{codes} holds {num} images but the dataset only {len(dataset)}')
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as e:
        raise cli.write_error(e, '--outdir', outdir) from None
    values = []
    for b in tqdm.tqdm(generate_batches(net, range(num), batch, codes=all_codes), total=num_batches(num, batch), desc='decode', leave=False):
        images = b.images.cpu()
        for name, image in zip(b.names, images.numpy()):
            try:
                save_png(image, image_path(outdir, name))     # Atomic: a full disk leaves no partial PNG.
            except OSError as e:
                raise cli.write_error(e, '--outdir', outdir) from None
        if dataset is not None:
            values.append(psnr(images, torch.from_numpy(np.stack([dataset[i][0] for i in b.names]))))
    click.echo(f'Decoded {num} images ({stored_bits(ks)} bits each) to {outdir}')
    if values:
        click.echo(_psnr_line(values))

# "64 x 63" for a single K, else the list.
def _describe_ks(ks):
    return f'{ks[0]} x {len(ks)}' if len(set(ks)) == 1 else str(list(ks))

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

# ----------------------------------------------------------------------------
