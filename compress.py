"""Latent compression with a trained DDN: images -> bit strings -> images.

`python compress.py encode` encodes dataset images to their DDN latents (L2-guided selection,
`net.encode`) and writes them into a small file, either entropy-coded with a prior over the codes
(training/entropy_coding.py: an arithmetic coder driven by p(k_l | k_<l), about -log2 p bits per
layer; `--prior auto` uses the network file's `X.prior.safetensors` when there is one, `--prior PATH`
another prior file) or, with `--prior off` or no prior, fixed-length: packed with
`training.latent.pack_codes` (mixed-radix, exactly ceil(sum log2 K_l) bits per image). It reports bits
per image next to the fixed-length size, and the PSNR of the reconstructions. `python compress.py
decode` reads such a file and writes the decoded images, which are bit-identical to the
reconstructions `encode` measured, whichever format (entropy coding is lossless on the codes). With a
K=2 network ("Taiji-DDN") a fixed-length image is a plain binary string of L bits, one per layer.

File format (little endian): b'DDNZ', version (uint8), number of images N (uint32), L (uint32), the L
values K_l (uint32 each); from version 2 the 8-byte fingerprint of the network. Versions 1 and 2: the
packed codes of the N images (`packed_size(ks, N)` bytes). Version 3 (entropy-coded): the chunk size
(uint32; images coded together, see training/entropy_coding.py), the 8-byte fingerprint of the prior
(`entropy_coding.prior_fingerprint`: decoding needs that prior), the CRC-32 of the codes (uint32),
the payload size (uint64), then the arithmetic-coded payload. The K_l must match the decoding network.

Pixels follow training/images.py: the net works in [-1, 1], images are uint8 (x * 127.5 + 128, clipped);
PSNR = 10 log10(255^2 / MSE) on the uint8 images, averaged over images.

SECURITY: --network and --prior load without running code from the file (training/snapshot.py,
training/prior.py) unless --trust-code (alias --trust-pickle).
"""

import os
import struct

import click
import numpy as np
import torch
import tqdm

import cli
from torch_utils import distributed as dist
from dnnlib.util import format_int_list
from torch_utils import limits
from torch_utils.checkpoint import write_atomic, write_json
from sampling.generation import clear_outdir, generate_batches, num_batches
from training.images import image_path, mean_psnr, psnr, save_png
from training import entropy_coding
from training.latent import latent_bits, pack_codes, packed_size, stored_bits, unpack_codes
from training.snapshot import fingerprint

MAGIC = b'DDNZ'

# The options of a `decode` run, written into --outdir before any image: they list the images it writes.
DECODE_OPTIONS = 'decode_options.json'
VERSION = 2             # Fixed-length codes; 2 adds the 8-byte fingerprint of the network (training.snapshot.fingerprint); 1 is still read.
ENTROPY_VERSION = 3     # Codes entropy-coded with a prior (training.entropy_coding).

# ----------------------------------------------------------------------------
# The codes file.

def write_codes_file(path, codes, ks, network=None, prior=None, chunk=256):
    """Write codes (N, L): fixed-length (version 1/2), or entropy-coded with `prior` (version 3).
    Returns (header bytes, payload bytes)."""
    codes = np.asarray(codes, dtype=np.int64)
    if prior is None:
        payload = pack_codes(codes, ks).tobytes()
        version = 1 if network is None else VERSION
    else:
        payload, _ = entropy_coding.encode_codes(prior, codes, ks, chunk=chunk)
        version = ENTROPY_VERSION
    header = MAGIC + struct.pack('<BII', version, codes.shape[0], len(ks)) + struct.pack(f'<{len(ks)}I', *ks)
    if version >= 2:
        header += bytes.fromhex(network or '')[:8].ljust(8, b'\0')
    if version == ENTROPY_VERSION:
        header += struct.pack('<I', chunk) + entropy_coding.prior_fingerprint(prior)
        header += struct.pack('<IQ', entropy_coding.codes_checksum(codes), len(payload))
    write_atomic(path, lambda f: f.write(header + payload))
    return len(header), len(payload)

# Whether a codes file needs a prior to decode (version 3).
def file_needs_prior(path):
    try:
        limits.require_regular_file(path, f'--codes {path}')     # A FIFO would block the read below.
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    with open(path, 'rb') as f:
        head = f.read(5)
    return head[:4] == MAGIC and len(head) == 5 and head[4] == ENTROPY_VERSION

# Whether `path` starts as a codes file does (what `encode --force` may replace).
def is_codes_file(path):
    with open(path, 'rb') as f:
        return f.read(len(MAGIC)) == MAGIC

