"""An output folder owned by one run, and how a run ends.

Every command that writes an output folder (`stream`, `evaluate`, `degrade`) claims it first: the
folder is created, checked writable and locked before any work is done, so that a second run on the
same folder is refused at once (and touches nothing) and a run that cannot write fails in a second,
not after an hour of inference. The outputs of a previous run are removed (a fresh `review/`, no
stale summary) once the lock is held.

Exit codes (every command): 0 done, 1 error (one line), 2 usage (click), 3 source lost (stream),
128 + signal when interrupted: 130 for SIGINT (Ctrl-C), 143 for SIGTERM (systemd, Docker).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import logging
import os
import shutil
import signal
from pathlib import Path

log = logging.getLogger("wbc_edge.outdir")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_SOURCE_LOST = 0, 1, 2, 3
LOCK_NAME = ".wbc-edge.lock"


def exit_code_for(signum: int) -> int:
    """The shell's convention for a run ended by a signal: 128 + its number (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(signum)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `except KeyboardInterrupt` cleanup runs for it too."""

    signum = signal.SIGTERM


def signal_of(exc: BaseException) -> int:
    """The signal behind a KeyboardInterrupt (SIGTERM for `Terminated`, else SIGINT)."""
    return int(getattr(exc, "signum", signal.SIGINT))


class _Seen:
    signum: int | None = None


@contextlib.contextmanager
def signals_interrupt():
    """While the block runs, SIGINT raises KeyboardInterrupt and SIGTERM raises `Terminated` in the main
    thread (Python's default for SIGTERM is to die at once, with files half written). Yields a record
    of the last such signal: a library may turn the KeyboardInterrupt into its own error (an extension
    module whose import was cut short raises ImportError), and the caller can still tell it was a stop."""
    seen = _Seen()

    def _raise(signum, _frame):
        seen.signum = signum
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    try:  # a signal ignored by whoever started us (nohup, `cmd &` in a script) stays ignored
        previous = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM)
                    if signal.getsignal(s) is not signal.SIG_IGN}
    except ValueError:  # not the main thread: signals cannot be routed here
        yield seen
        return
    try:
        yield seen
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class OutputDirError(OSError):
    """The output folder cannot be used: not creatable, not writable, or locked by another run."""

    def __str__(self) -> str:  # one line, without the "[Errno n]" prefix
        return self.strerror or super().__str__()


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _make_dir(out: Path) -> list[Path]:
    """Create `out` (and missing parents); the folders created, deepest first."""
    created, p = [], out
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    if out.exists() and not out.is_dir():
        raise OutputDirError(errno.ENOTDIR, f"{out}: is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. below a regular file (ENOTDIR), read-only parent (EACCES, EROFS)
        raise OutputDirError(exc.errno, f"{out}: cannot create the output folder: {_describe(exc)}") from exc
    return created


def _holder(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class _Lock:
    """An exclusive `flock` on `<out>/.wbc-edge.lock` holding the owner's PID. The kernel drops the lock
    when its process dies however it dies, so a lock file left by a killed run is simply taken over.
    `flock` (not O_EXCL alone) because an O_EXCL file of a dead run would need guessing whether its PID
    is still the same process."""

    def __init__(self, out: Path):
        self.path, self.fd = out / LOCK_NAME, None

    def acquire(self) -> None:
        try:
            import fcntl  # POSIX; the edge devices this runs on (Linux, Jetson) all have it
        except ImportError:
            log.warning("%s: no file locks on this system; not protected against a second run", self.path.parent)
            return

        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                pid = _holder(self.path)
                who = f"PID {pid}" if pid else "another process"
                raise OutputDirError(errno.EBUSY, f"{self.path.parent}: in use by another wbc-edge run "
                                                  f"({who}); wait for it to end or choose another --out") from None
            except OSError as exc:  # a file system without locks (some network mounts): go on, unlocked
                log.warning("%s: cannot lock (%s); not protected against a second run", self.path.parent,
                            _describe(exc))
            # the previous owner may have removed the file between our open and our lock: lock it anew
            if self._same_file(fd):
                break
            os.close(fd)
        self.fd = fd
        self._claim()

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputDirError(exc.errno, f"{self.path.parent}: not writable: {_describe(exc)}") from exc

    def _same_file(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def _claim(self) -> None:
        stale = _holder(self.path)
        if stale and stale != os.getpid():
            state = "no longer running" if not _alive(stale) else "its lock was released"
            log.warning("%s: taking over the output folder of an earlier run (PID %d, %s)",
                        self.path.parent, stale, state)
        try:
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            self.release()
            raise OutputDirError(exc.errno, f"{self.path.parent}: not writable: {_describe(exc)}") from exc

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if self._same_file(self.fd):  # unlink before unlocking: a waiting run then locks a new file
                self.path.unlink()
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def _check_writable(out: Path) -> None:
    """Create and remove a probe file: a folder made read-only after an earlier run still has its lock
    file, so opening that proves nothing about creating the outputs."""
    probe = out / f".wbc-edge.probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputDirError(exc.errno, f"{out}: not writable: {_describe(exc)}") from exc


def _remove_outputs(out: Path, names) -> None:
    """Delete what an earlier run wrote under these names (files or folders), so that nothing stale
    (crops in review/, a summary of another run) is mistaken for this run's output."""
    for name in names:
        for p in out.glob(name):
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            except OSError as exc:
                raise OutputDirError(exc.errno, f"{p}: cannot remove the previous run's output: "
                                                f"{_describe(exc)}") from exc


@contextlib.contextmanager
def claim(out_dir, outputs=()):
    """Own `out_dir` for the block: created, writable, locked against other runs, and cleared of the
    `outputs` (names or glob patterns) an earlier run left. Raises `OutputDirError` (an OSError, one
    line) before touching anything when another run holds it. If the block fails, folders this claim
    created are removed again when they are still empty, so a refused run leaves nothing behind."""
    out = Path(out_dir)
    created = _make_dir(out)
    lock = _Lock(out)
    try:
        lock.acquire()
        try:
            _check_writable(out)
            _remove_outputs(out, outputs)
            yield out
        finally:
            lock.release()
    except BaseException:
        for d in created:  # deepest first; a folder with anything in it stays
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def owns_output(param: str, outputs=()):
    """Decorator: the function's `param` argument (an output folder) is `claim`ed while it runs."""
    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            with claim(bound.arguments[param], outputs):
                return fn(*args, **kwargs)
        return run
    return wrap
