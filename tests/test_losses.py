"""The paper's losses, PR and pseudo-negative sampling against a plain per-entry implementation
written here, and hand-computed values (the methods since the paper: their own test files)."""

import math

import numpy as np
import pytest
import torch

from spl.data.common import SplError
from spl.fit.losses import (
    LOSSES,
    PAPER_LOSSES,
    estimator_from_probabilities,
    estimator_init,
    loss,
    parse_losses,
)


def lp(p):  # l+(p), written out again
    return -math.log(p + 1e-5)


def ln(p):  # l-(p)
    return -math.log(1 - p + 1e-5)


def sig(x):
    return 1 / (1 + math.exp(-x))


def reference_loss(key, logits, y, z, k, *, est=None, eta=None, eps=0.1, gamma=None):
    """Per entry, straight from docs/protocol.md section 4, in Python floats."""
    B, L = len(logits), len(logits[0])
    p = [[sig(v) for v in row] for row in logits]
    gamma = 1 / (L - 1) if gamma is None else gamma
    total = 0.0
    for n in range(B):
        for i in range(L):
            P, Y, Z = p[n][i], y[n][i], z[n][i]
            if key == "bce":
                m = lp(P) if Y == 1 else ln(P)
            elif key == "bce_ls":
                m = (1 - eps) * lp(P) + eps * ln(P) if Y == 1 else (1 - eps) * ln(P) + eps * lp(P)
            elif key == "iun":
                m = lp(P) if Z == 1 else (ln(P) if Y == 0 else 0.0)
            elif key == "iu":
                m = lp(P) if Z == 1 else (ln(P) if Z == -1 else 0.0)
            elif key == "an":
                m = lp(P) if Z == 1 else ln(P)
            elif key == "an_ls":
                m = (1 - eps) * lp(P) + eps * ln(P) if Z == 1 else (1 - eps) * ln(P) + eps * lp(P)
            elif key == "wan":
                m = lp(P) if Z == 1 else gamma * ln(P)
            elif key == "epr":
                m = lp(P) if Z == 1 else 0.0
            elif key == "pseudo_neg":
                m = lp(P) if Z == 1 else eta[n][i] * ln(P)
            elif key == "pr":
                m = 0.0
                if Z == 1:
                    m = sum(max(0.0, 1 - P + p[n][j]) for j in range(L) if z[n][j] == 0)
            elif key == "role":
                E = sig(est[n][i])
                m = 0.5 * ((lp(P) + lp(E)) if Z == 1 else 0.0)
                m += 0.5 * (E * lp(P) + (1 - E) * ln(P) + P * lp(E) + (1 - P) * ln(E))
            total += m
    loss = total / (B * L)

    def penalty(q):
        return (sum(sum(row) for row in q) / B - k) ** 2 / L**2

    if key == "epr":
        loss += penalty(p)
    if key == "role":
        loss += 0.5 * (penalty(p) + penalty([[sig(v) for v in row] for row in est]))
    return loss


def random_batch(seed, B=6, L=5, negatives=False):
    rng = np.random.RandomState(seed)
    y = (rng.rand(B, L) < 0.4).astype(int)
    y[np.arange(B), rng.randint(0, L, B)] = 1
    z = np.zeros_like(y)
    for n in range(B):
        z[n, rng.choice(np.nonzero(y[n])[0])] = 1
        if negatives and (y[n] == 0).any():
            z[n, rng.choice(np.nonzero(y[n] == 0)[0])] = -1
    logits = rng.randn(B, L) * 2
    est = rng.randn(B, L)
    eta = (rng.rand(B, L) < 0.5).astype(int)
    return logits, y, z, est, eta


# The keys reference_loss writes out (the methods since the paper are tested in their own
# files): a new loss adds its own per-entry test, and changes none here.
WRITTEN_OUT = [
    "bce",
    "bce_ls",
    "iun",
    "iu",
    "an",
    "an_ls",
    "wan",
    "epr",
    "pseudo_neg",
    "pr",
    "role",
]


