"""The fused ensemble graph: TTA views, members and their averaging in one ONNX Runtime call.

Speed is in benchmarks/throughput.py; here: the graph's views are exactly `tta.expand`, and the fused
path gives the same classes (and probabilities to float precision) as the members run one by one."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from wbc_edge.build.builder import build
from wbc_edge.build.fuse import view_form, view_nodes
from wbc_edge.bundle import Bundle
from wbc_edge.data.datasets import from_image_folder
from wbc_edge.edge import tta
from wbc_edge.edge.classifier import EnsembleClassifier
from wbc_edge.edge.preprocess import Preprocessor
from wbc_edge.edge.runners import OrtRunner

D4 = list(tta.VIEWS)


@pytest.fixture(scope="module")
def cells(sample_dir, sample_bundle):
    """Model-input cells of every sample cell, through the bundle's own preprocessor."""
    b = Bundle.load(sample_bundle)
    return Preprocessor.for_bundle(b).load(from_image_folder(sample_dir / "cells"))[0]


def _fused_copy(src, dst, views) -> Bundle:
    import shutil

    shutil.copytree(src, dst)
    b = Bundle.load(dst)
    b.extra["tta"] = {"views": list(views)}
    b.save()
    return build(dst, "onnx", fuse=True)


def test_graph_views_are_the_numpy_views(tmp_path, cells):
    """Every D4 view the graph builds (Transpose / reversed Slice on uint8 NHWC) equals tta.view, view-major."""
    assert view_form("rot270_flip") == ("T",) and view_form("rot90") == ("T", "H")
    nodes, inits, out = view_nodes(D4)
    assert sorted(n.op_type for n in nodes).count("Transpose") == 1  # the views share their prefixes
    size = cells.shape[1]
    graph = helper.make_graph(nodes, "views", [helper.make_tensor_value_info("images", TensorProto.UINT8,
                                                                              ["b", size, size, 3])],
                              [helper.make_tensor_value_info(out, TensorProto.UINT8, ["vb", size, size, 3])], inits)
    path = tmp_path / "views.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    import onnxruntime as ort

    x = cells[:5]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    assert got.dtype == np.uint8 and np.array_equal(got, tta.expand(x, D4))


@pytest.mark.parametrize("views", [["id", "flip"], D4])
def test_fused_gives_the_classes_of_the_members(tmp_path, sample_bundle, cells, views):
    """Same classes on all 330 sample cells, fused (one call: views, members, means inside) vs the
    members with NumPy views; and the fused graph reads the view list from the bundle."""
    b = _fused_copy(sample_bundle, tmp_path / "b", views)
    assert b.extra["fused"]["views"] == views
    assert onnx.load(str(b.path(b.extra["fused"]["onnx"]))).metadata_props  # views recorded in the graph too
    reloaded = Bundle.load(tmp_path / "b")
    with EnsembleClassifier(reloaded) as fused, EnsembleClassifier(reloaded, fused=False) as apart:
        assert fused.fused and fused.views_inside and len(fused.runners) == 1
        graph = onnx.load(str(reloaded.path(reloaded.extra["fused"]["onnx"]))).graph
        # the views sit inside the member, after its normalisation (float NCHW), not on the uint8 input
        first = next(n for n in graph.node if n.op_type in ("Slice", "Transpose", "Concat") and "tta" in n.output[0])
        assert first.input[0] != "images"
        p_fused, p_apart = fused.predict(cells), apart.predict(cells)
    assert np.array_equal(p_fused.argmax(1), p_apart.argmax(1))
    assert np.abs(p_fused - p_apart).max() < 1e-5
    # and the shipped bundle itself (its own fused graph, built for its views) agrees on its own views
    if views == Bundle.load(sample_bundle).views:
        with EnsembleClassifier(Bundle.load(sample_bundle)) as shipped:
            assert shipped.fused and shipped.views_inside
            assert np.array_equal(shipped.predict(cells).argmax(1), p_fused.argmax(1))


def test_other_views_than_the_fused_ones_run_the_members(tmp_path, sample_bundle, cells):
    b = _fused_copy(sample_bundle, tmp_path / "b", ["id", "flip"])
    with EnsembleClassifier(b, views=["id", "rot90"]) as other, EnsembleClassifier(b, views=["id", "rot90"],
                                                                                   fused=False) as apart:
        assert not other.fused and len(other.runners) == len(b.members)
        assert np.array_equal(other.predict(cells[:40]), apart.predict(cells[:40]))


def test_int8_members_are_fused_too(tmp_path, sample_bundle, sample_dir, cells):
    """`build --target ort-int8` then `--fuse`: the INT8 members fused with the views; a new INT8 build
    drops the stale fused INT8 graph."""
    import shutil

    shutil.copytree(sample_bundle, tmp_path / "b", ignore=shutil.ignore_patterns("*.int8*"))
    build(tmp_path / "b", "ort-int8", calib=sample_dir / "cells", n_calib=32, max_f1_drop=1.0)
    b = build(tmp_path / "b", "onnx", fuse=True)
    fused_int8 = b.extra["fused"]["artifacts"]["ort-int8"]
    reloaded = Bundle.load(tmp_path / "b")  # checksummed like the other files
    x = cells[:64]
    with EnsembleClassifier(reloaded, precision="int8") as fused, \
            EnsembleClassifier(reloaded, precision="int8", fused=False) as apart:
        assert fused.views_inside and fused.runners[0].name.endswith(fused_int8)
        assert np.array_equal(fused.predict(x).argmax(1), apart.predict(x).argmax(1))
    with OrtRunner(reloaded.path(fused_int8)) as r:
        assert r.infer(x).shape == (64, len(reloaded.classes))
    build(tmp_path / "b", "ort-int8", calib=sample_dir / "cells", n_calib=32, max_f1_drop=1.0)
    assert "ort-int8" not in Bundle.load(tmp_path / "b").extra["fused"]["artifacts"]
    assert not (tmp_path / "b" / fused_int8).exists()


def _anchor_per_pixel(batch, reference):
    """The colour anchor as first written (NaN-padded medians, float arithmetic per pixel): the oracle
    for the per-image medians and lookup tables the preprocessor now uses."""
    px = batch.reshape(len(batch), -1, 3).astype(np.float32)
    total = px.sum(-1)

    def med(mask):
        return np.nanmedian(np.where(mask[..., None], px, np.nan), axis=1)

    bg = med(total >= np.percentile(total, 90.0, axis=1, keepdims=True))
    dark = med(total <= np.percentile(total, 2.0, axis=1, keepdims=True))
    ref_bg, ref_dark = (np.asarray(reference[k], np.float32) for k in ("background", "dark"))
    gain = (ref_bg - ref_dark) / np.maximum(bg - dark, 8.0)
    out = ref_dark + (batch.astype(np.float32) - dark[:, None, None, :]) * gain[:, None, None, :]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def test_fast_colour_anchor_is_bit_identical(sample_bundle, sample_dir):
    from wbc_edge.edge.anchor import anchor

    b = Bundle.load(sample_bundle)
    pre = Preprocessor.for_bundle(b)
    pre.anchor = None  # the canonical cells before the colour step
    raw = pre.load(from_image_folder(sample_dir / "cells"))[0]
    flat = np.full((2, *raw.shape[1:]), 200, np.uint8)  # a blank image: the range floor, no stretch
    x = np.concatenate([raw, flat])
    assert np.array_equal(anchor(x, b.extra["anchor"]), _anchor_per_pixel(x, b.extra["anchor"]))
