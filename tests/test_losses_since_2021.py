"""The methods since the paper, each against a plain per-entry implementation written here
from docs/methods.md (value and logit gradient in float64, at several epochs where a schedule
applies), and their state updates against plain replays."""

import math

import numpy as np
import pytest
import torch

from spl.data.common import SplError
from spl.fit.losses import LOSSES, SINCE_2021, Batch, Context, apl_label, clean_rate, get_loss, loss


def sig(x):
    return 1 / (1 + math.exp(-x))


def nlog(x, eps):
    return -math.log(x + eps)


def softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0)


def em_entry(p, z, alpha, target=None, beta=None):
    if z == 1:
        return nlog(p, 1e-5)
    if target is not None and not math.isnan(target) and target != 0:
        return beta * (target * nlog(p, 1e-5) + (1 - target) * nlog(1 - p, 1e-5))
    return -alpha * (p * nlog(p, 1e-5) + (1 - p) * nlog(1 - p, 1e-5))


def gr_entry(p, z, epoch, epochs, k_schedule=(0, 2, -2, -2), v_schedule=(0.5, 2, 0.8, 0.5),
             q=(0.01, 1.0), frozen=None):  # fmt: skip
    """``frozen``: the detached p that k and v see (p itself when None)."""
    if z == 1:
        return nlog(p, 1e-7)
    if z == -1:
        return 0.0
    w0, wT, b0, bT = k_schedule
    mu0, s0, muT, sT = v_schedule
    w = w0 + (wT - w0) * max(epoch - 1, 0) / epochs
    b = b0 + (bT - b0) * max(epoch - 1, 0) / epochs
    mu = mu0 + (muT - mu0) * epoch / epochs
    sigma = s0 + (sT - s0) * epoch / epochs
    p_hat = p if frozen is None else frozen
    k = sig(w * p_hat + b)
    v = math.exp(-((p_hat - mu) ** 2) / (2 * sigma**2))
    q2, q3 = q
    return v * (k * (1 - p**q2) / q2 + (1 - k) * (1 - (1 - p) ** q3) / q3)


def hill_entry(x, z, lamb=1.5, margin=1.0, gamma=2.0):
    if z == 1:
        pm = sig(x - margin)
        return (1 - pm) ** gamma * -math.log(pm)
    p = sig(x)
    return (lamb - p) * p**2


def splc_entry(x, z, epoch, tau=0.6, change_epoch=2, margin=1.0, gamma=2.0):
    shifted = x - margin if z == 1 else x
    q = sig(shifted)
    target = 1 if z == 1 or (epoch >= change_epoch and q > tau) else 0
    if target == 1:
        return (1 - q) ** gamma * softplus(-shifted)
    return q**gamma * softplus(shifted)


def asl_entry(x, z, gamma_neg=4.0, gamma_pos=0.0, clip=0.05, frozen=None):
    """``frozen``: the logit the (detached) focusing weight sees (x itself when None)."""
    p, p_hat = sig(x), sig(x if frozen is None else frozen)
    if z == 1:
        return -((1 - p_hat) ** gamma_pos) * math.log(max(p, 1e-8))
    negative = min(1 - p + clip, 1.0)
    weight = (1 - min(1 - p_hat + clip, 1.0)) ** gamma_neg
    return -weight * math.log(max(negative, 1e-8))