# (codes (N, L), ks) of a codes file; with `with_network` also the fingerprint of the network that
# wrote it (None for version 1 files). A version 3 file is decoded with `prior` (the one that wrote it).
def read_codes_file(path, with_network=False, prior=None):
    try:
        limits.require_regular_file(path, f'--codes {path}')
        with open(path, 'rb') as f:
            data = f.read()
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    if data[:4] != MAGIC or len(data) < 13:
        raise click.ClickException(f'{path} is not a DDN codes file (written by `compress.py encode`)')
    version, num, L = struct.unpack_from('<BII', data, 4)
    if version not in (1, VERSION, ENTROPY_VERSION):
        raise click.ClickException(f'{path}: codes file version {version}, this script reads versions 1 to {ENTROPY_VERSION}')
    if len(data) < 13 + 4 * L + (8 if version >= 2 else 0) + (24 if version == ENTROPY_VERSION else 0):
        raise click.ClickException(f'{path}: truncated header')
    start = 13 + 4 * L + (8 if version >= 2 else 0)
    if L < 1 or len(data) < start:
        raise click.ClickException(f'{path}: the header names L={L} layers, but the file is {len(data)} bytes '
                                   '(a damaged or truncated codes file)')
    ks = list(struct.unpack_from(f'<{L}I', data, 13))
    if min(ks) < 1:
        raise click.ClickException(f'{path}: the header has K=0 at layer {ks.index(0)} (a damaged codes file)')
    network = data[13 + 4 * L:start].hex() if version >= 2 else None
    if version == ENTROPY_VERSION:
        codes = _entropy_decode(path, data, start, ks, num, prior)
    else:
        if len(data) - start != packed_size(ks, num):
            raise click.ClickException(f'{path}: {len(data) - start} bytes of codes, expected {packed_size(ks, num)} for {num} images')
        try:
            codes = unpack_codes(data[start:], ks, num)
        except ValueError as e:
            raise click.ClickException(f'{path}: {e}') from None
    return (codes, ks, network) if with_network else (codes, ks)

def _entropy_decode(path, data, start, ks, num, prior):
    chunk, = struct.unpack_from('<I', data, start)
    made_by = data[start + 4:start + 12]
    checksum, size = struct.unpack_from('<IQ', data, start + 12)
    payload = data[start + 24:]
    if prior is None:
        raise click.ClickException(f'{path} is entropy-coded with a prior: decode it with the prior that wrote it (--prior PATH, '
                                   'or --prior auto with the network file\'s prior beside it)')
    if list(prior.ks) != list(ks):
        raise click.ClickException(f'{path} was written for K per layer {_describe_ks(ks)}, the prior has {_describe_ks(prior.ks)}')
    if entropy_coding.prior_fingerprint(prior) != made_by:
        raise click.ClickException(f'{path} was entropy-coded with another prior (fingerprint {made_by.hex()}, this one is '
                                   f'{entropy_coding.prior_fingerprint(prior).hex()}); it decodes only with the same prior')
    if len(payload) != size or chunk < 1:
        raise click.ClickException(f'{path}: {len(payload)} bytes of codes, the header says {size} (chunk {chunk})')
    if num * entropy_coding.min_bits_per_image(ks) > 8 * len(payload) + 64:
        raise click.ClickException(f'{path}: {len(payload)} bytes cannot hold the codes of {num} images (corrupted header)')
    codes = entropy_coding.decode_codes(prior, payload, ks, num, chunk=chunk)
    if entropy_coding.codes_checksum(codes) != checksum:
        raise click.ClickException(f'{path}: the decoded codes fail their checksum: the prior computed other probabilities '
                                   'than when encoding (another device or torch version?) or the file is corrupted')
    return codes

# The prior module of --prior (None for off, or auto without a prior file beside the network) and its path.
def _load_prior(prior, net, net_path, device):
    rule, path = cli.load_prior(prior, net, net_path, device)
    return (None, None) if rule is None else (rule.prior, path)


# The reconstruction PSNR line (images.mean_psnr, the figure generate.py --reconstruct reports as psnr).
def _psnr_line(values):
    values = torch.cat(values)
    mean, exact = mean_psnr(values)
    return f'psnr={mean:g} dB (mean over {values.numel()} images, {exact} exact)'

# ----------------------------------------------------------------------------

