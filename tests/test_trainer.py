"""Trainer pieces on hand-computed values and real cells: losses, samplers, frozen stage 2, resume."""
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from wbc_edge.trainer import losses as L  # noqa: E402
from wbc_edge.trainer.config import load_config  # noqa: E402
from wbc_edge.trainer.loop import Stage, enter_stage, load_pool, run_epoch  # noqa: E402
from wbc_edge.trainer.members import create_member  # noqa: E402
from wbc_edge.trainer.samplers import class_balanced, instance_balanced  # noqa: E402


def test_effective_number_and_inverse_log_weights_by_hand():
    w = L.effective_number_weights([100, 10], beta=0.99)
    raw = [(1 - 0.99) / (1 - 0.99 ** 100), (1 - 0.99) / (1 - 0.99 ** 10)]
    assert np.allclose(w, np.array(raw) / sum(raw) * 2)
    v = L.inverse_log_weights([100, 10])
    raw = [1 / math.log(101), 1 / math.log(11)]
    assert np.allclose(v, np.array(raw) / np.mean(raw))


def test_hybrid_focal_loss_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    y = torch.tensor([0, 2])
    w = [0.5, 1.0, 2.0]
    p = torch.softmax(logits, 1)
    expected = [-w[0] * (1 - p[0, 0]) ** 2 * math.log(p[0, 0]), -w[2] * (1 - p[1, 2]) ** 2 * math.log(p[1, 2])]
    got = L.FocalLoss(w, gamma=2.0)(logits, y)
    assert abs(got.item() - float(np.mean(expected))) < 1e-6
    # gamma 0, no weights: exactly cross-entropy
    assert torch.allclose(L.FocalLoss(gamma=0.0)(logits, y), torch.nn.functional.cross_entropy(logits, y))


def test_ldam_and_logit_adjustment_by_hand():
    logits = torch.tensor([[1.0, 2.0]])
    y = torch.tensor([1])
    ldam = L.LDAMLoss([16, 1], max_margin=0.5)  # margins ∝ n^-1/4: [0.25, 0.5]
    assert torch.allclose(ldam.margins, torch.tensor([0.25, 0.5]))
    expected = -math.log(math.exp(1.5) / (math.exp(1.0) + math.exp(1.5)))
    assert abs(ldam(logits, y).item() - expected) < 1e-6
    la = L.LogitAdjustedLoss([0.8, 0.2], tau=1.0)
    adj = [1.0 + math.log(0.8), 2.0 + math.log(0.2)]
    expected = -math.log(math.exp(adj[1]) / sum(math.exp(a) for a in adj))
    assert abs(la(logits, y).item() - expected) < 1e-6


def test_tau_normalisation():
    lin = torch.nn.Linear(4, 3)
    L.tau_normalise_(lin, tau=1.0)
    assert torch.allclose(lin.weight.norm(dim=1), torch.ones(3)) and not lin.bias.any()


def test_sampler_class_frequencies():
    labels = np.repeat([0, 1, 2], [900, 90, 10])
    freq = np.bincount(labels[class_balanced(labels, np.random.default_rng(0), 30000)], minlength=3) / 30000
    assert np.allclose(freq, 1 / 3, atol=0.015)
    inst = instance_balanced(labels, np.random.default_rng(0))
    assert sorted(inst) == list(range(1000))


@pytest.fixture(scope="module")
def pool(sample_dir):
    cfg = load_config(data=str(sample_dir / "cells"), progress=False, max_per_class=12)
    return load_pool(cfg.data, cfg, 40)


def test_stage2_leaves_backbone_and_batchnorm_bit_identical(pool):
    cfg = load_config(progress=False, batch_size=16, colour_jitter=0.1)
    model = create_member("mobilenetv3_small_050", len(pool.classes))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage = Stage("classifier", 1, 0.05, "class", L.FocalLoss(np.ones(len(pool.classes))), frozen_backbone=True)
    opt = enter_stage(model, stage, cfg, len(pool.classes))
    ctx = {"cfg": cfg, "gen": torch.Generator().manual_seed(0), "rng": np.random.default_rng(0), "mean": [0.5] * 3,
           "std": [0.25] * 3, "name": "t", "hooks": []}
    run_epoch(model, stage, opt, (pool.x, pool.y), ctx, 0)
    head = {"classifier.weight", "classifier.bias"}
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k not in head)  # BN buffers included
    assert any("running_mean" in k for k in before)
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])


