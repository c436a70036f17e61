"""Generic helpers for ddn's scripts: configuration dicts, objects built from dotted names, time
formatting, logging to `log.txt`, and `open_url` with a download cache.

Configurations travel as plain JSON-able dicts (`training_options.json`), so every object that a run
builds (dataset, network, loss, optimizer) is named by a `class_name` string and constructed here with
`construct_class_by_name`. Downloads (FID detectors, reference statistics, released weights) go
through `open_url`, which caches them once under `make_cache_dir_path('downloads')` and, when the
machine is offline, says exactly where a manually fetched copy must be placed.
"""

import hashlib
import importlib
import io
import os
import re
import sys
import time
import urllib.parse
import urllib.request
import uuid

import requests

# ----------------------------------------------------------------------------
# Integer lists as the scripts write them: '1,5,9-12' <-> [1, 5, 9, 10, 11, 12].

def parse_int_list(text, max_values=10_000_000, max_value=2**63 - 1):
    """Comma-separated non-negative integers and inclusive ranges `a-b`; duplicates are dropped,
    the first occurrence keeping its place. Raises ValueError on anything else, on a value above
    `max_value` (seeds must fit int64), or on more than `max_values` values (a typo such as
    0-9999999999 fails at once instead of filling memory)."""
    if isinstance(text, (list, tuple)):
        return list(text)
    values, seen = [], set()
    for part in str(text).split(','):
        part = part.strip()
        m = re.fullmatch(r'(\d+)\s*-\s*(\d+)', part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f'Empty range {part!r}: write low-high with low <= high')
            if hi - lo + 1 + len(values) > max_values:
                raise ValueError(f'{text!r} holds more than {max_values} values; split the work into several runs')
            items = range(lo, hi + 1)
        elif re.fullmatch(r'\d+', part):
            if len(values) + 1 > max_values:
                raise ValueError(f'{text!r} holds more than {max_values} values; split the work into several runs')
            items = [int(part)]
        else:
            raise ValueError(f'Cannot parse {part!r} in {text!r}: expected e.g. "1,5,9-12" (non-negative integers)')
        if max(items) > max_value:
            raise ValueError(f'{part!r} in {text!r}: values must be at most {max_value}')
        for v in items:
            if v not in seen:
                seen.add(v)
                values.append(v)
    return values

# The inverse of parse_int_list, compact: [0, 1, 2, 3, 7] -> '0-3,7'.
def format_int_list(values):
    parts, values = [], [int(v) for v in values]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if j == i else f'{values[i]}-{values[j]}')
        i = j + 1
    return ','.join(parts)

# ----------------------------------------------------------------------------
# Dictionary whose keys are also attributes: `c.batch_size` reads `c['batch_size']`.

class EasyDict(dict):
    # Missing keys raise AttributeError (not KeyError) so getattr(), copy and pickle behave.
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    # Attribute assignment stores a key; there are no real instance attributes.
    def __setattr__(self, name, value):
        self[name] = value

    # Attribute deletion removes the key.
    def __delattr__(self, name):
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

# ----------------------------------------------------------------------------
# Human-readable duration, as printed in the training log: '7s', '3m 05s', '2h 01m 09s', '3d 04h 10m'.

def format_time(seconds):
    s = round(float(seconds))
    if s < 60:
        return f'{s}s'
    if s < 60 * 60:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 24 * 60 * 60:
        return f'{s // (60 * 60)}h {(s // 60) % 60:02d}m {s % 60:02d}s'
    return f'{s // (24 * 60 * 60)}d {(s // (60 * 60)) % 24:02d}h {(s // 60) % 60:02d}m'

# ----------------------------------------------------------------------------
# Resolve a dotted name such as 'torch.optim.Adam' or 'training.networks.DDNGenerator'.

def get_obj_by_name(name):
    if not isinstance(name, str) or not name:
        raise ValueError(f'Expected a dotted object name, got {name!r}')
    parts = name.split('.')
    # Try the longest importable module prefix first, so 'a.b.C' imports 'a.b' and reads C from it.
    for split in range(len(parts), 0, -1):
        module_name = '.'.join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # Only "this prefix is not a module" means: try a shorter one. A module that exists but
            # fails to import one of its own dependencies must surface that real error.
            if err.name is not None and (module_name == err.name or module_name.startswith(err.name + '.')):
                continue
            raise
        for attr in parts[split:]:
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                raise AttributeError(f'Cannot find {attr!r} in {".".join(parts[:split])!r} while resolving {name!r}') from None
        return obj
    # A bare name such as 'dict' refers to a builtin.
    builtins = importlib.import_module('builtins')
    if len(parts) == 1 and hasattr(builtins, name):
        return getattr(builtins, name)
    raise ImportError(f'Cannot find a module for {name!r}: none of its prefixes can be imported')

