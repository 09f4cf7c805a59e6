"""`spl extract`: the feature file, resume after SIGKILL, torchrun, bad input, real features."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from spl.data.common import SplError
from spl.data.images import build_transform, load_rgb
from spl.data.prepared import load_prepared
from spl.extract.backbones import LITE0, get_backbone
from spl.extract.features import load_features
from spl.extract.images import ImageFiles, collate
from spl.extract.run import FeatureStep

from conftest import REPO, invoke

LITE0_64 = "efficientnet_lite0-IMAGENET1K_TF-64"
FAST = ["--backbone", LITE0, "--device", "cpu", "--workers", "0", "--no-progress"]
CHUNKED_64 = ["--image-size", "64", "--chunk-size", "32", "--batch-size", "16"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread per process, as torchrun sets it: runs then compare bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def demo(demo_small, tmp_path):
    """A private copy of the small demo (each test writes its own feature files)."""
    target = tmp_path / "root" / "demo"
    shutil.copytree(demo_small, target, ignore=shutil.ignore_patterns("features"))
    return target


@pytest.fixture(scope="module")
def reference_64(demo_small, tmp_path_factory):
    """Lite0 features of the demo at 64 px, chunks of 32 rows in batches of 16."""
    from click.testing import CliRunner

    target = tmp_path_factory.mktemp("reference") / "demo"
    shutil.copytree(demo_small, target, ignore=shutil.ignore_patterns("features"))
    invoke(CliRunner(), ["extract", target, *FAST, *CHUNKED_64])
    with h5py.File(target / "features" / f"{LITE0_64}.h5") as h5:
        return {src: h5[src][()] for src in ("trainval", "test")}


def _features(dataset, tag=LITE0_64):
    with h5py.File(dataset / "features" / f"{tag}.h5") as h5:
        return {src: h5[src][()] for src in ("trainval", "test")}, dict(h5.attrs)


def _subprocess_env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_feature_file_rows_follow_the_prepared_dataset(demo, runner, reference_64):
    result = invoke(runner, ["extract", demo, *FAST, "--image-size", "64", "--batch-size", "7"])
    assert f"wrote {demo / 'features' / LITE0_64}.h5" in result.output
    assert re.search(r"extracted 240 images in .* images/s \(waiting for data", result.output)
    prepared = load_prepared(demo)
    features, attrs = _features(demo)
    assert features["trainval"].shape == (160, 1280) and features["test"].shape == (80, 1280)
    model, spec = get_backbone(LITE0)
    assert attrs["tag"] == LITE0_64 and attrs["backbone"] == LITE0
    assert attrs["weights"] == "IMAGENET1K_TF" and attrs["weights_sha256"] == spec.sha256
    assert attrs["image_size"] == 64 and attrs["dtype"] == "float32"
    assert attrs["dataset_fingerprint"] == prepared.fingerprint and attrs["dataset_name"] == "demo"
    assert '"mean": [0.49803' in attrs["transform"] and "torch" in attrs["versions"]
    # Independent reference: the paper's eval transform on single images, row by row.
    transform = build_transform(64, mean=spec.mean, std=spec.std)
    for source, row in (("trainval", 0), ("trainval", 159), ("test", 41)):
        image = load_rgb(prepared.image_root / prepared.images[source][row])
        with torch.inference_mode():
            expected = model(transform(image)[None])[0].numpy()
        np.testing.assert_allclose(features[source][row], expected, rtol=1e-4, atol=1e-5)
    # Batch size 7 versus 16: the same features to float rounding.
    for source in ("trainval", "test"):
        np.testing.assert_allclose(features[source], reference_64[source], rtol=1e-4, atol=1e-5)
    assert load_features(prepared, LITE0_64).dim == 1280
    # Contiguous, uncompressed datasets: memory-mapped at their offset, the same values.
    path = demo / "features" / f"{LITE0_64}.h5"
    with h5py.File(path) as h5:
        layout = {src: (h5[src].chunks, h5[src].id.get_offset()) for src in features}
    for source, (chunks, offset) in layout.items():
        assert chunks is None
        mapped = np.memmap(path, np.float32, "r", offset, features[source].shape)
        assert np.array_equal(mapped, features[source])


def test_batches_on_the_device_equal_the_paper_transform(demo, tmp_path):
    """uint8 from the workers, normalised on the device == build_transform, bit for bit;
    the device decode route (JPEG bytes, torchvision decode + antialiased resize) is close."""
    from PIL import Image

    prepared = load_prepared(demo)
    model, spec = get_backbone(LITE0, pretrained=False)
    paths = [prepared.image_root / p for p in prepared.images["test"][:6]]
    jpegs = []
    for k, path in enumerate(paths):
        jpegs.append(tmp_path / f"{k}.jpg")
        Image.open(path).convert("RGB").resize((90 + k, 70)).save(jpegs[-1], quality=95)
    jpegs.append(paths[0])  # a PNG among JPEGs: decoded in the worker
    transform = build_transform(48, mean=spec.mean, std=spec.std)
    expected = torch.stack([transform(load_rgb(p)) for p in jpegs])
    step = FeatureStep(model, spec, 48, torch.device("cpu"))
    files = ImageFiles(jpegs, 48, "pil")
    x, errors = step.images(collate([files[k] for k in range(len(jpegs))]))
    assert torch.equal(x, expected) and errors == [""] * len(jpegs)
    device_files = ImageFiles(jpegs, 48, "device")
    step.files = device_files
    batch = collate([device_files[k] for k in range(len(jpegs))])
    assert isinstance(batch.images, list) and batch.images[0].dim() == 1  # bytes travel
    x, errors = step.images(batch)
    assert (x - expected).abs().max() * min(spec.std) < 2.5 / 255  # within ~2 grey levels
    (tmp_path / "3.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    x, errors = step.images(collate([device_files[k] for k in range(len(jpegs))]))
    assert "cannot decode image" in errors[3] and "3.jpg" in errors[3]
    assert errors[:3] == [""] * 3


def test_rerun_does_nothing_unless_forced(demo, runner):
    args = ["extract", demo, *FAST, "--image-size", "32"]
    invoke(runner, args)
    path = demo / "features" / f"{LITE0}-IMAGENET1K_TF-32.h5"
    stamp = path.stat().st_mtime_ns
    result = invoke(runner, args)
    assert "complete; nothing to do" in result.output and path.stat().st_mtime_ns == stamp
    result = invoke(runner, [*args, "--force"])
    assert "wrote" in result.output and path.stat().st_mtime_ns != stamp
    assert not list((demo / "features").glob(".*"))  # no partial folder, no temporaries left


def test_sigkill_midway_then_resume_gives_the_same_file(demo, reference_64, runner):
    args = [*FAST, *CHUNKED_64]
    partial = demo / "features" / f".{LITE0_64}.partial"
    process = subprocess.Popen(
        [sys.executable, "-m", "spl", "extract", demo, *args, "--chunk-pause", "1"],
        cwd=demo.parent, env=_subprocess_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list(partial.glob("*.npz"))) < 2:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no chunk appeared"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list(partial.glob("*.npz")))
    assert 2 <= done < 8  # 240 rows: 5 + 3 chunks of 32
    assert not (demo / "features" / f"{LITE0_64}.h5").exists()  # never a half-written file
    result = invoke(runner, ["extract", demo, *args])
    assert f"resuming {LITE0_64}.h5: {done} of 8 chunks done" in result.output
    assert re.search(rf"extracted {240 - 32 * done} images", result.output)
    features, _ = _features(demo)
    for source in ("trainval", "test"):
        assert np.array_equal(features[source], reference_64[source])
    assert not partial.exists()


def test_resume_refuses_other_settings(demo, runner):
    args = ["extract", demo, *FAST, "--image-size", "32", "--chunk-size", "32"]
    (demo / "images" / "test" / "00005.png").unlink()  # stops the run after 5 chunks
    invoke(runner, args, ok=False)
    result = invoke(runner, [*args, "--dtype", "float16"], ok=False)
    assert (
        "holds an unfinished extraction with other settings ({'dtype': 'float32'})" in result.output
    )
    result = invoke(runner, [*args[:-2], "--chunk-size", "16"], ok=False)
    assert "other settings ({'chunk_size': 32})" in result.output


def test_missing_and_corrupt_images_stop_or_are_recorded(demo, runner, reference_64):
    prepared = load_prepared(demo)
    position = int(np.searchsorted(prepared.split["val"], 64))  # a val image past 2 chunks
    train_row = int(prepared.split["val"][position])
    missing = prepared.image_root / prepared.images["trainval"][train_row]
    missing.unlink()
    corrupt = prepared.image_root / prepared.images["test"][70]
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = ["extract", demo, *FAST, *CHUNKED_64]
    result = invoke(runner, args, ok=False)
    assert (
        f"val split row {position} (trainval row {train_row}): image not found: {missing}"
        in result.output
    )
    assert "--skip-bad" in result.output
    result = invoke(runner, [*args, "--skip-bad"])
    assert f"resuming {LITE0_64}.h5: {train_row // 32} of 8 chunks done" in result.output
    assert "2 unreadable images recorded as bad rows" in result.output
    assert f"test split row 70: cannot decode image {corrupt}" in result.output
    with h5py.File(demo / "features" / f"{LITE0_64}.h5") as h5:
        assert h5["bad/trainval"][()].tolist() == [train_row]
        assert h5["bad/test"][()].tolist() == [70]
        features = {src: h5[src][()] for src in ("trainval", "test")}
    for source, row in (("trainval", train_row), ("test", 70)):
        assert np.isnan(features[source][row]).all()
        keep = np.arange(len(features[source])) != row
        assert np.array_equal(features[source][keep], reference_64[source][keep])
    loaded = load_features(prepared, LITE0_64)  # NaN rows are expected where recorded bad
    assert loaded.bad_rows["trainval"].tolist() == [train_row]


def test_non_finite_features_are_reported_with_rows(demo, runner, tmp_path):
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    state["layer4.1.bn2.weight"] *= 1e6  # features far beyond float16's range
    path = tmp_path / "big.pth"
    torch.save(state, path)
    args = ["extract", demo, "--backbone", "resnet18", "--weights", path, "--image-size", "32",
            "--device", "cpu", "--workers", "0", "--no-progress"]  # fmt: skip
    result = invoke(runner, [*args, "--dtype", "float16"], ok=False)
    assert re.search(
        r"NaN or infinite features for 160 images \(val split row 0 \(trainval row 0\), train",
        result.output,
    )
    assert "overflow float16; use --dtype float32" in result.output
    state["layer4.1.bn2.running_var"][:] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    args[args.index(path)] = tmp_path / "nan.pth"
    result = invoke(runner, args, ok=False)
    assert (
        "NaN or infinite features" in result.output
        and "weights or these images are broken" in result.output
    )


def test_float16_and_local_weights_land_in_the_tag(demo, runner, tmp_path):
    from spl.data.common import sha256_file

    torch.manual_seed(0)
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    digest = sha256_file(path)
    common = ["--backbone", "resnet18", "--weights", path, "--image-size", "32", "--device", "cpu",
              "--workers", "0", "--no-progress"]  # fmt: skip
    invoke(runner, ["extract", demo, *common])
    tag = f"resnet18-file-{digest[:12]}-32"
    full, attrs = _features(demo, tag)
    assert attrs["weights_sha256"] == digest and attrs["weights_source"] == str(path)
    invoke(runner, ["extract", demo, *common, "--dtype", "float16", "--force"])
    half, attrs = _features(demo, tag)
    assert half["test"].dtype == np.float16 and attrs["dtype"] == "float16"
    np.testing.assert_allclose(half["test"], full["test"], rtol=2e-3, atol=1e-3)
    result = invoke(runner, ["extract", demo, *common, "--sha256", "abcdef12", "--force"], ok=False)
    assert "differs from the checksum you gave" in result.output


def test_unknown_backbone_and_listing(demo, runner):
    result = invoke(runner, ["extract", demo, "--backbone", "resnet5"], ok=False)
    assert "unknown backbone 'resnet5'; available: resnet50," in result.output
    assert "efficientnet_lite0" in result.output
    result = invoke(runner, ["extract", "--list-backbones"])
    assert re.search(r"resnet50\s+IMAGENET1K_V1\s+IMAGENET1K_V2, random", result.output)
    assert re.search(r"efficientnet_lite0\s+IMAGENET1K_TF", result.output)


def test_torchrun_two_processes_write_the_single_process_file(demo, reference_64):
    args = [*FAST, *CHUNKED_64]
    job = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "spl", "extract", demo, *args],
        cwd=demo.parent, env=_subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = job.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # torchrun and both of its workers
        raise
    assert job.returncode == 0, stderr[-3000:]
    share = int(re.search(r"extracted (\d+) images .* on rank 0", stdout).group(1))
    assert share == 128  # 8 chunks round-robin: rank 0 takes 4 of 32 rows
    assert stdout.count("wrote ") == 1
    features, _ = _features(demo)
    for source in ("trainval", "test"):
        assert np.array_equal(features[source], reference_64[source])


def test_linear_probe_on_pretrained_features_beats_random_weights(demo, runner):
    """On the demo digits a linear probe on ImageNet features is far better than on the
    same architecture with random weights: the weights carry knowledge. Raw features are
    what fit-linear trains on; standardised ones take the random net's tiny scale away."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    prepared = load_prepared(demo)
    labels = prepared.labels["test"]
    scores = {}
    for weights in ("IMAGENET1K_TF", "random"):
        invoke(runner, ["extract", demo, *FAST, "--image-size", "64", "--weights", weights])
        features, _ = _features(demo, f"{LITE0}-{weights}-64")
        scaler = StandardScaler().fit(features["trainval"])
        for probe in ("raw", "standardised"):
            train, test = features["trainval"], features["test"]
            if probe == "standardised":
                train, test = scaler.transform(train), scaler.transform(test)
            model = OneVsRestClassifier(LogisticRegression(C=0.01, max_iter=5000))
            scores_test = model.fit(train, prepared.labels["trainval"]).decision_function(test)
            scores[weights, probe] = 100 * np.mean(
                [average_precision_score(labels[:, c], scores_test[:, c]) for c in range(10)]
            )
    assert scores["IMAGENET1K_TF", "raw"] > scores["random", "raw"] + 25, scores
    assert scores["IMAGENET1K_TF", "standardised"] > scores["random", "standardised"] + 5, scores


