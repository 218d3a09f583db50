"""Exit codes and failure modes of the real `wbc-edge` CLI (README "Failure modes"):
0 done, 1 error (one line, no traceback), 2 usage, 3 source lost, 130 SIGINT / 143 SIGTERM; an output
folder owned by one run; write failures; signals mid-run and during start-up.

Most tests run the CLI in a subprocess on a few sample cells and frames and send it real signals.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from conftest import copy_sample_cells

from wbc_edge.cli import main
from wbc_edge.edge import sinks
from wbc_edge.edge.sinks import atomic_write_text
from wbc_edge.outdir import LOCK_NAME, claim

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "wbc_edge.cli", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=timeout)


def _popen(*args):
    return subprocess.Popen([sys.executable, "-m", "wbc_edge.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _one_line_error(res, *words):
    """Exit 1, no traceback, the error in one line naming `words`."""
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, res.stderr
    for w in words:
        assert str(w) in errors[0], errors[0]
    return errors[0]


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]  # fails on any half-written line


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """A few cells of two classes (an ImageFolder, so evaluate can score it)."""
    return copy_sample_cells(tmp_path_factory.mktemp("cells"))


@pytest.fixture(scope="module")
def frames(sample_dir):
    return sample_dir / "frames" / "JPEGImages"


def test_ok_and_usage_errors(cells, sample_bundle, tmp_path):
    res = _cli("stream", cells / "LY", "--crops", "--bundle", sample_bundle, "--out", tmp_path / "o")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["status"] == "completed"
    assert not (tmp_path / "o" / LOCK_NAME).exists()  # the lock goes with the run
    assert _cli("stream", cells).returncode == 2  # no --bundle: click's usage error
    assert _cli("evaluate", cells, "--bundle", sample_bundle, "--frobnicate").returncode == 2
    assert _cli("bench", "no_such_benchmark").returncode == 2


def test_corrupt_bundle_and_unreadable_input_are_one_line(cells, bundle_copy, sample_bundle, tmp_path):
    (bundle_copy / "manifest.json").write_text('{"classes": ')
    for out, args in ((tmp_path / "s", ("stream", cells / "LY", "--crops", "--bundle", bundle_copy)),
                      (tmp_path / "e", ("evaluate", cells, "--bundle", bundle_copy)),
                      (None, ("build", bundle_copy)), (None, ("refine", bundle_copy, "--val", cells))):
        _one_line_error(_cli(*args, *(["--out", out] if out else [])), "manifest.json")
        assert out is None or not out.exists()  # a run that could not start leaves no output folder
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    res = _cli("stream", bad, "--crops", "--bundle", sample_bundle, "--out", tmp_path / "o")
    assert res.returncode == 1 and "Traceback" not in res.stderr  # nothing readable: failed, with its rows
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["status"] == "failed"
    assert _jsonl(tmp_path / "o" / "cells.jsonl")[0]["error"]


def test_every_other_command_exits_1_or_2(cells, bundle_copy, tmp_path):
    """train, adapt, combine: a bad input is one line and exit 1 (with or without the `train` extra),
    a bad option value is click's 2."""
    (bundle_copy / "manifest.json").write_text("[]")
    _one_line_error(_cli("train", "--data", tmp_path / "nowhere", "--out", tmp_path / "t"))
    _one_line_error(_cli("adapt", bundle_copy, cells, "--out", tmp_path / "a"))
    _one_line_error(_cli("combine", bundle_copy, bundle_copy, "--out", tmp_path / "c"))
    assert _cli("train", "--epochs", "many").returncode == 2
    assert _cli("degrade", cells, tmp_path / "d", "--kind", "jpeg", "--severity", "9").returncode == 2


def test_a_second_run_on_a_locked_out_is_refused_and_touches_nothing(cells, frames, sample_bundle, tmp_path):
    out = tmp_path / "out"
    assert _cli("stream", cells / "LY", "--crops", "--bundle", sample_bundle, "--out", out).returncode == 0
    before = _snapshot(out)
    with claim(out):  # another run holds the folder (this process)
        held = _snapshot(out)
        for args in (("stream", cells / "EO", "--crops", "--bundle", sample_bundle),
                     ("evaluate", cells, "--bundle", sample_bundle), ("degrade", cells)):
            cmd, *rest = args
            res = _cli(cmd, *rest, *(["--out", out] if cmd != "degrade" else [out, "--kind", "jpeg"]))
            _one_line_error(res, out, f"PID {os.getpid()}")
            assert _snapshot(out) == held
    assert _snapshot(out) == before and not (out / LOCK_NAME).exists()