def ll_batch(logits, z, epoch, delta_rel, variant, flips=None):
    """LL-R / LL-Ct / LL-Cp of a batch, per entry (docs/methods.md section 3)."""
    B, L = len(logits), len(logits[0])
    eff = [
        [1 if flips is not None and flips[n][i] else z[n][i] for i in range(L)] for n in range(B)
    ]
    y = [[max(eff[n][i], 0) for i in range(L)] for n in range(B)]

    def bce(x, t):
        return softplus(x) - t * x

    losses = [[bce(logits[n][i], y[n][i]) for i in range(L)] for n in range(B)]
    corrected = [[bce(logits[n][i], 1 - y[n][i]) for i in range(L)] for n in range(B)]
    rate = 1.0
    for _ in range(epoch - 1):
        rate -= delta_rel / 100
    if epoch == 1 or rate == 1:
        return sum(map(sum, losses)) / (B * L)
    k = math.ceil(B * L * (delta_rel / 100 if variant == "ll_cp" else 1 - rate))
    ranked = sorted(((losses[n][i] if eff[n][i] == 0 else 0.0) for n in range(B) for i in range(L)),
                    reverse=True)  # fmt: skip
    tau = ranked[k - 1]
    total = 0.0
    for n in range(B):
        for i in range(L):
            r = losses[n][i] if eff[n][i] == 0 else 0.0
            if r >= tau:
                total += 0.0 if variant == "ll_r" else corrected[n][i]
            else:
                total += losses[n][i]
    return total / (B * L)


def reference(key, logits, z, epoch, epochs, targets=None, flips=None, frozen=None):
    """The batch loss written out per entry, with each loss's defaults (VOC's); ``frozen``
    the logits that detached weights see (GR's k and v, ASL's focusing weight)."""
    B, L = len(logits), len(logits[0])
    frozen = frozen or logits
    entries = [(n, i) for n in range(B) for i in range(L)]
    if key in ("ll_r", "ll_ct", "ll_cp"):
        delta = {"ll_r": 0.2, "ll_ct": 0.2, "ll_cp": 0.1}[key]
        return ll_batch(logits, z, epoch, delta, key, flips)
    if key == "em":
        return sum(em_entry(sig(logits[n][i]), z[n][i], 0.2) for n, i in entries) / (B * L)
    if key == "em_apl":
        return sum(em_entry(sig(logits[n][i]), z[n][i], 0.2, targets[n][i], 0.02)
                   for n, i in entries) / (B * L)  # fmt: skip
    if key == "gr":
        return sum(gr_entry(sig(logits[n][i]), z[n][i], epoch, epochs,
                            frozen=sig(frozen[n][i])) for n, i in entries) / (B * L)  # fmt: skip
    if key == "hill":
        return sum(hill_entry(logits[n][i], z[n][i]) for n, i in entries)
    if key == "splc":
        return sum(splc_entry(logits[n][i], z[n][i], epoch) for n, i in entries)
    if key == "asl":
        return sum(asl_entry(logits[n][i], z[n][i], frozen=frozen[n][i]) for n, i in entries)
    raise KeyError(key)


def batch(seed, B=6, L=5, negatives=False):
    rng = np.random.RandomState(seed)
    z = np.zeros((B, L), dtype=int)
    z[np.arange(B), rng.randint(0, L, B)] = 1
    if negatives:
        for n in range(B):
            free = np.nonzero(z[n] == 0)[0]
            z[n, rng.choice(free)] = -1
    logits = rng.randn(B, L) * 2.5
    targets = np.where(rng.rand(B, L) < 0.3, rng.rand(B, L) * 0.4, np.nan)
    targets[z == 1] = np.nan
    flips = (rng.rand(B, L) < 0.15) & (z == 0)
    return logits, z, targets, flips


def numeric_gradient(function, logits, step=1e-6):
    grad = np.zeros_like(logits)
    for index in np.ndindex(*logits.shape):
        up, down = logits.copy(), logits.copy()
        up[index] += step
        down[index] -= step
        grad[index] = (function(up) - function(down)) / (2 * step)
    return grad