# ----------------------------------------------------------------------------
# Call a function given by dotted name: call_func_by_name(1, 2, func_name='math.hypot').

def call_func_by_name(*args, func_name=None, **kwargs):
    if func_name is None:
        raise ValueError('func_name is required')
    func = get_obj_by_name(func_name)
    if not callable(func):
        raise TypeError(f'{func_name!r} is not callable')
    return func(*args, **kwargs)

# ----------------------------------------------------------------------------
# Build an object from the `class_name` of a `*_kwargs` dict: construct_class_by_name(**c.loss_kwargs).

def construct_class_by_name(*args, class_name=None, **kwargs):
    if class_name is None:
        raise ValueError('class_name is required')
    return call_func_by_name(*args, func_name=class_name, **kwargs)

# ----------------------------------------------------------------------------
# Cache folder: $DDN_CACHE_DIR if set, else ~/.cache/ddn; extra arguments are joined below it.

def make_cache_dir_path(*paths):
    root = os.environ.get('DDN_CACHE_DIR')
    if not root:
        root = os.path.join(os.path.expanduser('~'), '.cache', 'ddn')
    return os.path.join(root, *paths)

# ----------------------------------------------------------------------------
# True for http://, https:// and file:// URLs (anything else is treated as a local path).

def is_url(obj):
    if not isinstance(obj, str) or '://' not in obj:
        return False
    return urllib.parse.urlparse(obj).scheme in ('http', 'https', 'file')

# ----------------------------------------------------------------------------
# Cache file name of a URL: md5 of the full URL (unique) + its sanitised basename (recognisable).

def url_cache_file_name(url):
    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    basename = os.path.basename(urllib.parse.urlparse(url).path)
    safe = re.sub(r'[^0-9A-Za-z._-]', '_', urllib.parse.unquote(basename))[:64] or 'download'
    return f'{url_md5}_{safe}'

# ----------------------------------------------------------------------------
# Open a local path, file:// URL or http(s):// URL as a binary file object (or return a path).

def open_url(url, cache_dir=None, cache=True, num_attempts=3, verbose=True, return_filename=False):
    """Open `url` for binary reading; http(s) downloads are cached so they happen only once.

    Returns a binary file object, or with `return_filename=True` a local path (needs `cache=True`
    for http(s), since the data must then live in a file). A download that fails after
    `num_attempts` tries raises `OSError` (alias `IOError`) naming the URL and the cache file that would satisfy it:
    on an offline machine, fetch the file elsewhere and place it there.
    """
    if num_attempts < 1:
        raise ValueError(f'num_attempts must be at least 1, got {num_attempts}')
    if return_filename and not cache:
        raise ValueError('open_url(return_filename=True) needs cache=True: the data must live in a file')
    url = os.fspath(url)

    # Local file or file:// URL: nothing to download.
    if not is_url(url) or urllib.parse.urlparse(url).scheme == 'file':
        path = url
        if is_url(url):
            parsed = urllib.parse.urlparse(url)
            host = '' if parsed.netloc in ('', 'localhost') else '//' + parsed.netloc
            path = urllib.request.url2pathname(host + parsed.path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'No such file: {path}' + (f' (from {url})' if path != url else ''))
        return path if return_filename else open(path, 'rb')

    # Remote file already in the cache: no network access at all.
    if cache_dir is None:
        cache_dir = make_cache_dir_path('downloads')
    cache_file = os.path.join(cache_dir, url_cache_file_name(url))
    if cache and os.path.isfile(cache_file):
        return cache_file if return_filename else open(cache_file, 'rb')

    # Stream into a unique temporary file and rename it: a concurrent process or an interrupted
    # download never leaves a partial file under the cache name.
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
    tmp_file = f'{cache_file}.tmp-{os.getpid()}-{uuid.uuid4().hex}'
    if verbose:
        print(f'Downloading {url} ...', end='', file=sys.stderr, flush=True)
    last_error = None
    try:
        for attempt in range(num_attempts):
            try:
                with (open(tmp_file, 'wb') if cache else io.BytesIO()) as dst:
                    _download(url, dst)
                    if not cache:
                        data = dst.getvalue()
                last_error = None
                break
            except _PermanentDownloadError as err:
                last_error = err
                break
            except (requests.RequestException, OSError) as err:
                last_error = err
                if attempt + 1 < num_attempts:
                    time.sleep(min(0.5 * 2 ** attempt, 8.0))  # back off a little: the error may be transient
        if last_error is None and cache:
            os.replace(tmp_file, cache_file)
    finally:
        if cache and os.path.exists(tmp_file):
            os.remove(tmp_file)
    if last_error is not None:
        if verbose:
            print(' failed', file=sys.stderr, flush=True)
        hint = (f'To work offline, fetch the file by other means and place it at:\n  {cache_file}'
                if cache else 'To work offline, fetch the file by other means and pass its local path instead of the URL.')
        raise OSError(f'Could not download {url} ({num_attempts} attempt(s)): {last_error}\n{hint}')
    if verbose:
        print(' done', file=sys.stderr, flush=True)
    if not cache:
        return io.BytesIO(data)
    return cache_file if return_filename else open(cache_file, 'rb')

