"""Signals, the wall-clock watchdog and the progress line: a thread beside a running VM.

Guest code runs inside Unicorn's emu_start, which the binding calls without the GIL.
CPython runs a Python signal handler only in the main thread, between bytecodes: while
a vCPU spins in guest code that may be never (no hook runs), and when it is in a hook,
an exception the handler raised would be swallowed by the binding.  So, as QEMU does
with its vCPU threads, the VMM does its stopping from another thread:

- ``Signals`` (the CLI's, main thread only) installs SIGINT and SIGTERM handlers that
  only record the signal, and a wakeup fd the C-level handler writes the signal number to
  at once, whatever the main thread is doing.
- ``Watchdog`` is a thread that lives as long as one run of a Machine.  It waits on the
  wakeup fd and on the --timeout deadline; on either it asks the VMM to stop
  (``Machine.stop``): every vCPU gets a signal (KVM_RUN returns KVM_EXIT_INTR, as upstream
  for a pending signal) and one running guest code is kicked out of Unicorn.  Until the run
  is over it kicks again every TICK seconds (a kick that lands just as a vCPU enters the
  guest is lost to Unicorn).  It also draws the progress line on a terminal.

The thread is joined before the run returns: no kick from it lands in a later run.
"""

import os
import select
import signal
import threading
import time

TICK = 0.05  # seconds between two kicks while a stop is under way
PROGRESS_AFTER = 2.0  # a run shows the progress line once it has lasted this long
PROGRESS_EVERY = 0.25  # and updates it this often

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal, as a shell reports it


class Signals:
    """SIGINT and SIGTERM caught for the whole command (install in the main thread; a signal
    ignored when the command started, as in a background job, stays ignored).

    ``mode="record"`` (run): the handler records the signal and does nothing else; the run's
    Watchdog stops the VM.  ``mode="raise"`` (explore, campaign: their parent process runs no
    guest code): the first signal raises KeyboardInterrupt, which keeps the results found so
    far; ``quiet()`` switches to recording while they are printed, so nothing cuts the output.
    ``signum`` is the first signal caught (the exit status follows it: 130, 143)."""

    NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}

    def __init__(self, mode="record"):
        self.mode = mode
        self.signum = None
        self.rfd = None
        self._old = {}
        self._old_wakeup = None
        self._wfd = None

    def __enter__(self):
        self.rfd, self._wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        os.set_blocking(self._wfd, False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            old = signal.getsignal(sig)
            if old is signal.SIG_IGN:
                continue
            self._old[sig] = old
            signal.signal(sig, self._handler)
        self._old_wakeup = signal.set_wakeup_fd(self._wfd, warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc):
        signal.set_wakeup_fd(self._old_wakeup)
        for sig, old in self._old.items():
            signal.signal(sig, old)
        os.close(self.rfd)
        os.close(self._wfd)
        return False

    def _handler(self, signum, _frame):
        first = self.signum is None
        if first:
            self.signum = signum
        if self.mode == "raise" and first:
            raise KeyboardInterrupt

    def quiet(self):
        """From now on only record (results are being printed)."""
        self.mode = "record"

    def drain(self):
        """The signals the wakeup fd holds (the watchdog thread's read)."""
        got = []
        while True:
            try:
                data = os.read(self.rfd, 64)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            got += [b for b in data if b in self.NAMES]
        if got and self.signum is None:
            self.signum = got[0]
        return got

    @property
    def name(self):
        return self.NAMES.get(self.signum, str(self.signum))

    @property
    def exit_status(self):
        return EXIT_STATUS.get(self.signum)


class Watchdog:
    """The thread beside one run of ``machine`` (see the module's docstring): ``signals`` (a
    Signals, or None), ``timeout`` (seconds, or None), ``progress`` (a callable(text) drawing
    the status line, or None)."""

    def __init__(self, machine, signals=None, timeout=None, progress=None):
        self.machine = machine
        self.signals = signals
        self.timeout = timeout
        self.progress = progress
        self.drawn = False
        self._thread = None

    def __enter__(self):
        self._done_r, self._done_w = os.pipe()
        self.t0 = time.monotonic()
        if self.signals is not None and self.signals.signum is not None:
            self._on_signal()  # caught before the run began: stop at once
        self._thread = threading.Thread(target=self._loop, name="emu-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        os.write(self._done_w, b"x")
        self._thread.join()
        os.close(self._done_r)
        os.close(self._done_w)
        if self.drawn:
            self.progress(None)  # clear the line
        return False

    def _on_signal(self):
        self.machine.stop("interrupted", self.signals.name)

    def _loop(self):
        m = self.machine
        fds = [self._done_r] + ([self.signals.rfd] if self.signals is not None else [])
        deadline = None if self.timeout is None else self.t0 + self.timeout
        next_draw = self.t0 + PROGRESS_AFTER
        while True:
            now = time.monotonic()
            waits = []
            if deadline is not None and m.stop_reason is None:
                waits.append(deadline - now)
            if m.stop_reason is not None:
                waits.append(TICK)
            if self.progress is not None:
                waits.append(next_draw - now)
            wait = max(0.0, min(waits)) if waits else None
            ready, _, _ = select.select(fds, [], [], wait)
            if self._done_r in ready:
                return
            if self.signals is not None and self.signals.rfd in ready and self.signals.drain():
                self._on_signal()
            now = time.monotonic()
            if deadline is not None and now >= deadline and m.stop_reason is None:
                m.stop("hang", f"--timeout {self.timeout:g} s reached")
            if m.stop_reason is not None:
                m.kick_all()  # again: one may have been entering the guest
            if self.progress is not None and now >= next_draw:
                next_draw = now + PROGRESS_EVERY
                self.drawn = True
                self.progress(m.progress_text(now - self.t0))


class StatusLine:
    """The progress line on a terminal (stderr): written over with \\r, cleared at the end."""

    def __init__(self, out):
        self.out = out
        self.width = 0

    def __call__(self, text):
        if text is None:
            self.out.write("\r" + " " * self.width + "\r")
        else:
            self.width = max(self.width, len(text))
            self.out.write("\r" + text.ljust(self.width))
        self.out.flush()
