"""Stopping a training run cleanly on a signal: the run finishes its step, writes a training state and
exits 0, so that `--resume` repeats the uninterrupted run exactly.

- SIGTERM (schedulers, `kill`), SIGUSR1 (SLURM's `--signal=USR1@SECONDS` ahead of a job's end) and the
  first SIGINT (Ctrl+C) set a flag that the loop reads after every step; all ranks stop after the same
  step (the flag is max-reduced over a CPU group, so NCCL runs never sync the device for it).
- A second SIGINT aborts at once (KeyboardInterrupt), without a new state: for a user who does not want
  to wait. Files are written atomically, so an abort inside a dump leaves the previous state as it was.
- Schedulers and terminals signal every process of the job or process group, DataLoader workers
  included: those ignore the stop signals (`torch_utils.misc.ignore_stop_signals_in_worker`) and leave
  stopping to the main process, which owns them.
"""

import functools
import os
import signal

from torch_utils import distributed

# Signals that stop a run cleanly.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ('SIGTERM', 'SIGUSR1', 'SIGINT') if hasattr(signal, name))

# Shown on the first Ctrl+C (written with os.write: a signal handler must not reenter print()).
_FIRST_INTERRUPT = b'\nCtrl+C: stopping after this step and saving a training state (Ctrl+C again aborts without saving)\n'

# Stop signals -> a flag read after every step; all ranks stop after the same step.
class StopRequest:
    def __init__(self):
        self.signum = None
        self.interrupts = 0                         # SIGINTs received so far.
        self.group = distributed.new_host_group()   # A CPU collective: no device sync per step, even with NCCL.
        for sig in STOP_SIGNALS:
            try:
                signal.signal(sig, self._handle)
            except ValueError:                  # Not the main thread: no handlers, never stops early.
                pass

    def _handle(self, signum, _frame):
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:             # The second Ctrl+C: abort now.
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            try:
                os.write(2, _FIRST_INTERRUPT)
            except OSError:
                pass
        if self.signum is None:
            self.signum = signum

    # True on every rank once any rank got a stop signal (the signal number in self.signum).
    def requested(self):
        flag = distributed.host_max(self.signum or 0, self.group)
        self.signum = flag or None
        return bool(flag)

# Decorator: the function leaves the handlers of STOP_SIGNALS as it found them, also when it raises.
def restores_stop_handlers(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        try:
            return fn(*args, **kwargs)
        finally:
            for sig, handler in saved.items():
                try:
                    signal.signal(sig, handler)
                except (ValueError, TypeError):     # Not the main thread, or a handler set from C.
                    pass
    return wrapper