# ----------------------------------------------------------------------------
# A download error that retrying cannot fix (e.g. HTTP 404).

class _PermanentDownloadError(OSError):
    pass

# ----------------------------------------------------------------------------
# Stream one URL into a binary file object, checking that nothing was truncated.

def _download(url, dst):
    with requests.get(url, stream=True, timeout=(10, 60)) as res:
        if 400 <= res.status_code < 500 and res.status_code not in (408, 429):
            raise _PermanentDownloadError(f'HTTP {res.status_code} {res.reason}')
        res.raise_for_status()
        num_bytes = 0
        for chunk in res.iter_content(chunk_size=1 << 20):
            dst.write(chunk)
            num_bytes += len(chunk)
        expected = res.headers.get('Content-Length')
        # Content-Length counts encoded bytes; only compare when the body was not re-encoded.
        if expected is not None and not res.headers.get('Content-Encoding') and num_bytes != int(expected):
            raise OSError(f'truncated download: got {num_bytes} of {expected} bytes')

# ----------------------------------------------------------------------------
# Tee sys.stdout and sys.stderr into a log file (the run folder's log.txt), as EDM's train.py does.

class Logger:
    def __init__(self,
        file_name       = None,     # Log file path; None keeps the console only.
        file_mode       = 'w',      # 'a' to append when a run is resumed.
        should_flush    = True,     # Flush after every write, so log.txt is current if the run dies.
    ):
        # The file stays open for the Logger's lifetime and is closed by close() / __exit__.
        self.file = open(file_name, file_mode, encoding='utf-8') if file_name is not None else None
        self.should_flush = should_flush
        self.stdout = sys.stdout
        self.stderr = sys.stderr
        sys.stdout = _TeeStream(self.stdout, self)
        sys.stderr = _TeeStream(self.stderr, self)

    # Usable as `with Logger(...):` so the streams are restored even on error.
    def __enter__(self):
        return self

    # Restore the streams when leaving the `with` block.
    def __exit__(self, exc_type, exc_value, traceback):
        self.close()

    # Append text to the log file (the console copy is written by the tee streams).
    def write_file(self, text):
        if self.file is not None:
            self.file.write(text)
            if self.should_flush:
                self.file.flush()

    # Flush the log file.
    def flush(self):
        if self.file is not None:
            self.file.flush()

    # Restore sys.stdout/sys.stderr and close the file; safe to call twice.
    def close(self):
        if isinstance(sys.stdout, _TeeStream) and sys.stdout.logger is self:
            sys.stdout = self.stdout
        if isinstance(sys.stderr, _TeeStream) and sys.stderr.logger is self:
            sys.stderr = self.stderr
        if self.file is not None:
            self.file.close()
            self.file = None

# ----------------------------------------------------------------------------
# One tee'd console stream: writes go to the original stream and to the Logger's file.

class _TeeStream:
    def __init__(self, stream, logger):
        self.stream = stream
        self.logger = logger

    # Write to both destinations.
    def write(self, text):
        if isinstance(text, bytes):
            text = text.decode('utf-8', errors='replace')
        if not text:
            return 0
        self.logger.write_file(text)
        self.stream.write(text)
        if self.logger.should_flush:
            self.stream.flush()
        return len(text)

    # Flush both destinations.
    def flush(self):
        self.logger.flush()
        self.stream.flush()

    # Everything else (isatty, encoding, fileno, ...) is the original stream's, e.g. for tqdm.
    def __getattr__(self, name):
        return getattr(self.stream, name)
