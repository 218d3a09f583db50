"""Refinement phase 1 (logit offsets for macro-F1) and the Refiner's change records."""
import json
import shutil

import numpy as np

from wbc_edge.edge.preprocess import Preprocessor
from wbc_edge import metrics
from wbc_edge.bundle import Bundle
from wbc_edge.edge.refine.boost import adjusted, fit_offsets, prior_offsets
from wbc_edge.edge.refine.refiner import Refiner, fit_refinement
from wbc_edge.evaluate import evaluate


def _underconfident_rare(n=600, seed=0):
    """Class 2 is rare and its probability is systematically shrunk: offsets should recover it."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, n, p=[0.5, 0.4, 0.1])
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), y] += 2.0
    logits[:, 2] -= 1.5
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True), y


def test_offsets_raise_macro_f1_and_help_the_rare_class():
    probs, y = _underconfident_rare()
    offsets, fit = fit_offsets(probs, y)
    assert fit["macro_f1_after"] > fit["macro_f1_before"] + 0.02
    assert offsets[2] > offsets[0]
    assert np.isclose(metrics.macro_f1(y, adjusted(probs, offsets), range(3)), fit["macro_f1_after"])
    test_p, test_y = _underconfident_rare(seed=1)  # and it carries over to fresh cells of the same kind
    assert metrics.macro_f1(test_y, adjusted(test_p, offsets), range(3)) > \
        metrics.macro_f1(test_y, test_p.argmax(1), range(3))
    assert np.argmax(prior_offsets([0.5, 0.4, 0.1])) == 2


def test_refiner_records_every_change():
    probs, _ = _underconfident_rare(50)
    ref = Refiner({"boost": {"enabled": True, "offsets": [0.0, 0.0, 3.0]}}, ["A", "B", "C"])
    pred, changes = ref(probs)
    moved = np.flatnonzero(pred != probs.argmax(1))
    assert len(moved) and all(changes[i] == [{"phase": "boost", "from": "AB"[probs[i].argmax()], "to": "C"}]
                              for i in moved)
    assert not Refiner({"boost": {"enabled": False, "offsets": [0, 0, 3]}}, ["A", "B", "C"]).active


def test_fit_refinement_on_a_bundle_and_evaluate_records_changes(tmp_path, sample_bundle, sample_dir):
    work = tmp_path / "bundle"
    shutil.copytree(sample_bundle, work)
    b = Bundle.load(work)
    boost = fit_refinement(b, sample_dir / "cells")
    assert set(boost) >= {"enabled", "offsets", "check_macro_f1_before", "check_macro_f1_after"}
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["refine"]["boost"]["offsets"] == boost["offsets"]
    b.extra["refine"]["boost"].update(enabled=True, offsets=[0.0] * 8 + [2.0])  # force changes to appear
    b.save()
    rep = evaluate(work, sample_dir / "cells", tmp_path / "ev", progress=False)
    rows = [json.loads(r) for r in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    changed = [r for r in rows if r.get("refine")]
    assert rep["refined"] and rep["n_refined"] > 0 and changed
    assert all(r["pred"] == r["refine"][-1]["to"] and r["pred_raw"] == r["refine"][0]["from"] for r in changed)
    raw = evaluate(work, sample_dir / "cells", tmp_path / "ev2", progress=False, refine=False)
    assert not raw["refined"] and raw["n_refined"] == 0


def test_morphology_filter_switches_only_close_calls_nearer_the_rare_model():
    from wbc_edge.edge.refine.biofilter import bio_filter, pair_confusion
    from wbc_edge.edge.refine.features import FEATURE_NAMES
    from wbc_edge.edge.refine.models import MorphologyModel

    rng = np.random.default_rng(0)
    d = len(FEATURE_NAMES)
    xa, xb = rng.normal(0, 1, (200, d)), rng.normal(3, 1, (200, d))  # two well separated morphologies
    model = MorphologyModel.fit(np.vstack([xa, xb]), ["SNE"] * 200 + ["BNE"] * 200, ["SNE", "BNE"])
    classes = ["SNE", "BNE"]
    probs = np.array([[0.6, 0.4], [0.6, 0.4], [0.95, 0.05]])  # the third call is not close
    feats = np.vstack([rng.normal(3, 1, (1, d)), rng.normal(0, 1, (1, d)), rng.normal(3, 1, (1, d))])
    new, changes = bio_filter(probs, probs.argmax(1), feats, model, classes, [("SNE", "BNE")], close=0.25)
    assert list(new) == [1, 0, 0]
    assert changes[0] == [{"phase": "morphology", "from": "SNE", "to": "BNE", "rule": "nearer"}]
    assert not changes[1] and not changes[2]
    assert pair_confusion(np.array([1, 0, 1]), new, classes, [("SNE", "BNE")]) == {"SNE/BNE": {"SNE->BNE": 0,
                                                                                               "BNE->SNE": 1}}


def test_fit_morphology_records_its_decision(tmp_path, sample_bundle, sample_dir):
    from wbc_edge.edge.refine.refiner import fit_morphology

    work = tmp_path / "bundle"
    shutil.copytree(sample_bundle, work)
    res = fit_morphology(Bundle.load(work), sample_dir / "cells", sample_dir / "cells", close=0.5)
    saved = json.loads((work / "manifest.json").read_text())["refine"]["morphology"]
    assert saved["enabled"] == res["enabled"] == (res["val_macro_f1_after"] > res["val_macro_f1_before"])
    assert ["SNE", "BNE"] in saved["pairs"] and saved["model"]["classes"]
    from wbc_edge.data.datasets import from_image_folder

    b = Bundle.load(work)  # the stored models load back and run on real crops
    x = Preprocessor.for_bundle(b).load(from_image_folder(sample_dir / "cells", ["SNE", "BNE"]))[0]
    probs = np.tile([[0.0] * 8 + [1.0]], (len(x), 1))
    probs[:, b.classes.index("BNE")] = 0.9  # every SNE call has BNE close behind
    probs /= probs.sum(1, keepdims=True)
    refiner = Refiner({"morphology": {**saved, "enabled": True}}, b.classes)
    pred, changes = refiner(probs, x)
    moved = [c for c in changes if c]
    assert moved and all(c[0]["from"] == "SNE" and c[0]["to"] == "BNE" for c in moved)


def test_outlier_rule_finds_a_rare_class_never_seen_in_training():
    """LY/PLY with no PLY cells to model: a lymphocyte call whose spikiness is far outside the LY model
    becomes PLY when PLY is close behind; ordinary lymphocytes and far-behind calls stay LY."""
    from wbc_edge.edge.refine.biofilter import active_pairs, bio_filter, outlier_z
    from wbc_edge.edge.refine.features import FEATURE_NAMES
    from wbc_edge.edge.refine.models import MorphologyModel

    rng = np.random.default_rng(0)
    f = FEATURE_NAMES.index("spikiness")
    train = rng.normal(1.0, 0.1, (200, len(FEATURE_NAMES)))
    classes = ["LY", "PLY"]
    model = MorphologyModel.fit(train, ["LY"] * 200, classes)  # PLY: no cells, no model
    assert "PLY" not in model.classes
    assert active_pairs([("LY", "PLY")], classes, model, {}) == []
    assert active_pairs([("LY", "PLY")], classes, model, {"LY/PLY": ("spikiness", 2.5)}) == [("LY", "PLY")]
    cells = rng.normal(1.0, 0.1, (4, len(FEATURE_NAMES)))
    cells[[1, 3], f] = 2.0  # ten LY standard deviations spikier than a lymphocyte
    z = outlier_z(model, cells, "LY", "spikiness")
    assert z[1] > 5 and z[3] > 5 and abs(z[0]) < 4
    probs = np.array([[0.6, 0.4], [0.6, 0.4], [0.95, 0.05], [0.95, 0.05]])  # cells 2, 3: PLY far behind
    new, changes = bio_filter(probs, np.zeros(4, int), cells, model, classes, [("LY", "PLY")], close=0.25,
                              outliers={"LY/PLY": ("spikiness", 2.5)})
    assert new.tolist() == [0, 1, 0, 0]
    assert changes[1] == [{"phase": "morphology", "from": "LY", "to": "PLY", "rule": "outlier:spikiness"}]
    assert bio_filter(probs, np.zeros(4, int), cells, model, classes, [("LY", "PLY")], close=0.25,
                      outliers={})[0].tolist() == [0, 0, 0, 0]  # without the rule the pair is inactive