@pytest.mark.parametrize("key", SINCE_2021)
@pytest.mark.parametrize("epoch", [1, 2, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_per_entry_reference(key, epoch, seed):
    logits, z, targets, flips = batch(seed)
    kwargs = {}
    if key == "em_apl":
        kwargs["pseudo_targets"] = torch.tensor(targets)
    z_in = np.where(flips, 1, z) if key == "ll_cp" else z  # ll_cp's input carries its flips
    value = loss(key, torch.tensor(logits, requires_grad=True), torch.tensor(z_in), epoch=epoch,
                 num_epochs=8, **kwargs)  # fmt: skip
    expected = reference(key, logits.tolist(), z.tolist(), epoch, 8, targets.tolist(),
                         flips.tolist() if key == "ll_cp" else None)  # fmt: skip
    assert value.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # the gradient: autograd of the value, and the closed form, against central differences
    tensor = torch.tensor(logits, requires_grad=True)
    loss(key, tensor, torch.tensor(z_in), epoch=epoch, num_epochs=8, **kwargs).backward()
    cls = get_loss(key)
    instance = cls.make(context=Context(5))
    from spl.fit.losses import Batch

    state = {"pseudo_targets": torch.tensor(targets)} if key == "em_apl" else {}
    _, closed = instance.logit_gradient(torch.tensor(logits), Batch(torch.tensor(z_in).double(),
                                        epoch=epoch, num_epochs=8, state=state))  # fmt: skip

    def as_function(values):  # detached weights stay at the batch's own logits
        return reference(key, values.tolist(), z.tolist(), epoch, 8, targets.tolist(),
                         flips.tolist() if key == "ll_cp" else None, logits.tolist())  # fmt: skip

    numeric = numeric_gradient(as_function, logits)
    # LL's selection and SPLC's correction are steps: away from their edges the gradient is
    # the selected branch's, which the central difference sees when no entry sits on an edge.
    np.testing.assert_allclose(tensor.grad.numpy(), numeric, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(closed.numpy(), numeric, atol=1e-6, rtol=1e-6)


def test_hand_computed_values():
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)  # p = 0.5, 0.75
    observed = torch.tensor([[1, 0]])
    h = 0.75 * -math.log(0.75001) + 0.25 * -math.log(0.25001)
    expected = (-math.log(0.50001) - 0.1 * h) / 2
    assert loss("em", logits, observed, alpha=0.1).item() == pytest.approx(expected)
    # Hill, unobserved p = 0.75: (1.5 - 0.75) * 0.75^2; positive: pm = sigmoid(-1)
    pm = 1 / (1 + math.e)
    expected = (1 - pm) ** 2 * -math.log(pm) + 0.75 * 0.5625
    assert loss("hill", logits, observed).item() == pytest.approx(expected)
    # ASL, unobserved p = 0.75: pm = 0.70, weight 0.70^4, log(1 - 0.70)
    expected = -math.log(0.5) - 0.7**4 * math.log(0.3)
    assert loss("asl", logits, observed).item() == pytest.approx(expected)


def test_gr_schedules_are_one_epoch_apart():
    from spl.fit.losses import gr_schedule

    first = gr_schedule((0, 2, -2, -2), (0.5, 2, 0.8, 0.5), 1, 8)
    last = gr_schedule((0, 2, -2, -2), (0.5, 2, 0.8, 0.5), 8, 8)
    assert first[:2] == (0.0, -2.0)  # w, b at their start in epoch 1
    assert first[2] == pytest.approx(0.5 + 0.3 / 8)  # mu already one step in
    assert last[0] == pytest.approx(2 * 7 / 8) and last[2] == pytest.approx(0.8)


def test_ll_schedule_by_repeated_subtraction():
    assert clean_rate(0.002, 1) == 1.0
    # 1 - 0.002 by subtraction, times 1000 entries: 2.0000000000000018, so k = 3
    assert math.ceil(1000 * (1 - clean_rate(0.002, 2))) == 3
    rate = 1.0
    for _ in range(4):
        rate -= 0.004
    assert clean_rate(0.004, 5) == rate


def release_k(variant: str, entries: int, delta_rel: float, epoch: int) -> int:
    """LargeLossMatters' k in its own order of operations: config.py divides delta_rel by
    100 once; train.py subtracts delta from clean_rate after each epoch; losses.py computes
    ceil(batch_size * num_classes * (1 - clean_rate)), or ceil(... * delta) for LL-Cp."""
    delta = delta_rel / 100
    clean = 1.0
    for _ in range(epoch - 1):
        clean -= delta
    if variant == "ll_cp":
        return math.ceil(entries * delta)
    return math.ceil(entries * (1 - clean))


def _spl_k(key: str, batch: int, classes: int, delta_rel: float, epoch: int) -> int:
    made = get_loss(key).make({"delta_rel": delta_rel})
    observed = torch.zeros(batch, classes)
    (_, k, _) = made.kernel_args(Batch(observed, None, epoch, 10))
    return int(k)


def test_ll_k_is_rounded_as_the_release_rounds_it():
    # 200 x 0.035 = 7.000000000000001: the release selects 8 entries, where 200 x 3.5 / 100
    # would give 7.
    assert release_k("ll_cp", 200, 3.5, 2) == 8 and math.ceil(200 * 3.5 / 100) == 7
    assert _spl_k("ll_cp", 10, 20, 3.5, 2) == 8
    differs = 0
    for batch, classes in ((10, 20), (8, 20), (16, 80), (8, 312), (7, 3), (16, 81)):
        entries = batch * classes
        for delta_rel in (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.1, 2.3, 3.5, 4.1, 5.7, 7.0):
            for key in ("ll_r", "ll_ct", "ll_cp"):
                for epoch in (2, 3, 5, 10):
                    want = release_k(key, entries, delta_rel, epoch)
                    assert _spl_k(key, batch, classes, delta_rel, epoch) == want, (
                        key, entries, delta_rel, epoch,
                    )  # fmt: skip
            differs += math.ceil(entries * delta_rel / 100) != release_k(
                "ll_cp", entries, delta_rel, 2
            )
    assert differs > 0  # the sweep holds cases where the other order rounds otherwise


def test_ll_cp_selects_the_release_count_in_value():
    """value() selects the release's k entries: at B L = 200 and delta_rel 3.5 %, eight of
    the unobserved entries (distinct losses) take the corrected target."""
    torch.manual_seed(3)
    logits = torch.randn(10, 20, dtype=torch.float64)
    observed = torch.zeros(10, 20)
    observed[torch.arange(10), torch.arange(10)] = 1
    made = get_loss("ll_cp").make({"delta_rel": 3.5})
    *_, selected, _ = made.selection(logits, Batch(observed, None, 2, 10))
    assert int(selected.sum()) == 8


def test_apl_labels_the_lowest_scores_and_accumulates():
    """apl_label against a replay: n_i = int(0.9 U_i / (E - W)); targets keep their first
    score; observed entries are never labelled; a score of exactly 0 stays unlabelled."""
    rng = np.random.RandomState(3)
    N, L = 40, 3
    observed = np.zeros((N, L), dtype=int)
    observed[np.arange(N), rng.randint(0, L, N)] = 1
    counts = torch.tensor((observed == 0).sum(0))
    targets = torch.full((1, N, L), math.nan, dtype=torch.float64)
    unobserved = torch.tensor(observed == 0)
    expected = np.full((N, L), np.nan)
    for round_ in range(3):
        scores = torch.tensor(rng.rand(1, N, L))
        scores[0, 0, 0] = 0.0 if round_ == 0 else scores[0, 0, 0]
        apl_label(targets, scores, unobserved, counts, 0.9, 5)
        for cls in range(L):
            n = int(0.9 * int(counts[cls]) / 5)
            free = [r for r in range(N) if observed[r, cls] == 0
                    and (np.isnan(expected[r, cls]) or expected[r, cls] == 0)]  # fmt: skip
            free.sort(key=lambda r, c=cls, s=scores: float(s[0, r, c]))
            for r in free[:n]:
                expected[r, cls] = float(scores[0, r, cls])
        np.testing.assert_array_equal(targets[0].numpy(), expected)
    assert not np.isnan(expected[observed == 0]).all()
    assert np.isnan(expected[observed == 1]).all()


def test_bad_options_and_observed_negatives_are_refused():
    with pytest.raises(SplError, match="ll_r.delta_rel = 150 is outside its range \\(0, 100\\)"):
        get_loss("ll_r").make({"delta_rel": 150})
    apl = get_loss("em_apl").make({"warmup": 8})
    with pytest.raises(SplError, match="warmup 8 is at or past the number of epochs"):
        apl.check_epochs(8)
    with pytest.raises(ValueError, match="assumes single positives"):
        loss("em", torch.zeros(2, 3), torch.tensor([[1, -1, 0], [0, 1, 0]]))
    assert get_loss("em").single_positive_only and not get_loss("gr").single_positive_only


@pytest.mark.parametrize("key", ["em_apl", "em_pl"])
def test_a_warmup_refusal_suggests_a_fix_that_works(key):
    """Each refusal's advice, followed, is accepted: a warm-up W in the range it names, or
    (APL at one epoch, where no W >= 1 fits) the number of epochs it names."""
    import re

    for epochs in range(1, 6):
        made = get_loss(key).make({"warmup": epochs}, Context(5))
        with pytest.raises(SplError) as refused:
            made.check_epochs(epochs)
        message = str(refused.value)
        named = re.search(rf"{key}\.warmup=W with (\d+) <= W <= (\d+)", message)
        if named:
            low, high = int(named.group(1)), int(named.group(2))
            assert low <= high
            for warmup in range(low, high + 1):
                get_loss(key).make({"warmup": warmup}, Context(5)).check_epochs(epochs)
        else:
            assert key == "em_apl" and epochs == 1, message
            more = int(re.search(r"--epochs (\d+) or more", message).group(1))
            assert "or the loss em" in message and "W < 1" not in message
            get_loss(key).make({"warmup": 1}, Context(5)).check_epochs(more)


def test_per_dataset_defaults_follow_the_prepared_dataset():
    for dataset, alpha in (("voc12", 0.2), ("coco14", 0.1), ("cub", 0.01), ("pets", 0.2)):
        assert get_loss("em").make(context=Context(5, dataset=dataset)).options.alpha == alpha
    apl = get_loss("em_apl").make(context=Context(5, dataset="nuswide")).options
    assert (apl.alpha, apl.beta, apl.warmup) == (0.1, 0.2, 4)
    for key, deltas in (("ll_r", (0.2, 0.4)), ("ll_ct", (0.2, 0.2)), ("ll_cp", (0.1, 0.2))):
        got = [get_loss(key).make(context=Context(5, dataset=d)).options.delta_rel
               for d in ("voc12", "coco14")]  # fmt: skip
        assert tuple(got) == deltas
    # an option given by the user wins over the dataset's
    assert get_loss("em").make({"alpha": 0.5}, Context(5, dataset="coco14")).options.alpha == 0.5
    assert set(SINCE_2021) <= set(LOSSES)


def test_em_closed_form_stays_finite_at_a_saturated_logit():
    """EM labels nothing, so its closed form must not read the logits as targets: an
    infinite logit times a zero weight was NaN where the loss itself is finite."""
    made = get_loss("em").make()
    logits = torch.tensor([[[30.0, float("inf"), -2.0], [0.5, -float("inf"), 1.0]]])
    observed = torch.tensor([[1, 0, 0], [0, 0, 1]], dtype=torch.int8)
    loss, grad = made.kernel(logits, *made.kernel_args(Batch(observed, None, 1, 10)))
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    matrix, _ = made.value(logits, Batch(observed, None, 1, 10))
    torch.testing.assert_close(loss, matrix.sum((-2, -1)) / 6)