def test_get_backbone_error_reaches_the_cli_cleanly(demo, runner, tmp_path):
    result = invoke(runner, ["extract", demo, "--weights", tmp_path / "none.pth"], ok=False)
    assert "weights file" in result.output and "not found" in result.output
    assert "Traceback" not in result.output
    with pytest.raises(SplError, match="random initialisation takes no weights file"):
        get_backbone("resnet18", weights="random", weights_path=__file__)


def test_a_damaged_chunk_is_dropped_and_redone(demo, runner, reference_64):
    args = ["extract", demo, *FAST, *CHUNKED_64]
    image = demo / "images" / "test" / "00040.png"
    kept = image.read_bytes()
    image.unlink()  # stops the run in the test file's second chunk
    invoke(runner, args, ok=False)
    partial = demo / "features" / f".{LITE0_64}.partial"
    chunk = partial / "trainval-000002.npz"
    chunk.write_bytes(chunk.read_bytes()[:1000])  # e.g. a disk that lost the file's end
    image.write_bytes(kept)
    result = invoke(runner, args, ok=False)
    assert f"{chunk} is damaged" in result.output and "rerun to redo it" in result.output
    result = invoke(runner, args)
    assert f"resuming {LITE0_64}.h5: 7 of 8 chunks done" in result.output
    features, _ = _features(demo)
    for source in ("trainval", "test"):
        assert np.array_equal(features[source], reference_64[source])
