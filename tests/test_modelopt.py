"""`build --target trt-int8 --quantizer modelopt`: NVIDIA ModelOpt's Q/DQ placement as an optional extra.

Without the package: the error names the extra (a real import failure, in a subprocess where `modelopt`
cannot be imported). With it: a real quantisation of the shipped member graph, checked on ORT CPU.
"""
import subprocess
import sys
from collections import Counter

import onnx
import pytest
from click.testing import CliRunner

from wbc_edge.edge.preprocess import Preprocessor
from wbc_edge._optional import available
from wbc_edge.build.builder import build, calibrate_int8
from wbc_edge.bundle import Bundle
from wbc_edge.cli import main


def test_missing_modelopt_names_the_extra(bundle_copy, sample_dir):
    """`sys.modules['modelopt'] = None` makes every `import modelopt...` fail, as on a machine without it."""
    block = "import sys; sys.modules['modelopt'] = None; from wbc_edge.cli import main; main()"
    res = subprocess.run([sys.executable, "-c", block, "build", str(bundle_copy), "--target", "trt-int8",
                          "--quantizer", "modelopt", "--calib", str(sample_dir / "cells")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    assert "pip install 'wbc-edge[modelopt]'" in res.stderr and "Traceback" not in res.stderr
    assert not list(bundle_copy.glob("*.int8*"))  # it failed before calibrating anything


def test_cli_rejects_unknown_or_misplaced_quantizers(bundle_copy):
    run = lambda *a: CliRunner().invoke(main, ["build", str(bundle_copy), *a])  # noqa: E731
    bogus = run("--target", "trt-int8", "--quantizer", "bogus")
    assert bogus.exit_code == 2 and "bogus" in bogus.output and "ort" in bogus.output
    onnx_target = run("--target", "onnx", "--quantizer", "modelopt")
    assert onnx_target.exit_code == 2 and "INT8 targets" in onnx_target.output
    with pytest.raises(ValueError, match="ort-int8.*'modelopt'"):  # the targets table says ort-int8 is ORT's
        build(bundle_copy, "ort-int8", quantizer="modelopt", calib=bundle_copy)


def test_percentile_has_no_modelopt_counterpart(bundle_copy, sample_dir):
    with pytest.raises(ValueError, match="percentile.*--quantizer ort"):
        build(bundle_copy, "trt-int8", quantizer="modelopt", calib=sample_dir / "cells",
              calib_method="percentile")


@pytest.mark.skipif(not available("modelopt.onnx.quantization"),
                    reason="nvidia-modelopt is not installed (extra `modelopt`, kept out of the main venv: "
                           "it pins its own onnx and onnxruntime-gpu)")
def test_modelopt_quantises_the_sample_member_for_tensorrt(bundle_copy, sample_dir):
    from wbc_edge.build.surgery import INPUT, OUTPUT
    from wbc_edge.build.trt_lint import check_trt_compatible
    from wbc_edge.data.datasets import from_folder
    from wbc_edge.edge.classifier import EnsembleClassifier

    b = calibrate_int8(Bundle.load(bundle_copy), "trt-int8-onnx", "s8s8", calib=sample_dir / "cells",
                       n_calib=128, max_f1_drop=1.0, quantizer="modelopt")
    check = b.extra["calibration"]["trt-int8-onnx"]
    assert check["quantizer"] == "modelopt" and check["n_val"] == 270
    assert check["top1_agreement"] >= 0.9  # measured 0.95 (253 calibration cells, minmax)
    path = b.path(b.members[0].artifacts["trt-int8-onnx"])
    model = onnx.load(str(path))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] >= ops["QuantizeLinear"]
    assert [i.name for i in model.graph.input] == [INPUT] and [o.name for o in model.graph.output] == [OUTPUT]
    check_trt_compatible(path)  # symmetric INT8 Q/DQ that TensorRT's parser takes
    with EnsembleClassifier(b, "cpu", views=["id"], artifact="trt-int8-onnx") as clf:  # runs on ORT CPU
        x = Preprocessor.for_bundle(b).load(from_folder(sample_dir / "cells" / "LY"))[0]
        probs = clf.predict(x)
    assert probs.shape == (30, len(b.classes)) and abs(float(probs.sum(1).mean()) - 1) < 1e-4
    # ModelOpt patches ONNX Runtime's quantiser process-wide; ours is put back, so ORT's still works after it
    ort = build(bundle_copy, "ort-int8", calib=sample_dir / "cells", n_calib=64, max_f1_drop=1.0)
    assert ort.extra["calibration"]["ort-int8"]["quantizer"] == "ort"