def test_resume_gives_the_same_result(tmp_path, sample_dir):
    from wbc_edge.trainer.loop import train

    common = dict(data=str(sample_dir / "cells"), member="mobilenetv3_small_050", input_size=40, batch_size=16,
                  max_per_class=10, progress=False, recipe="decoupled", epochs=1, stage2_epochs=1)
    straight = train(load_config(out=str(tmp_path / "a"), **common))
    # the same run, stopped after stage 1 and resumed from its checkpoint for stage 2
    train(load_config(out=str(tmp_path / "b"), **{**common, "stage2_epochs": 0}))
    import json
    ck = tmp_path / "b" / "ckpt" / "m0.json"
    assert json.loads(ck.read_text())["next"] == 1
    resumed = train(load_config(out=str(tmp_path / "b"), resume=True, **common))
    st = __import__("safetensors.torch", fromlist=["load_file"])
    a = st.load_file(str(straight.path("m0.safetensors")))
    b = st.load_file(str(resumed.path("m0.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from wbc_edge.data.datasets import open_dataset

    tr, va = (open_dataset(tmp_path / "a" / f"{n}_split.csv") for n in ("train", "val"))
    assert len(tr) and len(va) and not {s.path for s in tr.samples} & {s.path for s in va.samples}
    assert all(Path(s.path).parent.name == s.label for s in tr.samples + va.samples)
    conf = straight.extra["confidence"]  # calibrated on its own validation split, at the end of training
    assert conf["n_val"] == len(va) and conf["fitted_on"].endswith("val_split.csv") and conf["temperature"] > 0


def test_shipped_configs_load_and_a_typo_in_a_file_is_named(tmp_path):
    from pathlib import Path

    from wbc_edge.trainer.config import ConfigError

    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")):
        cfg = load_config(path, epochs=1)
        assert cfg.epochs == 1 and cfg.data
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x\nrecipie: decoupled\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown key 'recipie'; did you mean 'recipe'"):
        load_config(bad)


def test_stain_normalised_training_records_it_and_the_runtime_applies_it(tmp_path, sample_dir):
    """A bundle trained on normalised cells says so, and its Preprocessor's stain step normalises to the
    bundle's reference before the runner."""
    from wbc_edge.bundle import Bundle
    from wbc_edge.edge.classifier import EnsembleClassifier
    from wbc_edge.edge.preprocess import Preprocessor
    from wbc_edge.edge.stain import StainReference, normalise_batch
    from wbc_edge.trainer.loop import train

    b = train(load_config(data=str(sample_dir / "cells"), out=str(tmp_path / "b"), member="mobilenetv3_small_050",
                          input_size=48, epochs=1, batch_size=32, max_per_class=8, progress=False,
                          stain_normalise=True))
    assert b.extra["stain"]["normalise"] is True
    b = Bundle.load(b.root)
    x = np.stack(load_pool(str(sample_dir / "cells"), load_config(max_per_class=2, progress=False), 48).x)
    from wbc_edge.edge.anchor import anchor

    anchored = anchor(x, b.extra["anchor"]) if b.extra.get("anchor") else x  # the colour step anchors first
    by_hand = normalise_batch(anchored, StainReference.from_dict(b.extra["stain"]["reference"]))[0]
    stained = Preprocessor.for_bundle(b).stain(x)
    assert np.array_equal(stained, by_hand) and not np.array_equal(stained, x)
    with EnsembleClassifier(b, views=["id"]) as clf:
        assert np.abs(clf.predict(stained) - clf.predict(by_hand)).max() < 1e-6
