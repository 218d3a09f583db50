"""The site-robust recipe's augmentations and the GroupNorm members, on real cells."""
import cv2
import numpy as np
import pytest

from wbc_edge.data.datasets import from_image_folder
from wbc_edge.edge.preprocess import background_colour, resize_batch
from wbc_edge.trainer import site_augment as sa


@pytest.fixture(scope="module")
def cells(sample_dir):
    x, _, _ = from_image_folder(sample_dir / "cells").subset(range(0, 330, 33)).load(progress=False)
    return resize_batch(x, 128)


def _edges(im):
    return cv2.Canny(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY), 50, 150) > 0


def test_stain_changes_colour_not_shape(cells):
    rng = np.random.default_rng(0)
    out = np.stack([sa.stain(im, rng) for im in cells])
    assert np.abs(out.astype(int) - cells).mean() > 3  # colours moved
    grey_a = cells.astype(np.float32).mean(-1).ravel()
    grey_b = out.astype(np.float32).mean(-1).ravel()
    assert np.corrcoef(grey_a, grey_b)[0, 1] > 0.8  # the cell's structure stays where it was


def test_optics_soften_and_haze(cells):
    rng = np.random.default_rng(1)
    out = np.stack([sa.optics(im, rng) for im in cells])
    sharp = [cv2.Laplacian(im, cv2.CV_32F).var() for im in cells]
    soft = [cv2.Laplacian(im, cv2.CV_32F).var() for im in out]
    assert np.median(soft) < np.median(sharp)
    assert out.std(axis=(1, 2, 3)).mean() < cells.std(axis=(1, 2, 3)).mean()  # less contrast on average


def test_scale_zooms_about_the_centre_and_pads_with_background(cells):
    im = cells[0]
    sa_jitter = sa.SCALE_JITTER
    try:
        sa.SCALE_JITTER = 0.4
        outs = [sa.scale(im, np.random.default_rng(s)) for s in range(20)]
    finally:
        sa.SCALE_JITTER = sa_jitter
    assert all(o.shape == im.shape for o in outs)
    bg = np.asarray(background_colour(im), float)
    zoomed_out = [o for o in outs if np.abs(o[0, 0].astype(float) - bg).max() < 2]
    assert zoomed_out and len(zoomed_out) < len(outs)  # some zoom out (padded), some zoom in


def test_hook_is_deterministic_and_respects_p(cells):
    hook = sa.site_hook(0.5)
    a = hook(cells, np.random.default_rng(3))
    b = hook(cells, np.random.default_rng(3))
    assert np.array_equal(a, b)
    changed = [not np.array_equal(x, y) for x, y in zip(a, cells)]
    assert 0 < sum(changed) < len(cells)
    assert np.array_equal(sa.site_hook(0.0)(cells, np.random.default_rng(0)), cells)
    with pytest.raises(ValueError, match="unknown site augmentation parts"):
        sa.site_hook(0.8, ["stain", "colour"])


def test_groupnorm_member_has_no_batchnorm_and_exports(tmp_path):
    torch = pytest.importorskip("torch")
    from wbc_edge.build.export import export_member
    from wbc_edge.trainer.members import create_member

    torch.manual_seed(0)
    m = create_member("mobilenetv3_small_100_gn", 5).eval()
    assert not any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())
    assert any(isinstance(x, torch.nn.GroupNorm) for x in m.modules())
    x = torch.randn(3, 3, 64, 64)
    path = export_member(m, tmp_path / "gn.onnx", 64)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - m(x).detach().numpy()).max() < 1e-4
    # per-sample statistics: a cell's output does not depend on the other cells of its batch
    assert np.abs(m(x[:1]).detach().numpy() - m(x).detach().numpy()[:1]).max() < 1e-5
    m.train()
    assert np.abs(m(x[:1]).detach().numpy() - m(x).detach().numpy()[:1]).max() < 1e-5


def test_groupnorm_member_starts_from_its_own_weights_file(tmp_path):
    """Fine-tuning a GroupNorm member (`pretrained_file`: a bundle's safetensors) starts from exactly
    those weights, though timm builds the backbone with BatchNorm first."""
    torch = pytest.importorskip("torch")
    from wbc_edge.trainer.checkpoint import save_weights
    from wbc_edge.trainer.members import create_member

    torch.manual_seed(0)
    trained = create_member("mobilenetv3_small_100_gn", 5)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the initial weights
    path = save_weights(trained, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    again = create_member("mobilenetv3_small_100_gn", 5, pretrained_file=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), trained.eval()(x))
