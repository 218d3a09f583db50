"""Long-tail losses and class weights (PyTorch). Each loss is `loss(logits, targets) -> scalar`."""
from __future__ import annotations

import numpy as np

from .._optional import require

torch = require("torch", "train")
F = torch.nn.functional


def effective_number_weights(counts, beta: float = 0.9999) -> np.ndarray:
    """Class-balanced weights w_c = (1-beta)/(1-beta^n_c) (Cui et al. 2019), normalised to sum to C."""
    counts = np.asarray(counts, np.float64)
    w = (1.0 - beta) / (1.0 - np.power(beta, np.maximum(counts, 1)))
    return w / w.sum() * len(counts)


def inverse_log_weights(counts) -> np.ndarray:
    """w_c = 1 / ln(1 + n_c), normalised to mean 1: rare classes up-weighted, but gently."""
    w = 1.0 / np.log1p(np.maximum(np.asarray(counts, np.float64), 1))
    return w / w.mean()


class FocalLoss(torch.nn.Module):
    """-w_y (1 - p_t)^gamma log p_t, with p_t the *unweighted* softmax probability of the true class.

    With effective-number weights this is the decoupled entry's hybrid loss; with inverse-log weights
    it is the second WBCBench entry's loss; gamma=0 and no weights is cross-entropy.
    """

    def __init__(self, weights=None, gamma: float = 2.0):
        super().__init__()
        w = torch.as_tensor(weights, dtype=torch.float32) if weights is not None else None
        self.register_buffer("weights", w)
        self.gamma = gamma

    def forward(self, logits, targets):
        logp_t = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
        loss = -((1.0 - logp_t.exp()) ** self.gamma) * logp_t
        if self.weights is not None:
            loss = loss * self.weights[targets]
        return loss.mean()


class LDAMLoss(torch.nn.Module):
    """Label-distribution-aware margins m_c ∝ n_c^(-1/4) (Cao et al. 2019), largest = max_margin.

    Our heads are plain linear layers (not cosine classifiers), so the margin is applied to raw
    logits with scale 1; `set_weights` switches on deferred re-weighting (DRW) late in training.
    """

    def __init__(self, counts, max_margin: float = 0.5):
        super().__init__()
        m = 1.0 / np.power(np.maximum(np.asarray(counts, np.float64), 1), 0.25)
        self.register_buffer("margins", torch.as_tensor(m * (max_margin / m.max()), dtype=torch.float32))
        self.register_buffer("weights", None)

    def set_weights(self, weights) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float32)

    def forward(self, logits, targets):
        shifted = logits - F.one_hot(targets, logits.shape[1]) * self.margins[None, :]
        return F.cross_entropy(shifted, targets, weight=self.weights)


class LogitAdjustedLoss(torch.nn.Module):
    """Cross-entropy on logits + tau * log(prior) (Menon et al. 2021); inference uses plain logits."""

    def __init__(self, priors, tau: float = 1.0):
        super().__init__()
        self.register_buffer("offset", tau * torch.log(torch.as_tensor(priors, dtype=torch.float32).clamp_min(1e-12)))

    def forward(self, logits, targets):
        return F.cross_entropy(logits + self.offset[None, :], targets)


def tau_normalise_(linear, tau: float = 1.0) -> None:
    """In place: W_c <- W_c / ||W_c||^tau and no bias (Kang et al. 2020), equalising class-norm bias."""
    with torch.no_grad():
        norms = linear.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
        linear.weight.div_(norms.pow(tau))
        if linear.bias is not None:
            linear.bias.zero_()
