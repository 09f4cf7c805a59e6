"""VLPL (em_pl) and AEVLP (gpr): each loss against a plain per-entry implementation written
here from docs/methods.md sections 8-9 (value and logit gradient in float64), the pseudo-label
rules against plain replays over the rows, and `--scores` end to end: planted scores
recover the true labels, and bad input is refused before a run exists."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from spl.data.common import SplError
from spl.fit.engine import StackedHeads, gradient_route
from spl.fit.losses import GROUPS, LOSSES, SINCE_2021, Batch, Context, Scores, get_loss, loss
from spl.fit.pseudo_labels import damp_pseudo_labels, pseudo_label_quality, vlpl_pseudo_labels
from spl.runs import read_csv

from conftest import invoke


def sig(x):
    return 1 / (1 + math.exp(-x))


def nlog(x, eps):
    return -math.log(x + eps)


# --------------------------------------------------------------------------- per entry


def em_pl_entry(p, z, positive, negative, alpha, beta_pos, used):
    if z == 1:
        return nlog(p, 1e-5)
    if z == -1:
        return 0.0
    if used and positive:
        return beta_pos * (0.9 * nlog(p, 1e-5) + 0.1 * nlog(1 - p, 1e-5))
    if used and negative:
        return 0.0  # commented out in the release
    return -alpha * (p * nlog(p, 1e-5) + (1 - p) * nlog(1 - p, 1e-5))


def gpr_entry(p, p_hat, z, positive, negative, epoch, epochs, o):
    """One entry of GPR; ``p_hat`` is the detached p that k and v see."""
    w0, wT, b0, bT = o["k_schedule"]
    mu0, s0, muT, sT = o["v_schedule"]
    w = w0 + (wT - w0) * max(epoch - 1, 0) / epochs
    b = b0 + (bT - b0) * max(epoch - 1, 0) / epochs
    mu = mu0 + (muT - mu0) * epoch / epochs
    sigma = s0 + (sT - s0) * epoch / epochs
    k = sig(w * p_hat + b)
    v = math.exp(-((p_hat - mu) ** 2) / (2 * sigma**2))
    if z == 1:
        return nlog(p, 1e-7)
    label = z if z != 0 else (1 if positive else (-1 if negative else 0))
    if label == -1:
        return v * nlog(1 - p, 1e-7)
    if label == 1:
        lam1, lam2 = o["lam"]
        bounded = min(max(v, 1 - lam1), 1 - lam2)
        return (1 - bounded) * (o["rho"] * nlog(p, 1e-7) + (1 - o["rho"]) * nlog(1 - p, 1e-7))
    q2, q3 = o["q"]
    return v * (k * (1 - p**q2) / q2 + (1 - k) * (1 - (1 - p) ** q3) / q3)


def reference(key, logits, z, positives, negatives, epoch, epochs, options, frozen=None):
    """The batch loss, written out per entry: the mean over B x L (plus GPR's regulariser)."""
    B, L = len(logits), len(logits[0])
    frozen = frozen or logits
    total = 0.0
    for n in range(B):
        for i in range(L):
            p, pp, pn = sig(logits[n][i]), positives[n][i], negatives[n][i]
            if key == "em_pl":
                used = epoch > options["warmup"]
                total += em_pl_entry(p, z[n][i], pp, pn, options["alpha"], options["beta_pos"],
                                     used)  # fmt: skip
            else:
                total += gpr_entry(p, sig(frozen[n][i]), z[n][i], pp, pn, epoch, epochs, options)
    total /= B * L
    if key == "gpr":
        count = sum(sig(logits[n][i]) for n in range(B) for i in range(L)) / B
        total += options["reg"] * (count - options["expected_positives"]) ** 2 / L**2
    return total


VOC_EM_PL = {"alpha": 0.2, "beta_pos": 0.7, "warmup": 0}
CUB_EM_PL = {"alpha": 0.01, "beta_pos": 0.5, "warmup": 2}
VOC_GPR = {"k_schedule": (0, 2, -2, -2), "v_schedule": (0.5, 2, 0.8, 0.5), "q": (0.01, 1.0),
           "lam": (0.7, 0.4), "rho": 0.9, "reg": 0.05, "expected_positives": 1.5}  # fmt: skip
CUB_GPR = {"k_schedule": (0, 10, -2, -8), "v_schedule": (0.5, 2, 0.8, 0.5), "q": (0.01, 1.5),
           "lam": (0.8, 0.2), "rho": 0.9, "reg": 0.01, "expected_positives": 3.1}  # fmt: skip
CASES = [("em_pl", VOC_EM_PL, False), ("em_pl", CUB_EM_PL, True), ("gpr", VOC_GPR, False),
         ("gpr", CUB_GPR, True)]  # fmt: skip


def batch(seed, B=6, L=7):
    rng = np.random.RandomState(seed)
    z = np.zeros((B, L), dtype=int)
    z[np.arange(B), rng.randint(0, L, B)] = 1
    z[0, np.nonzero(z[0] == 0)[0][0]] = -1  # an observed negative: 0 (em_pl), v l-(p) (gpr)
    logits = rng.randn(B, L) * 2.5
    positives = (rng.rand(B, L) < 0.3).astype(np.uint8)
    negatives = (rng.rand(B, L) < 0.3).astype(np.uint8)  # some entries in both: positive
    return logits, z, positives, negatives


def numeric_gradient(function, logits, step=1e-6):
    grad = np.zeros_like(logits)
    for index in np.ndindex(*logits.shape):
        up, down = logits.copy(), logits.copy()
        up[index] += step
        down[index] -= step
        grad[index] = (function(up) - function(down)) / (2 * step)
    return grad


@pytest.mark.parametrize("key,options,explicit", CASES, ids=["em_pl-voc", "em_pl-other",
                                                           "gpr-voc", "gpr-cub"])  # fmt: skip
@pytest.mark.parametrize("epoch", [1, 2, 3, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_per_entry_reference(key, options, explicit, epoch, seed):
    """Value, autograd gradient and the closed form (the engine's kernel) against the
    per-entry formula and its central differences (detached weights held at the batch)."""
    logits, z, positives, negatives = batch(seed)
    given = options if explicit else {}  # the VOC rows use the loss's own defaults
    masks = {"pseudo_positives": torch.tensor(positives),
             "pseudo_negatives": torch.tensor(negatives)}  # fmt: skip
    tensor = torch.tensor(logits, requires_grad=True)
    value = loss(key, tensor, torch.tensor(z), epoch=epoch, num_epochs=8, **masks, **given)
    args = (z.tolist(), positives.tolist(), negatives.tolist(), epoch, 8, options)
    expected = reference(key, logits.tolist(), *args)
    assert value.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    value.backward()
    instance = get_loss(key).make(given, Context(7))
    batch_ = Batch(torch.tensor(z).double(), epoch=epoch, num_epochs=8, state=masks)
    closed_value, closed = instance.logit_gradient(torch.tensor(logits), batch_)
    assert closed_value.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)

    def as_function(values):
        return reference(key, values.tolist(), *args, frozen=logits.tolist())

    numeric = numeric_gradient(as_function, logits)
    np.testing.assert_allclose(tensor.grad.numpy(), numeric, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(closed.numpy(), numeric, atol=1e-6, rtol=1e-6)


def test_pseudo_negatives_are_optional_and_stacked_heads_broadcast():
    logits, z, positives, _ = batch(3)
    stacked = torch.tensor(np.stack([logits, -logits]))  # [2, B, L]: two heads
    for key in ("em_pl", "gpr"):
        one = loss(key, torch.tensor(logits), torch.tensor(z), num_epochs=8,
                   pseudo_positives=torch.tensor(positives))  # fmt: skip
        zeros = np.zeros_like(positives)
        expected = reference(key, logits.tolist(), z.tolist(), positives.tolist(),
                             zeros.tolist(), 1, 8, VOC_EM_PL if key == "em_pl" else VOC_GPR)  # fmt: skip
        assert one.item() == pytest.approx(expected, rel=1e-9)
        both = loss(key, stacked, torch.tensor(z), num_epochs=8,
                    pseudo_positives=torch.tensor(positives))  # fmt: skip
        assert both.shape == (2,) and both[0].item() == pytest.approx(one.item(), rel=1e-12)
        with pytest.raises(ValueError, match=f"{key} needs the batch's 'pseudo_positives'"):
            loss(key, torch.tensor(logits), torch.tensor(z), num_epochs=8)


def test_per_dataset_defaults():
    def options(key, dataset):
        return get_loss(key).make(context=Context(5, 2.2, dataset)).options

    assert [options("em_pl", d).alpha for d in ("voc12", "coco14", "nuswide", "cub", "pets")] == [
        0.2, 0.1, 0.1, 0.01, 0.2,
    ]  # fmt: skip
    voc = options("em_pl", "voc12")
    assert (voc.beta_pos, voc.temperature, voc.theta, voc.warmup) == (0.7, 0.01, 0.3, 0)
    table = {  # docs/methods.md section 9
        "voc12": ((0, 2, -2, -2), (0.01, 1), (0.7, 0.4), 0.05, 1.5, 0.01, 0.0, 0.5, 4, 3, 0.2),
        "coco14": ((0, 10, -2, -8), (0.01, 1), (0.7, 0.5), 0.001, 2.9, 0.01, 0.3, 0.5, 4, 3, 0.3),
        "nuswide": ((0, 10, -2, -8), (0.01, 1), (0.7, 0.5), 0.001, 1.9, 0.01, 0.3, 0.6, 4, 3, 0.2),
        "cub": ((0, 10, -2, -8), (0.01, 1.5), (0.8, 0.2), 0.01, 31.4, 0.1, 0.005, 0.005, 5, 32,
                0.2),
    }  # fmt: skip
    for dataset, expected in table.items():
        o = options("gpr", dataset)
        got = (o.k_schedule, o.q, o.lam, o.reg, o.expected_positives, o.temperature, o.eta,
               o.threshold, o.grid, o.top_k, o.negative_ratio)  # fmt: skip
        assert got == expected, dataset
        assert (o.v_schedule, o.rho) == ((0.5, 2, 0.8, 0.5), 0.9)
    other = get_loss("gpr").make(context=Context(5, 2.2, "pets"))
    assert other.options.threshold == 0.5 and other.expected_positives() == 2.2  # its own k
    assert get_loss("gpr").make(context=Context(5)).expected_positives() == 1.5  # functional
    check_score_readers_are_the_vlm_group()
    assert {"em_pl", "gpr"} <= set(GROUPS["vlm"]) and len(SINCE_2021) == 9


def check_score_readers_are_the_vlm_group() -> None:
    """``vlm`` (what --losses vlm trains, what needs --scores) is every registered loss
    that reads scores, in registry order, whichever they are; none is a since-2021 loss."""
    import spl.fit.losses as registry

    readers = [cls.key for cls in registry.REGISTRY if cls.reads_scores]
    assert registry.GROUPS["vlm"] == readers
    assert [key for key, cls in registry.LOSSES.items() if cls.reads_scores] == readers
    assert set(readers) <= set(registry.GROUPS["all"]) and not set(readers) & set(SINCE_2021)


def test_a_registered_loss_joins_the_groups_its_attributes_imply(monkeypatch):
    """register(): a toy loss that reads scores joins REGISTRY, LOSSES, ``all`` and ``vlm``
    (not ``paper``), one marked ``in_paper`` joins ``paper``; a taken key is refused with
    nothing changed; monkeypatch undoes it all."""
    from test_loss_interface import scratch_registry

    import spl.fit.losses as registry
    from spl.fit.losses.base import Loss

    # the groups the other modules import by name are the registry's own lists
    assert registry.GROUPS["vlm"] is registry.VISION_LANGUAGE
    assert registry.GROUPS["paper"] is registry.PAPER_LOSSES
    before = {name: list(keys) for name, keys in registry.GROUPS.items()}
    scratch_registry(monkeypatch)

    class ScoredAN(Loss):
        """AN, with the scores it is handed (a toy: it reads none of them)."""

        key, title, reads_scores = "an_scored", "AN (scores)", True

    assert registry.register(ScoredAN) is ScoredAN
    assert registry.REGISTRY[-1] is ScoredAN and registry.LOSSES["an_scored"] is ScoredAN
    assert registry.GROUPS["vlm"] == [*before["vlm"], "an_scored"]
    assert registry.GROUPS["all"] == [*before["all"], "an_scored"]
    assert registry.GROUPS["paper"] == before["paper"]
    assert registry.parse_losses("vlm")[-1] == "an_scored"
    check_score_readers_are_the_vlm_group()
    with pytest.raises(SplError, match="loss key 'an_scored' is taken \\(ScoredAN\\)"):
        registry.register(type("Again", (Loss,), {"key": "an_scored", "reads_scores": True}))
    assert registry.REGISTRY.count(ScoredAN) == 1 and registry.GROUPS["vlm"].count("an_scored") == 1
    registry.register(type("PaperRow", (Loss,), {"key": "paper_row", "in_paper": True}))
    assert registry.GROUPS["paper"] == [*before["paper"], "paper_row"]
    assert "paper_row" not in registry.GROUPS["vlm"]
    monkeypatch.undo()
    assert {name: list(keys) for name, keys in registry.GROUPS.items()} == before
    assert "an_scored" not in registry.LOSSES and ScoredAN not in registry.REGISTRY


def test_bad_options_are_refused():
    with pytest.raises(SplError, match="warmup 10 is at or past the number of epochs"):
        get_loss("em_pl").make({"warmup": 10}).check_epochs(10)
    with pytest.raises(SplError, match=r"em_pl.temperature = 0 is outside its range \(0, inf\)"):
        get_loss("em_pl").make({"temperature": 0.0})
    with pytest.raises(SplError, match=r"gpr.top_k = 0 is outside its range \[1, inf\)"):
        get_loss("gpr").make({"top_k": 0})
    with pytest.raises(SplError, match=r"gpr.lam = \(0.4, 0.7\).*empty unless lambda2 <= lambda1"):
        get_loss("gpr").make({"lam": (0.4, 0.7)})
    get_loss("gpr").make({"lam": (0.5, 0.5)})  # a single value: vb = 0.5


# --------------------------------------------------------------------------- the rules


def softmax(values, temperature):
    top = max(values)
    exps = [math.exp((v - top) / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def vlpl_replay(image, temperature, theta):
    out = np.zeros(image.shape, dtype=bool)
    for n, row in enumerate(image.tolist()):
        for c, s in enumerate(softmax(row, temperature)):
            out[n, c] = s > theta
    return out


def damp_replay(image, tiles, observed, temperature, eta, threshold, top_k, ratio):
    N, L = image.shape
    out = np.zeros((N, L), dtype=bool)
    for n in range(N):
        s = softmax(image[n].tolist(), temperature)
        tile_s = [softmax(tile.tolist(), temperature) for tile in tiles[n]]
        a = [max(t[c] for t in tile_s) for c in range(L)]
        b = [min(t[c] for t in tile_s) for c in range(L)]
        m = [sum(t[c] for t in tile_s) / len(tile_s) for c in range(L)]
        single = max(s[c] * observed[n, c] for c in range(L))
        eta_n = min(single, float(np.float32(eta)))  # the release's eta is float32
        final = [(s[c] + (a[c] if a[c] > eta_n else b[c])) / 2 for c in range(L)]
        ranked = sorted(range(L), key=lambda c, f=final: -f[c])[: min(top_k, L)]
        for c in ranked:
            out[n, c] = final[c] >= threshold
        lowest = sorted(range(L), key=lambda c, s=s, m=m: (s[c] + m[c]) / 2)[: int(ratio * L)]
        for c in lowest:
            out[n, c] = False
    return out


def _scores(seed, N=40, L=8, G=4):
    rng = np.random.RandomState(seed)
    labels = (rng.rand(N, L) < 0.3).astype(np.uint8)
    observed = np.zeros((N, L))
    observed[np.arange(N), rng.randint(0, L, N)] = 1
    image = 0.2 + 0.04 * labels + 0.02 * rng.randn(N, L)
    tiles = image[:, None] + 0.03 * rng.randn(N, G, L)
    return image, tiles, observed


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vlpl_rule_equals_the_replay(seed):
    image, _, _ = _scores(seed)
    for temperature, theta in ((0.01, 0.3), (0.02, 0.15)):
        got = vlpl_pseudo_labels(torch.tensor(image), temperature=temperature, theta=theta)
        expected = vlpl_replay(image, temperature, theta)
        np.testing.assert_array_equal(got.numpy(), expected)
    assert expected.any() and not expected.all()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "settings",
    [(0.01, 0.0, 0.2, 3, 0.2), (0.01, 0.3, 0.3, 3, 0.3), (0.02, 0.1, 0.1, 5, 0.25),
     (0.05, 0.005, 0.005, 32, 0.2)],
    ids=["voc", "coco", "other", "cub-like"],
)  # fmt: skip
def test_damp_rule_equals_the_replay(seed, settings):
    temperature, eta, threshold, top_k, ratio = settings
    image, tiles, observed = _scores(seed)
    got = damp_pseudo_labels(
        torch.tensor(image), torch.tensor(tiles), torch.tensor(observed), temperature=temperature,
        eta=eta, threshold=threshold, top_k=top_k, negative_ratio=ratio,
    )  # fmt: skip
    expected = damp_replay(image, tiles, observed, *settings)
    np.testing.assert_array_equal(got.numpy(), expected)
    assert expected.any()


def test_damp_negatives_only_erase_positives():
    """Class 0 is scored low on the whole image but high on one tile: DAMP's local score
    makes it a positive, and it is also the lowest of (s + mean)/2, which the release's
    "negatives" then erase (writing 0, never -1)."""
    image = torch.tensor([[0.0, 0.5, 0.5, 0.5, 0.5]])
    tiles = torch.full((1, 16, 5), 0.5)
    tiles[0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    observed = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]])
    kwargs = dict(temperature=0.1, eta=0.0, threshold=0.4, top_k=1)
    kept = damp_pseudo_labels(image, tiles, observed, negative_ratio=0.0, **kwargs)
    erased = damp_pseudo_labels(image, tiles, observed, negative_ratio=0.2, **kwargs)
    assert kept[0].tolist() == [True, False, False, False, False]
    assert not erased.any()


def test_rows_without_scores_get_no_pseudo_labels():
    image, tiles, observed = _scores(4)
    image[3] = np.nan
    tiles[5, 2] = np.nan
    got = vlpl_pseudo_labels(torch.tensor(image), temperature=0.01, theta=0.2)
    assert not got[3].any()
    got = damp_pseudo_labels(torch.tensor(image), torch.tensor(tiles), torch.tensor(observed),
                             temperature=0.01, eta=0.0, threshold=0.1, top_k=3,
                             negative_ratio=0.0)  # fmt: skip
    assert not got[3].any() and not got[5].any() and got.any()


def test_quality_counts_against_a_replay():
    rng = np.random.RandomState(0)
    labels = (rng.rand(30, 4) < 0.4).astype(np.uint8)
    observed = np.zeros((30, 4))
    observed[np.arange(30), rng.randint(0, 4, 30)] = 1
    positives = rng.rand(30, 4) < 0.4
    rows = pseudo_label_quality(positives, observed, labels, ["a", "b", "c", "d"], "em_pl")
    assert [r["class"] for r in rows] == ["a", "b", "c", "d", "(all)"]
    for c, row in enumerate(rows[:4]):
        hits = sum(positives[n, c] and labels[n, c] for n in range(30))
        hidden = [n for n in range(30) if labels[n, c] and observed[n, c] == 0]
        mine = [n for n in range(30) if positives[n, c] and observed[n, c] == 0]
        assert row["pseudo_positives"] == positives[:, c].sum()
        assert row["precision"] == pytest.approx(hits / positives[:, c].sum())
        assert row["recall"] == pytest.approx(hits / labels[:, c].sum())
        assert row["unobserved_pseudo_positives"] == len(mine)
        assert row["unobserved_recall"] == pytest.approx(
            sum(positives[n, c] for n in hidden) / len(hidden)
        )
        assert row["unobserved_precision"] == pytest.approx(
            sum(labels[n, c] for n in mine) / len(mine)
        )
    assert rows[4]["pseudo_positives"] == positives.sum()
    json.dumps(rows)  # plain values


# --------------------------------------------------------------------------- the engine


def test_the_engine_refuses_a_missing_or_misaligned_scores():
    # both train in the engine's compiled step, on their closed forms (the parity with a
    # plain torch.optim.Adam loop is tests/test_engine.py's)
    assert gradient_route(LOSSES["em_pl"]) == gradient_route(LOSSES["gpr"]) == "kernel"
    rng = np.random.RandomState(0)
    X, labels = rng.randn(40, 6), (rng.rand(40, 4) < 0.3).astype(np.uint8)
    observed = np.zeros((40, 4))
    observed[np.arange(40), rng.randint(0, 4, 40)] = 1
    model = StackedHeads(losses=["em_pl"], lrs=[1e-3], batch_sizes=[8], epochs=1, device="cpu")
    with pytest.raises(SplError, match="em_pl trains on pseudo-labels .* pass scores="):
        model.fit(X, observed, labels=labels, X_val=X, Y_val=labels)
    with pytest.raises(ValueError, match=r"scores \(39, 4\) do not match"):
        model.fit(X, observed, labels=labels, X_val=X, Y_val=labels, scores=labels[:39])
    model.fit(X, observed, labels=labels, X_val=X, Y_val=labels, scores=labels.astype(float))
    state = model.groups_[0].slots["em_pl"].state
    # cos = labels: softmax 1 / (positives) passes 0.3 for up to three positives
    expected = labels * (labels.sum(1) <= 3)[:, None]
    assert expected.sum() < labels.sum()
    np.testing.assert_array_equal(state["pseudo_positives"].numpy(), expected)
    assert state["pseudo_negatives"].sum() == 0
    gpr = StackedHeads(losses=["gpr"], lrs=[1e-3], batch_sizes=[8], epochs=1, device="cpu")
    with pytest.raises(SplError, match="DAMP pseudo-labels need tile scores"):
        gpr.fit(X, observed, labels=labels, X_val=X, Y_val=labels, scores=labels.astype(float))
    with pytest.raises(SplError, match="needs tile scores|has 1 x 1"):
        get_loss("gpr").make().check_scores(Scores(torch.zeros(2, 4), torch.zeros(2, 1, 4)), "f")


# --------------------------------------------------------------------------- end to end


def _arrays(tmp_path, name, seed, n_train=300, n_test=120, dim=24, classes=12):
    """Features and labels with at most three positives an image (so that planted cosines
    pass VLPL's softmax > 0.3), and planted scores: the cosine is the label, every tile
    the whole image's."""
    rng = np.random.RandomState(seed)
    centers = rng.randn(classes, dim)
    paths = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (rng.rand(n, classes) < 0.3).astype(np.uint8)
        labels[np.arange(n), rng.randint(0, classes, n)] = 1
        for row in np.nonzero(labels.sum(1) > 3)[0]:
            labels[row, rng.permutation(np.nonzero(labels[row])[0])[3:]] = 0
        feats = (labels @ centers + 1.5 * rng.randn(n, dim)).astype(np.float32)
        for kind, array in (("features", feats), ("labels", labels),
                            ("scores", labels.astype(np.float32)),
                            ("tiles", np.repeat(labels[:, None], 4, 1).astype(np.float32))):  # fmt: skip
            paths[f"{split}-{kind}"] = tmp_path / f"{name}-{split}-{kind}.npy"
            np.save(paths[f"{split}-{kind}"], array)
    return paths


def _import(runner, tmp_path, name, seed, *, tiles=True, tag="planted"):
    paths = _arrays(tmp_path, name, seed)
    dataset = tmp_path / "ds" / name
    args = ["import-features", dataset]
    for key in ("train-features", "train-labels", "test-features", "test-labels"):
        args += [f"--{key}", paths[key]]
    invoke(runner, args)
    args = ["import-scores", dataset, "--train", paths["train-scores"], "--test",
            paths["test-scores"], "--tag", tag]  # fmt: skip
    if tiles:
        args += ["--train-tiles", paths["train-tiles"], "--test-tiles", paths["test-tiles"]]
    invoke(runner, args)
    return dataset


@pytest.fixture
def planted(tmp_path, runner):
    return _import(runner, tmp_path, "mine", 0)


def _fit(runner, dataset, out, *extra, ok=True):
    args = ["fit-linear", dataset, "--features", "imported", "--out", out, "--quiet",
            "--lrs", "1e-2", "--batch-sizes", 8]  # fmt: skip
    return invoke(runner, [*args, *extra], ok=ok)


def test_planted_scores_give_the_true_positives_and_em_pl_recovers_more(planted, runner,
                                                                        tmp_path):  # fmt: skip
    """Scores equal to the true labels: VLPL's and DAMP's pseudo-positives are the true
    positives, and em_pl recovers the hidden training labels better than EM."""
    out = tmp_path / "runs"
    _fit(runner, planted, out, "--losses", "em,vlm", "--scores", "planted", "--epochs", 10,
         "--loss-option", "gpr.grid=2", "--loss-option", "gpr.threshold=0.3")  # fmt: skip
    (run,) = (out / "mine" / "imported").iterdir()
    quality = read_csv(run / "pseudo_labels.csv")
    for key in ("em_pl", "gpr"):
        total = next(r for r in quality if r["loss"] == key and r["class"] == "(all)")
        assert float(total["precision"]) == 1.0 and float(total["recall"]) == 1.0, key
        assert float(total["unobserved_recall"]) == 1.0
        assert int(total["unobserved_pseudo_positives"]) > 0
    assert json.loads((run / "pseudo_labels.json").read_text())[0]["loss"] == "em_pl"
    assert "## Pseudo-labels (scores `planted`)" in (run / "summary.md").read_text()
    config = json.loads((run / "config.json").read_text())
    assert config["scores"]["tag"] == "planted" and config["settings"]["scores"] == "planted"
    results = {r["loss"]: r for r in read_csv(run / "results.csv")}
    em, em_pl = (float(results[k]["train_recovery_map"]) for k in ("em", "em_pl"))
    assert em_pl > em + 5, (em, em_pl)
    assert float(results["em_pl"]["test_map"]) > float(results["em"]["test_map"])


def test_bad_scores_are_refused_before_a_run(planted, runner, tmp_path):
    out = tmp_path / "runs"
    result = _fit(runner, planted, out, "--losses", "em,em_pl,gpr", ok=False)
    text = result.output.replace("\n", " ")
    assert "em_pl, gpr train on pseudo-labels from a vision-language model's scores" in text
    assert "pass --scores TAG" in text and "(tags there: planted)" in text
    result = _fit(runner, planted, out, "--losses", "em_pl", "--scores", "nope", ok=False)
    text = result.output.replace("\n", " ")
    assert f"--scores nope: {planted / 'scores' / 'nope.h5'} not found" in text
    result = _fit(runner, planted, out, "--losses", "em", "--scores", "planted", ok=False)
    assert "no loss of this run reads scores (those that do: em_pl, gpr)" in result.output
    other = _import(runner, tmp_path, "other", 1, tiles=False, tag="flat")
    shutil.copy(other / "scores" / "flat.h5", planted / "scores" / "foreign.h5")
    result = _fit(runner, planted, out, "--losses", "em_pl", "--scores", "foreign", ok=False)
    assert "was made from another prepared dataset" in result.output.replace("\n", " ")
    result = _fit(runner, other, out, "--losses", "gpr", "--scores", "flat", ok=False)
    text = result.output.replace("\n", " ")
    assert "gpr's DAMP pseudo-labels need tile scores" in text and "flat.h5" in text
    result = _fit(runner, planted, out, "--losses", "gpr", "--scores", "planted", ok=False)
    assert "gpr expects 4 x 4 tiles" in result.output and "gpr.grid=2" in result.output
    assert not out.exists()  # every refusal came before a run directory


@pytest.mark.slow
def test_finetune_trains_em_pl_on_planted_scores(demo_small, runner, tmp_path):
    """FineTuner with a loss that reads scores: the pseudo-labels reach its batches (the
    run records them) and a short fine-tune trains."""
    from spl.data.prepared import load_prepared

    dataset = tmp_path / "demo"
    shutil.copytree(demo_small, dataset)
    for src, array in load_prepared(dataset).labels.items():
        np.save(tmp_path / f"{src}.npy", array.astype(np.float32))
    invoke(runner, ["import-scores", dataset, "--train", tmp_path / "trainval.npy", "--test",
                    tmp_path / "test.npy", "--tag", "truth"])  # fmt: skip
    out = tmp_path / "runs"
    invoke(runner, ["finetune", dataset, "--loss", "em_pl", "--scores", "truth", "--backbone",
                    "efficientnet_lite0", "--image-size", 32, "--batch-sizes", 16, "--lrs",
                    "1e-3", "--epochs", 1, "--device", "cpu", "--workers", 0, "--out", out,
                    "--quiet"])  # fmt: skip
    (run,) = [p for p in (out / "demo").glob("*/finetune-*")]
    total = next(r for r in read_csv(run / "pseudo_labels.csv") if r["class"] == "(all)")
    assert float(total["precision"]) == 1.0
    (result,) = read_csv(run / "results.csv")
    assert result["loss"] == "em_pl" and float(result["test_map"]) > 0


def test_a_resumed_run_refuses_other_pseudo_labels(planted, runner, tmp_path):
    """--resume recomputes the pseudo-labels; a scores file rebuilt since the run started
    that gives other ones is refused (the run records a digest of each loss's labels)."""
    from spl.runs import mark_incomplete

    out = tmp_path / "runs"
    _fit(runner, planted, out, "--losses", "em_pl", "--scores", "planted", "--epochs", 1)
    (run,) = (out / "mine" / "imported").iterdir()
    mark_incomplete(run, "linear")  # as if it had been interrupted
    scores = np.load(tmp_path / "mine-train-scores.npy")
    scores[:, 0] += 1.0  # class 0 now wins every image's softmax
    np.save(tmp_path / "rebuilt.npy", scores)
    invoke(runner, ["import-scores", planted, "--train", tmp_path / "rebuilt.npy", "--test",
                    tmp_path / "mine-test-scores.npy", "--tag", "planted", "--force"])  # fmt: skip
    result = invoke(runner, ["fit-linear", "--resume", run, "--quiet"], ok=False)
    assert "differ from those the run started with" in result.output.replace("\n", " ")
