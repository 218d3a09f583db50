import numpy as np
import pytest

torch = pytest.importorskip("torch")

from wbc_edge.edge import tta  # noqa: E402
from wbc_edge.trainer.augment import d4  # noqa: E402


def test_numpy_views_equal_the_training_d4_group(sample_dir):
    """Runtime TTA (uint8 NHWC, NumPy) and training augmentation (NCHW, torch) are the same 8 views."""
    from wbc_edge.data.datasets import from_image_folder

    from wbc_edge.edge.preprocess import resize_batch

    imgs = resize_batch(from_image_folder(sample_dir / "cells").subset(range(4)).load(progress=False)[0], 32)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    for k, name in enumerate(tta.VIEWS):
        assert np.array_equal(tta.view(imgs, name), d4(x, k).permute(0, 2, 3, 1).numpy()), name
    views = tta.expand(imgs, list(tta.VIEWS))
    assert views.shape == (32, 32, 32, 3)
    probs = np.random.default_rng(0).random((32, 5))
    assert np.allclose(tta.merge(probs, 8), probs.reshape(8, 4, 5).mean(0))
    with pytest.raises(ValueError, match="unknown TTA"):
        tta.expand(imgs, ["spin"])