def test_train_refuses_a_bundle_directory_in_use(cells, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    out = tmp_path / "bundle"
    with claim(out):
        _one_line_error(_cli("train", "--data", cells, "--out", out, "--epochs", "1"), out, f"PID {os.getpid()}")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # no checkpoint, no log written


def test_a_lock_left_by_a_dead_run_is_taken_over(cells, sample_bundle, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(f"{dead.pid}\n")  # a SIGKILLed run's (the kernel dropped its flock)
    res = _cli("stream", cells / "LY", "--crops", "--bundle", sample_bundle, "--out", out)
    assert res.returncode == 0, res.stderr
    assert f"PID {dead.pid}, no longer running" in res.stderr and not (out / LOCK_NAME).exists()


def test_a_rerun_starts_fresh(cells, frames, sample_bundle, tmp_path):
    """Stale review crops, annotated frames and a summary of an earlier run do not survive a re-run."""
    out = tmp_path / "out"
    (out / "review").mkdir(parents=True)
    (out / "review" / "0000001-00-BL.png").write_bytes(b"stale")
    (out / "annotated").mkdir()
    (out / "annotated" / "0000001-old.jpg").write_bytes(b"stale")
    (out / "summary.json").write_text('{"status": "completed", "frames": 999}')
    (out / "notes.txt").write_text("the user's own file")
    res = _cli("stream", cells / "LY", "--crops", "--bundle", sample_bundle, "--out", out,
               "--low-confidence", "1")  # every cell flagged: each has a crop in review/
    assert res.returncode == 0, res.stderr
    review = _jsonl(out / "review" / "review.jsonl")
    assert sorted(p.name for p in (out / "review").glob("*.png")) == sorted(r["image"] for r in review)
    assert not (out / "annotated").exists() and (out / "notes.txt").read_text() == "the user's own file"
    assert json.loads((out / "summary.json").read_text())["frames"] == 2


def test_unwritable_out_fails_up_front(cells, sample_bundle, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for cmd in ("stream", "evaluate", "degrade"):
        args = {"stream": ("stream", cells / "LY", "--crops", "--bundle", sample_bundle, "--out",
                           afile / "o"),
                "evaluate": ("evaluate", cells, "--bundle", sample_bundle, "--out", afile / "o"),
                "degrade": ("degrade", cells, afile / "o", "--kind", "jpeg")}[cmd]
        _one_line_error(_cli(*args), afile / "o", "Not a directory")


def _make_read_only(folder):
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return lambda: folder.chmod(0o755)
    # root writes through modes; an immutable folder it cannot write (ext4, CAP_LINUX_IMMUTABLE)
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        folder.chmod(0o755)
        pytest.skip("running as root and cannot make a folder read-only here (chattr +i)")
    return lambda: (subprocess.run(["chattr", "-i", str(folder)]), folder.chmod(0o755))


def test_read_only_out_fails_before_any_work(cells, sample_bundle, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "summary.json").write_text("{}")  # an earlier run's output: kept, not half-replaced
    (ro / LOCK_NAME).write_text("1\n")  # and its lock file, writable itself
    undo = _make_read_only(ro)
    try:
        res = _cli("evaluate", cells, "--bundle", sample_bundle, "--out", ro)
        _one_line_error(res, ro, "not writable")
        assert "%|" not in res.stderr  # no progress bar: nothing was classified first
        _one_line_error(_cli("stream", cells / "LY", "--crops", "--bundle", sample_bundle, "--out", ro), ro)
    finally:
        undo()
    assert sorted(p.name for p in ro.iterdir()) == [LOCK_NAME, "summary.json"]


class _FullDisk:
    """A sink's file whose writes fail with ENOSPC after `budget` calls (the disk filled up mid-run)."""

    def __init__(self, f, budget):
        self.f, self.budget = f, budget

    def write(self, s):
        self.budget -= 1
        if self.budget < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(s)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_disk_full_mid_stream_is_exit_1_with_a_summary(frames, sample_bundle, tmp_path, monkeypatch, caplog):
    init = sinks.JsonlCells.__init__

    def full_after_three(self, path):
        init(self, path)
        self.f = _FullDisk(self.f, 3)

    monkeypatch.setattr(sinks.JsonlCells, "__init__", full_after_three)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["stream", str(frames), "--bundle", str(sample_bundle), "--out", str(out)])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["exit_code"] == 1
    assert summary["error"] == f"{out / 'cells.jsonl'}: {os.strerror(errno.ENOSPC)}"
    assert f"error: {summary['error']}" in res.output
    assert len(_jsonl(out / "frames.jsonl")) == summary["frames"] < 8  # what was done, and only that
    assert not list(out.rglob("*.tmp")) and not (out / LOCK_NAME).exists()
    assert not any(r.exc_info for r in caplog.records)  # one line each, no traceback


def test_a_failed_atomic_write_leaves_no_tmp_file(tmp_path):
    (tmp_path / "d.json").write_text("old")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(tmp_path / "d.json", "\ud800")  # fails after the temporary file was opened
    assert [p.name for p in tmp_path.iterdir()] == ["d.json"] and (tmp_path / "d.json").read_text() == "old"


def test_lost_source_is_exit_3(sample_bundle, tmp_path):
    res = _cli("stream", "97", "--bundle", sample_bundle, "--out", tmp_path / "o", "--retries", "1")
    assert res.returncode == 3, res.stderr
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["status"] == "source_lost"


def _wait_for_rows(path, n, proc, timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {n} rows in {path} (exit {proc.poll()})")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_stream_leaves_every_sink_complete(sig, frames, sample_bundle, tmp_path):
    out = tmp_path / "out"
    proc = _popen("stream", frames, "--bundle", sample_bundle, "--out", out, "--loop", "200")
    _wait_for_rows(out / "frames.jsonl", 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig and "Traceback" not in err, err
    s = json.loads((out / "summary.json").read_text())
    assert (s["status"], s["signal"], s["exit_code"]) == ("interrupted", sig.name, 128 + sig)
    frames_log, cells = _jsonl(out / "frames.jsonl"), _jsonl(out / "cells.jsonl")
    assert [f["index"] for f in frames_log] == list(range(s["frames"])) and 2 <= s["frames"] < 1600
    assert len(cells) == sum(f["n_cells"] for f in frames_log) == s["cells"]
    assert len((out / "cells.csv").read_text().splitlines()) == s["cells"] + 1
    assert json.loads((out / "differential.json").read_text())["n_cells"] == s["cells"]
    assert s["review"]["saved"] == len(_jsonl(out / "review" / "review.jsonl"))
    assert (out / "report.html").stat().st_size > 0 and not list(out.rglob("*.tmp"))


def _wait_for_library(proc, name, timeout=60):
    """Until the process has mapped a shared library (it is then importing/loading, i.e. starting up)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            if name in open(f"/proc/{proc.pid}/maps").read():
                return
        except OSError:
            pass
        time.sleep(0.005)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc to see the start-up")
@pytest.mark.parametrize("cmd,sig", [("stream", signal.SIGINT), ("evaluate", signal.SIGINT),
                                     ("stream", signal.SIGTERM), ("evaluate", signal.SIGTERM)])
def test_a_signal_during_start_up_exits_cleanly(cmd, sig, cells, sample_bundle, tmp_path):
    out = tmp_path / "out"
    args = (cells / "LY", "--crops") if cmd == "stream" else (cells,)
    proc = _popen(cmd, *args, "--bundle", sample_bundle, "--out", out)
    _wait_for_library(proc, "onnxruntime")  # the bundle and its sessions are being loaded
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and "Aborted" not in err
    if out.exists():  # it got past start-up after all: then the run itself was interrupted
        assert cmd == "stream" and json.loads((out / "summary.json").read_text())["status"] == "interrupted"