@pytest.mark.parametrize("key", WRITTEN_OUT)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_per_entry_reference(key, seed):
    logits, y, z, est, eta = random_batch(seed, negatives=key == "iu")
    state = {"estimates": torch.tensor(est), "pseudo_negatives": torch.tensor(eta).double()}
    kwargs = {k: v for k, v in state.items() if k in LOSSES[key].batch_state_names}
    if key in ("epr", "role"):
        kwargs["expected_positives"] = 1.7
    got = loss(key, torch.tensor(logits), torch.tensor(z), labels=torch.tensor(y), **kwargs).item()
    expected = reference_loss(key, logits, y, z, 1.7, est=est, eta=eta)
    assert got == pytest.approx(expected, rel=1e-10)


def test_hand_computed_values():
    # one image, two classes, p = (0.5, sigmoid(ln 3) = 0.75), observed positive: class 0
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    labels, observed = torch.tensor([[1.0, 1.0]]).double(), torch.tensor([[1.0, 0.0]]).double()
    an = loss("an", logits, observed).item()
    assert an == pytest.approx((-math.log(0.50001) - math.log(0.25001)) / 2)
    epr = loss("epr", logits, observed, expected_positives=1.0).item()
    assert epr == pytest.approx(-math.log(0.50001) / 2 + (1.25 - 1.0) ** 2 / 4)
    # WAN weights the unobserved entry by 1 / (L - 1) = 1 here; gamma is a knob
    wan = loss("wan", logits, observed, gamma=0.5).item()
    assert wan == pytest.approx((-math.log(0.50001) - 0.5 * math.log(0.25001)) / 2)
    bce = loss("bce", logits, observed, labels=labels).item()
    assert bce == pytest.approx((-math.log(0.50001) - math.log(0.75001)) / 2)


def test_role_stop_gradients():
    """The classifier gets no gradient through the estimator's targets and vice versa."""
    logits = torch.tensor([[0.3, -0.2, 1.0]], requires_grad=True)
    est = torch.tensor([[2.0, 0.1, -0.5]], requires_grad=True)
    observed = torch.tensor([[1.0, 0.0, 0.0]])
    loss("role", logits, observed, estimates=est, expected_positives=1.0).backward()
    p, e = torch.sigmoid(logits.detach()), torch.sigmoid(est.detach())
    # d/dlogit of 1/2 [z l+(p) + e l+(p) + (1-e) l-(p)] / (B L) + 1/2 R_k(P)
    eps = 1e-5
    dlp = -p * (1 - p) / (p + eps)
    dln = p * (1 - p) / (1 - p + eps)
    z = torch.tensor([[1.0, 0.0, 0.0]])
    direct = 0.5 * (z * dlp + e * dlp + (1 - e) * dln) / 3
    reg = 0.5 * 2 * (p.sum() - 1.0) / 9 * p * (1 - p)
    torch.testing.assert_close(logits.grad, direct + reg)


def test_registry_and_parsing():
    assert PAPER_LOSSES == ["bce", "bce_ls", "iun", "iu", "an", "an_ls", "wan", "epr", "role"]
    assert parse_losses("paper") == PAPER_LOSSES
    assert set(parse_losses("all")) == set(LOSSES) and "pr" in LOSSES
    assert parse_losses("an, role,an") == ["an", "role"]
    with pytest.raises(SplError, match="available: bce, bce_ls"):
        parse_losses("an,bogus")


def test_estimator_initialisation():
    observed = torch.tensor([[1, 0, -1, 0]] * 500)
    theta = estimator_init(observed, torch.Generator().manual_seed(0))
    probs = torch.sigmoid(theta)
    assert torch.allclose(probs[:, 0], torch.tensor(0.995))
    assert torch.allclose(probs[:, 2], torch.tensor(0.005))
    free = probs[:, [1, 3]]
    assert free.min() >= 0.4 - 1e-6 and free.max() <= 0.6 + 1e-6 and free.std() > 0.05
    back = estimator_from_probabilities(torch.tensor([0.0, 0.3, 1.0]))
    torch.testing.assert_close(torch.sigmoid(back), torch.tensor([1e-5, 0.3, 1 - 1e-5]))
