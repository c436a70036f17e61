"""Crash-safe saving and loading of training states and snapshots, and finding the newest one.

A run folder holds `training-state-NNNNNN.pt` (state dicts for resume, `torch.save`) and
`network-snapshot-NNNNNN.pkl` (persistence pickles for distribution), NNNNNN being kimg. A job killed
while writing must never leave a truncated file under one of those names, or a resume would pick it
up: `save_atomic` writes a temporary file in the same folder, fsyncs it and renames it into place.

SECURITY: both formats are pickles; `load` here unpickles fully and can execute code: trusted files
only. Files from elsewhere go through training/snapshot.py (`load_state`: weights_only; `load_network`:
restricted unpickler or safetensors).
"""

import json
import os
import pickle
import re
import tempfile

try:
    import fcntl
except ImportError:     # Windows: no advisory locks; RunLock then trusts the pid in the file.
    fcntl = None

import torch

# First bytes of a zip archive, the container of torch.save's default format.
_ZIP_MAGIC = b'PK\x03\x04'

# ----------------------------------------------------------------------------
# Write `obj` to `path` atomically: a reader sees the old file or the complete new one, never a part.

def write_atomic(path, write, mode='wb'):
    """Call `write(f)` on a temporary file beside `path` (`path + '.tmp-<pid>'`, so the rename
    stays on one file system), flush and fsync it, then `os.replace` it onto `path`. The folder is
    created if needed. On any error the temporary file is removed and `path` is left as it was.
    `mode` is 'wb' or 'w' (text)."""
    if mode not in ('wb', 'w'):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp_path = f'{path}.tmp-{os.getpid()}'     # remove_stale_temps cleans it up after a kill.
    try:
        with open(tmp_path, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    _fsync_dir(folder)

# Name prefix of check_writable's probe files: a folder listing skips them, since another rank may be
# probing the same folder at that moment.
WRITE_TEST_PREFIX = '.write-test-'

def check_writable(path):
    """Raise ValueError unless `path` (a file or folder, new or existing) may be written: an existing
    folder must be writable, else the nearest existing folder above it (the missing ones can be made).
    Writing is tried for real (a temporary file made and removed): permissions alone miss a read-only
    mount or a full disk, and root passes every permission check."""
    path = os.path.abspath(os.fspath(path))
    where = path if os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(where):
        where = os.path.dirname(where)
    if not os.path.isdir(where):
        raise ValueError(f'{path}: {where} is a file, not a folder')
    if not os.access(where, os.W_OK):
        raise ValueError(f'{path}: no permission to write in {where}')
    try:
        with tempfile.NamedTemporaryFile(dir=where, prefix=WRITE_TEST_PREFIX):
            pass
    except OSError as err:
        raise ValueError(f'{"" if path == where else path + ": "}cannot write in {where}: {err.strerror or err}') from None

def save_atomic(obj, path, mode='torch'):
    """Save `obj` with `torch.save` (mode='torch'), `pickle.dump` (mode='pickle'), or as raw
    bytes (mode='bytes', e.g. an encoded PNG or JSON) to `path`, through `write_atomic`."""
    writers = {'torch': lambda f: torch.save(obj, f), 'bytes': lambda f: f.write(obj),
               'pickle': lambda f: pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)}
    if mode not in writers:
        raise ValueError(f"mode must be 'torch', 'pickle' or 'bytes', got {mode!r}")
    write_atomic(path, writers[mode])

# Write JSON atomically (write_atomic), indented.
def write_json(path, obj):
    write_atomic(path, lambda f: json.dump(obj, f, indent=2), mode='w')

# Append one line to a file with a single write(), so a killed job never leaves half a line.
def append_line(path, line):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line.rstrip('\n') + '\n').encode('utf-8'))
    finally:
        os.close(fd)

# ----------------------------------------------------------------------------
# One live process per run folder: a run holds `<folder>/run.lock` (its pid inside, and an exclusive
# flock on it) for as long as it runs, and removes it when it ends. The kernel drops the flock when the
# process ends, however it ends, so the lock file a killed process leaves is stale and taken over.

RUN_LOCK_NAME = 'run.lock'

class FolderInUseError(RuntimeError):
    """Another live process holds the run folder's lock."""

