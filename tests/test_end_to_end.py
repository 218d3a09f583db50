"""The whole chain on real cells: train -> bundle (safetensors + ONNX) -> ORT classify -> score."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")

from wbc_edge.bundle import Bundle  # noqa: E402
from wbc_edge.evaluate import evaluate  # noqa: E402
from wbc_edge.trainer.config import ConfigError, load_config  # noqa: E402
from wbc_edge.trainer.loop import train  # noqa: E402


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, sample_dir):
    out = tmp_path_factory.mktemp("bundle")
    cfg = load_config(data=str(sample_dir / "cells"), out=str(out), member="mobilenetv3_small_050",
                      input_size=48, epochs=2, batch_size=32, progress=False)
    return train(cfg)


def test_train_writes_a_complete_bundle(tiny_bundle):
    b = Bundle.load(tiny_bundle.root)  # checksums verified
    assert b.classes == ["BA", "BNE", "EO", "LY", "MMY", "MO", "MY", "PMY", "SNE"]  # 9 WBC, no ERB/PLATELET
    hist = b.extra["training"]["history"]
    assert len(hist) == 2 and all(np.isfinite(h["train_loss"]) for h in hist)
    assert abs(sum(b.extra["class_priors"].values()) - 1) < 1e-6
    for f in ("m0.safetensors", "m0.onnx", "learning_curve.png", "train_log.jsonl"):
        assert (b.root / f).stat().st_size > 0


def test_evaluate_scores_and_accounts_for_every_input(tiny_bundle, sample_dir, tmp_path):
    data = tmp_path / "cells"
    shutil.copytree(sample_dir / "cells", data)
    (data / "LY" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (data / "manifest.csv").unlink()
    rep = evaluate(tiny_bundle.root, data, tmp_path / "out", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 331 == rep["n_inputs"]
    assert rep["n_unreadable"] == 1 and rep["unreadable"][0]["path"].endswith("broken.jpg")
    assert rep["n_unknown_label"] == 60 and rep["n_scored"] == 270  # ERB + PLATELET are listed, not scored
    assert 0 <= rep["macro_f1"] <= 1
    assert (tmp_path / "out" / "confusion.png").stat().st_size > 0


def test_unknown_config_key_suggests_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        load_config(epoch=3)


def test_cli_runs_without_torch(tmp_path, sample_bundle, sample_dir):
    """`wbc-edge --help` and the runtime commands must work where torch is not installed."""
    block = ("import sys, importlib.abc\n"
             "class B(importlib.abc.MetaPathFinder):\n"
             "    def find_spec(self, name, *a):\n"
             "        if name.split('.')[0] in ('torch', 'timm', 'torchvision'): raise ImportError('blocked '+name)\n"
             "sys.meta_path.insert(0, B())\n"
             "from wbc_edge.cli import main\n"
             "sys.exit(main())\n")
    run = lambda *args: subprocess.run([sys.executable, "-c", block, *args], capture_output=True, text=True)  # noqa: E731
    assert run("--help").returncode == 0
    res = run("stream", str(sample_dir / "cells" / "EO"), "--crops", "--bundle", str(sample_bundle), "--out",
              str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert len((tmp_path / "cells.jsonl").read_text().splitlines()) == 30
    res = run("train", "--data", str(sample_dir / "cells"), "--out", str(tmp_path / "b"))
    assert res.returncode != 0 and "wbc-edge[train]" in res.stderr
