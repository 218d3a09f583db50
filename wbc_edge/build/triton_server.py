"""A real `tritonserver` on loopback, for the tests and the serve benchmark (not for production: use the
Triton container there, see README "Serving on Triton").

The binary comes from the `nvidia-pytriton` wheel (installed with `--no-deps`: its own Python code and
its numpy<2 pin are not used). It is run directly with a model repository, its Python backend and the
backend stub built for this interpreter's Python version. Why not PyTriton itself: PyTriton 0.7.0 failed
here at model load in `multiprocessing.resource_tracker` ('_thread.RLock' object has no attribute
'_recursion_count'). The cause is a mix of two Pythons: the stub links `libpython3.11.so.1.0`, which the
loader found in /lib (the system's 3.11.2), while `sys.path` pointed at this interpreter's 3.11.7
standard library, whose resource_tracker calls an RLock method 3.11.2 lacks. Putting this interpreter's
LIBDIR first on LD_LIBRARY_PATH makes the stub run the same Python as the client.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


class ServerUnavailable(RuntimeError):
    """No tritonserver can run here (the reason says why)."""


def pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")  # located, not imported (its client needs gevent, numpy<2)
    if spec is None or not spec.submodule_search_locations:
        raise ServerUnavailable("no tritonserver: install it with "
                                "`pip install --no-deps nvidia-pytriton==0.7.0` (ships the server binary)")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def _backends(root: Path, into: Path) -> Path:
    """backends/python with the stub for this Python version, as the Python backend expects it."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerUnavailable(f"the nvidia-pytriton wheel has no Python backend stub for Python {version}")
    python = into / "python"
    shutil.copytree(root / "backends" / "python", python, dirs_exist_ok=True)
    shutil.copy2(stub, python / "triton_python_backend_stub")
    return into


def _environment(root: Path) -> dict:
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    wheel_libs = root.parent.parent / "nvidia_pytriton.libs"  # the stub's own libraries (its rpath is relative)
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise ServerUnavailable(f"this Python ({sys.executable}) has no shared libpython, which the Triton "
                                "Python backend stub needs")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(wheel_libs), env.get("LD_LIBRARY_PATH")) if p)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # numpy, onnxruntime for model.py
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`tritonserver` serving `repository` on 127.0.0.1:`port` (gRPC only); start / kill / stop."""

    def __init__(self, repository, port: int | None = None, log_path=None):
        self.repository, self.port = Path(repository), port or free_port()
        self.root = pytriton_root()
        self.binary = self.root / "bin" / "tritonserver"
        if not self.binary.is_file():
            raise ServerUnavailable(f"{self.binary}: not found in the nvidia-pytriton wheel")
        self._tmp = tempfile.TemporaryDirectory(prefix="wbc-triton-")
        self.backends = _backends(self.root, Path(self._tmp.name) / "backends")
        self.log_path = Path(log_path or Path(self._tmp.name) / "server.log")
        self.proc: subprocess.Popen | None = None
        self._log_from = 0
        atexit.register(self.close)  # the server runs in its own session: never leave it behind us

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> LocalServer:
        cmd = [str(self.binary), f"--model-repository={self.repository}", f"--grpc-port={self.port}",
               "--grpc-address=127.0.0.1", "--allow-http=false", "--allow-metrics=false",
               f"--backend-directory={self.backends}", "--exit-timeout-secs=5", "--log-verbose=0"]
        self._log_from = self.log_path.stat().st_size if self.log_path.exists() else 0  # this run's lines
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_environment(self.root),
                                         start_new_session=True)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        from tritonclient import grpc

        client, deadline = grpc.InferenceServerClient(f"127.0.0.1:{self.port}"), time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None or "failed to load" in self.log_tail():
                    raise ServerUnavailable(f"tritonserver exited with {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(Exception):  # not listening yet
                    if client.is_server_ready(client_timeout=2.0):
                        return
                time.sleep(0.2)
        finally:
            client.close()
        self.stop()
        raise ServerUnavailable(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_from)
                return "\n".join(f.read().decode(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the server and its Python-backend stubs (its own process group): a crash, not a stop."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
        return False