class RunLock:
    def __init__(self, folder):
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, RUN_LOCK_NAME)
        self.file = None

    # Take the lock, or raise FolderInUseError naming the process that holds it (OSError if the
    # folder is not writable). Returns self.
    def acquire(self):
        while True:
            f = open(self.path, 'a+', encoding='utf-8')
            try:
                f.seek(0)
                holder = f.read().strip()
                if fcntl is not None:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        raise FolderInUseError(self._in_use(holder)) from None
                elif holder.isdigit() and int(holder) != os.getpid() and _pid_alive(int(holder)):
                    raise FolderInUseError(self._in_use(holder))
                # The holder may have removed the file (it ended) between our open and our flock:
                # then the lock taken is that of a deleted file; start over with the path's file.
                try:
                    same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    f.close()
                    continue
                f.seek(0)
                f.truncate()
                f.write(f'{os.getpid()}\n')
                f.flush()
            except BaseException:
                f.close()
                raise
            self.file = f
            return self

    def _in_use(self, holder):
        return (f'{self.folder} is in use by a running process (pid {holder or "unknown"}, which holds {self.path}); '
                'stop it first, or wait until it ends')

    # Give the lock up and remove the file (the process's end drops the lock too, but leaves the file).
    def release(self):
        if self.file is None:
            return
        try:
            os.remove(self.path)        # Still locked: a process waiting on this file sees it is gone.
        except OSError:
            pass
        if fcntl is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
        self.file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

def _pid_alive(pid):
    import psutil
    return psutil.pid_exists(pid)

# ----------------------------------------------------------------------------
# Remove the temporary files (`*.tmp-<pid>`) that a killed process left in `folder`. A file whose
# process still runs is kept (it may be writing right now). Returns the removed paths.

def remove_stale_temps(folder):
    import psutil
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        match = re.search(r'\.tmp-(\d+)$', name)
        path = os.path.join(folder, name)
        if match is None or not os.path.isfile(path):
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and psutil.pid_exists(pid):
            continue
        try:
            os.remove(path)
            removed.append(path)
        except OSError:
            pass
    return removed

# ----------------------------------------------------------------------------
# Persist the rename itself (the directory entry); not possible on every platform, so best effort.

def _fsync_dir(dir_path):
    try:
        fd = os.open(dir_path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

# ----------------------------------------------------------------------------
# Load a file written by save_atomic (either mode), with errors that name the file.

def load(path, map_location='cpu'):
    """Load a training state (`torch.save` format) or a pickle, tensors mapped to `map_location`.

    Raises FileNotFoundError for a missing file and RuntimeError naming the file when it cannot be
    read (truncated, corrupt, or referring to code that cannot be imported). Executes code from the
    file: trusted files only.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Checkpoint file not found: {path}')
    try:
        with open(path, 'rb') as f:
            is_torch_zip = f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
            f.seek(0)
            if is_torch_zip:
                return torch.load(f, map_location=map_location, weights_only=False)
            # Plain pickles (snapshots) hold CPU tensors from persistent classes; map_location
            # does not apply to them.
            return pickle.load(f)
    except Exception as err:
        raise RuntimeError(f'Could not load checkpoint {path}: {type(err).__name__}: {err} '
                           '(is the file truncated or corrupt, or does it need code that is not importable?)') from err

# ----------------------------------------------------------------------------
# Newest file in run_dir whose name matches a pattern, '*' standing for the number; None if none.

def latest(run_dir, patterns):
    """Path of the matching file with the largest number, e.g. `training-state-000500.pt`.

    `patterns` is a file name with one `*` for the digits (`network-snapshot-*.pkl`), or several in
    order of preference: of two files with the same number, the earlier pattern's wins. `000002.500`
    (kimg 2.5, the name of a file of a tick shorter than 1 kimg) comes after `000002`. Temporary
    files of an interrupted save (`...pt.tmp-<pid>`) never match, because a pattern must match the
    whole name.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    regexes = []
    for pattern in patterns:
        if pattern.count('*') != 1:
            raise ValueError(f"pattern must contain exactly one '*' for the number, got {pattern!r}")
        prefix, suffix = pattern.split('*')
        # The number: kimg (6 digits), optionally with 3 decimals (files of ticks shorter than 1 kimg).
        regexes.append(re.compile(re.escape(prefix) + r'(\d+)(?:\.(\d{3}))?' + re.escape(suffix)))
    best_key, best_path = None, None
    if not os.path.isdir(run_dir):
        return None
    for name in os.listdir(run_dir):
        for preference, regex in enumerate(regexes):
            match = regex.fullmatch(name)
            if match and os.path.isfile(os.path.join(run_dir, name)):
                key = (int(match.group(1)), int(match.group(2) or 0), -preference)
                if best_key is None or key > best_key:
                    best_key, best_path = key, os.path.join(run_dir, name)
                break
    return best_path