# The options both commands share: which network, on which device, how many images at once.
def _network_options(fn):
    fn = click.option('--trust-code', '--trust-pickle', 'trust_pickle', help='Load a --network pickle that is not a plain ddn snapshot (it runs code)', is_flag=True)(fn)
    fn = cli.device_option()(fn)
    fn = click.option('--prior', help="Prior over the codes for entropy coding: auto (the network file's X.prior.safetensors if any), "
                      'off (fixed-length codes), or a prior file', metavar='auto|off|PATH', type=str, default='auto', show_default=True)(fn)
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
@click.option('--force',        help='Replace an existing --out codes file (only a file written by `encode`)', is_flag=True)
def encode(network, data, max_images, out, batch, prior, device, trust_pickle, force):
    """Encode dataset images to latents (entropy-coded with a prior, or fixed-length); report bits/image and PSNR."""
    cli.check_output_file(out, force, is_codes_file, 'a DDN codes file (written by `compress.py encode`)')
    device = dist.pick_device(device)
    path, net = cli.load_network(network, device, trust_pickle)
    prior_module, prior_path = _load_prior(prior, net, path, device)
    dataset = cli.open_dataset_for(data, net)
    num = len(dataset) if max_images is None else min(max_images, len(dataset))
    all_codes, values = [], []
    for b in tqdm.tqdm(generate_batches(net, range(num), batch, dataset=dataset), total=num_batches(num, batch), desc='encode', leave=False):
        all_codes.append(b.codes.cpu())
        values.append(psnr(b.images.cpu(), b.originals.cpu()))
    codes = torch.cat(all_codes).numpy()
    try:
        header, payload = write_codes_file(out, codes, net.ks, network=fingerprint(net), prior=prior_module, chunk=batch)
    except OSError as e:
        raise cli.write_error(e, '--out', out) from None
    click.echo(f'Network: {path} (L={net.num_layers}, K per layer {_describe_ks(net.ks)})')
    click.echo(f'Encoded {num} images to {out}: {payload} bytes of codes + {header} bytes of header')
    fixed, raw = stored_bits(net.ks), net.img_channels * net.img_resolution ** 2 * 8
    if prior_module is None:
        click.echo(f'bits_per_image={fixed} (fixed-length; information L*log2 K = {latent_bits(net.ks):.2f}; raw {raw} bits)')
    else:
        bits = payload * 8 / num
        click.echo(f'bits_per_image={bits:.2f} (entropy-coded with the prior {prior_path}; fixed-length {fixed} bits, '
                   f'{100 * (1 - bits / max(fixed, 1)):.1f}% fewer; L*log2 K = {latent_bits(net.ks):.2f}; raw {raw} bits)')
    click.echo(f'fixed_bits_per_image={fixed}')
    click.echo(_psnr_line(values))

@main.command()
@_network_options
@click.option('--codes',        help='Codes file written by `encode`', metavar='BIN', type=click.Path(exists=True, dir_okay=False), required=True)
@click.option('--outdir',       help='Where to write the decoded images', metavar='DIR', required=True)
@click.option('--data',         help='Also report the PSNR against these originals (the encoded dataset)', metavar='ZIP|DIR', default=None)
@click.option('--force',        help='Write into the --outdir of an earlier `decode`, replacing the images it wrote (listed in its decode_options.json)', is_flag=True)
def decode(network, codes, outdir, data, batch, prior, device, trust_pickle, force):
    """Decode a codes file to images {index:06d}.png."""
    earlier_files = cli.check_outdir(outdir, force, DECODE_OPTIONS, 'compress.py decode')
    device = dist.pick_device(device)
    path, net = cli.load_network(network, device, trust_pickle)
    coded = file_needs_prior(codes)
    prior_module = _load_prior(prior, net, path, device)[0] if coded else None
    all_codes, ks, made_by = read_codes_file(codes, with_network=True, prior=prior_module)
    if list(ks) != list(net.ks):
        raise click.ClickException(f'{codes} was written for K per layer {_describe_ks(ks)}, but {path} has {_describe_ks(net.ks)}')
    if made_by is not None and made_by != fingerprint(net):
        click.echo(f'WARNING: {codes} was written by another network (fingerprint {made_by}, {path} is {fingerprint(net)}); '
                   'the same codes decode to different images', err=True)
    num = all_codes.shape[0]
    dataset = cli.open_dataset_for(data, net) if data is not None else None
    if dataset is not None and len(dataset) < num:
        raise click.ClickException(f'{codes} holds {num} images but the dataset only {len(dataset)}')
    # What this run writes, recorded before the first image (a later --force removes exactly these).
    clear_outdir(outdir, earlier_files)
    write_json(os.path.join(outdir, DECODE_OPTIONS), dict(command='decode', codes=codes, network=path, num=num,
                                                          images=format_int_list(range(num)), subdirs=False, files=[]))
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
    size = 'entropy-coded' if coded else f'{stored_bits(ks)} bits each'
    click.echo(f'Decoded {num} images ({size}) to {outdir}')
    if values:
        click.echo(_psnr_line(values))

# "64 x 63" for a single K, else the list.
def _describe_ks(ks):
    return f'{ks[0]} x {len(ks)}' if len(set(ks)) == 1 else str(list(ks))

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

# ----------------------------------------------------------------------------
