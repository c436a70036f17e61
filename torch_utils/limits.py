"""Bounded reading of files received from others: images, JSON and zip members.

A small file can ask for a huge amount of memory or time: a PNG whose header says 40000x40000, a
zip member that inflates a thousand-fold, a JSON nested a million levels deep, or a FIFO named
`x.png` that blocks the reader forever. Every reader of such files goes through these helpers, which
refuse them with a ValueError naming the file and the limit, before anything large is allocated.
"""

import json
import os
import stat
import warnings
import zipfile

import PIL.Image

# Largest image accepted (pixels): 2^26 (8192 x 8192), below PIL's own guard (a warning at 89 M pixels,
# an error at 179 M), which is turned into the same error here.
MAX_IMAGE_PIXELS = 1 << 26

# ----------------------------------------------------------------------------
# Files that are not files: FIFOs, sockets, devices block or never end.

def require_regular_file(path, what=None):
    """Raise ValueError if `path` exists but is not a regular file (or a link to one). Missing paths pass."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        kind = 'a folder' if stat.S_ISDIR(mode) else 'a FIFO' if stat.S_ISFIFO(mode) else 'not a regular file'
        raise ValueError(f'{what or path} is {kind}; expected a regular file')

# ----------------------------------------------------------------------------
# Images: a pixel cap checked from the header, before any pixel is decoded.

def open_image(fp, what=None):
    """`PIL.Image.open(fp)` (a path or a binary file object), refusing non-regular files and images of
    more than MAX_IMAGE_PIXELS pixels with ValueError naming `what`. Use it as a context manager."""
    what = what or (os.fspath(fp) if isinstance(fp, (str, os.PathLike)) else 'image')
    if isinstance(fp, (str, os.PathLike)):
        require_regular_file(fp, what)
    with warnings.catch_warnings():
        warnings.simplefilter('error', PIL.Image.DecompressionBombWarning)
        try:
            image = PIL.Image.open(fp)
        except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning):
            image = None
    if image is None:
        raise ValueError(f'{what}: more than {MAX_IMAGE_PIXELS} pixels, the limit (a decompression bomb?)')
    if image.width * image.height > MAX_IMAGE_PIXELS:
        image.close()
        raise ValueError(f'{what} is {image.width}x{image.height}, more than {MAX_IMAGE_PIXELS} pixels, the limit '
                         '(a decompression bomb?)')
    return image

# ----------------------------------------------------------------------------
# JSON: malformed or nested too deeply.

def loads_json(data, what):
    """json.loads of str/bytes, raising ValueError naming `what` for malformed JSON, JSON that is not
    UTF-8, and JSON nested so deeply that the parser would hit Python's recursion limit."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode('utf-8')
        except UnicodeDecodeError as err:
            raise ValueError(f'{what} is not UTF-8 JSON: {err}') from None
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError(f'{what}: JSON nested too deeply') from None
    except ValueError as err:
        raise ValueError(f'{what} is not valid JSON: {err}') from None

# ----------------------------------------------------------------------------
# Zip archives: members that inflate past a limit.

def read_zip_member(archive, name, max_bytes, what):
    """The bytes of member `name` of an open ZipFile, refused with ValueError if it inflates to more
    than `max_bytes` (checked from the directory, and again while reading, since headers can lie)."""
    info = archive.getinfo(name)
    if info.file_size > max_bytes:
        raise ValueError(f'{what} inflates to {info.file_size} bytes, more than the limit of {max_bytes}')
    with archive.open(info) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f'{what} inflates to more than the limit of {max_bytes} bytes')
    return data

def check_zip_inflation(path, max_ratio=32, slack=64 << 20, what=None):
    """Raise ValueError if the members of zip `path` inflate to more than `max_ratio` x its size +
    `slack` bytes in all (a zip bomb). Not-a-zip files pass (the caller's reader reports them)."""
    try:
        with zipfile.ZipFile(path) as archive:
            total = sum(info.file_size for info in archive.infolist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return
    limit = os.path.getsize(path) * max_ratio + slack
    if total > limit:
        raise ValueError(f'{what or path}: its members inflate to {total} bytes, more than the limit of {limit} '
                         f'({max_ratio}x the file size + {slack >> 20} MiB); a zip bomb?')
