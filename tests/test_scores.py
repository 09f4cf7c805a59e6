"""`spl pseudo-labels` and `spl import-scores`: the scores file, its rows and tiles against an
independent computation, provenance, resume after SIGKILL, torchrun, bad input."""

import json
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
from scorefixtures import TINY, TINY_SIZE, register

from spl.data.common import SplError, sha256_file
from spl.data.images import IMAGENET_MEAN, IMAGENET_STD, load_rgb
from spl.data.prepared import load_prepared
from spl.extract import features as feature_file
from spl.extract import scores as scores_file
from spl.extract.images import ImageFiles, tile_boxes
from spl.extract.scores import load_scores

from conftest import REPO, invoke

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SCORER = f"openclip:{TINY}"
RUN = ["--device", "cpu", "--workers", "0", "--no-progress"]
TAG_RANDOM_G2 = f"openclip-{TINY}-random-{TINY_SIZE}-g2"
CHUNKED = ["--scorer", SCORER, "--weights", "random", "--grid", "2", "--chunk-size", "32",
           "--batch-size", "16", *RUN]  # fmt: skip
HELPER = REPO / "tests" / "scorefixtures.py"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread per process, as torchrun sets it: runs then compare bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    register()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def demo(demo_small, tmp_path):
    target = tmp_path / "root" / "demo"
    shutil.copytree(demo_small, target, ignore=shutil.ignore_patterns("features", "scores"))
    return target


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A state dict of the tiny architecture (seeded, not the scorer's own random init)."""
    import open_clip

    register()
    torch.manual_seed(3)
    model = open_clip.create_model(TINY)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def reference(demo_small, tmp_path_factory):
    """Scores of the demo: random tiny model, grid 2, chunks of 32 rows in batches of 16."""
    from click.testing import CliRunner

    register()
    target = tmp_path_factory.mktemp("reference") / "demo"
    shutil.copytree(demo_small, target, ignore=shutil.ignore_patterns("features", "scores"))
    invoke(CliRunner(), ["pseudo-labels", target, *CHUNKED])
    return _arrays(target / "scores" / f"{TAG_RANDOM_G2}.h5")


def _arrays(path):
    with h5py.File(path) as h5:
        out = {key: h5[key][()] for key in ("trainval", "test")}
        if "tiles" in h5:
            out.update({f"tiles/{key}": h5[f"tiles/{key}"][()] for key in ("trainval", "test")})
        return out, dict(h5.attrs)


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _independent_scores(weights, image, grid, prompts, mean, std):
    """The scorer's numbers for one image, from open_clip and PIL directly: the whole image
    and each tile (cut here, AEVLP's way) resized to the model's size, normalised, encoded;
    cosine with each prompt's encoding."""
    import open_clip
    from torchvision import transforms

    model = open_clip.create_model(TINY, pretrained=str(weights)).eval()
    tokens = open_clip.get_tokenizer(TINY)(prompts)
    transform = transforms.Compose(
        [transforms.Resize((TINY_SIZE, TINY_SIZE)), transforms.ToTensor(),
         transforms.Normalize(mean, std)]
    )  # fmt: skip
    width, height = image.size
    tile_w, tile_h = width // grid, height // grid
    crops = [image] + [
        image.crop((x * tile_w, y * tile_h, (x + 1) * tile_w, (y + 1) * tile_h))
        for y in range(grid)
        for x in range(grid)
    ]
    with torch.inference_mode():
        text = model.encode_text(tokens)
        text = text / text.norm(dim=-1, keepdim=True)
        embedding = model.encode_image(torch.stack([transform(c) for c in crops]))
        embedding = embedding / embedding.norm(dim=-1, keepdim=True)
    return (embedding @ text.T).numpy(), text.numpy()


def test_scores_rows_and_tiles_equal_the_model_on_each_image(demo, runner, tiny_weights):
    digest = sha256_file(tiny_weights)
    args = ["pseudo-labels", demo, "--scorer", SCORER, "--weights", tiny_weights, "--grid", "3",
            "--batch-size", "7", *RUN]  # fmt: skip
    result = invoke(runner, args)
    tag = f"openclip-{TINY}-file-{digest[:12]}-{TINY_SIZE}-g3"
    path = demo / "scores" / f"{tag}.h5"
    assert f"wrote {path}" in result.output
    assert re.search(r"scored 240 images in .* images/s", result.output)
    scores, attrs = _arrays(path)
    assert scores["trainval"].shape == (160, 10) and scores["test"].shape == (80, 10)
    assert scores["tiles/trainval"].shape == (160, 9, 10) and scores["tiles/test"].shape == (
        80,
        9,
        10,
    )
    prepared = load_prepared(demo)
    assert attrs["format"] == "spl.scores" and attrs["tag"] == tag
    assert attrs["scorer"] == SCORER and attrs["weights"] == f"file-{digest[:12]}"
    assert attrs["weights_sha256"] == digest and attrs["weights_source"] == str(tiny_weights)
    assert attrs["prompt"] == "a photo of a {}." and attrs["grid"] == 3
    assert json.loads(attrs["classes"]) == prepared.classes == [str(d) for d in range(10)]
    assert json.loads(attrs["prompts"])[7] == "a photo of a 7."
    assert attrs["image_size"] == TINY_SIZE and attrs["normalize"] == "clip"
    transform = json.loads(attrs["transform"])
    assert transform["resize"] == [32, 32] and transform["interpolation"] == "bilinear"
    np.testing.assert_allclose(transform["mean"], CLIP_MEAN)
    np.testing.assert_allclose(transform["std"], CLIP_STD)
    assert attrs["dataset_fingerprint"] == prepared.fingerprint and attrs["dataset_name"] == "demo"
    assert json.loads(attrs["versions"])["open_clip"] and attrs["bad_images"] == 0
    assert "float32" in attrs["compute"]
    prompts = [f"a photo of a {c}." for c in prepared.classes]
    for source, row in (("trainval", 0), ("trainval", 159), ("test", 41)):
        image = load_rgb(prepared.image_root / prepared.images[source][row])
        expected, text = _independent_scores(tiny_weights, image, 3, prompts, CLIP_MEAN, CLIP_STD)
        np.testing.assert_allclose(scores[source][row], expected[0], atol=2e-5)
        np.testing.assert_allclose(scores[f"tiles/{source}"][row], expected[1:], atol=2e-5)
    with h5py.File(path) as h5:
        np.testing.assert_allclose(h5["text_features"][()], text, atol=1e-6)
        layout = {name: (h5[name].chunks, h5[name].id.get_offset()) for name in scores}
    for name, (chunks, offset) in layout.items():  # contiguous: memory-mapped, the same values
        assert chunks is None
        mapped = np.memmap(path, np.float32, "r", offset, scores[name].shape)
        assert np.array_equal(mapped, scores[name])
    loaded = load_scores(prepared, tag)
    assert loaded.grid == 3 and np.array_equal(loaded.tiles["test"], scores["tiles/test"])
    assert loaded.text_features.shape == (10, 24)


def test_imagenet_normalisation_class_names_and_a_prompt_of_ones_own(
    demo, runner, tiny_weights, tmp_path
):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"digit {d}" for d in range(10)) + "\n")
    args = ["pseudo-labels", demo, "--scorer", SCORER, "--weights", tiny_weights, "--grid", "0",
            "--normalize", "imagenet", "--class-names", names, "--prompt", "a picture of {}",
            *RUN]  # fmt: skip
    invoke(runner, args)
    digest = sha256_file(tiny_weights)
    tag = f"openclip-{TINY}-file-{digest[:12]}-{TINY_SIZE}-imagenet"  # no grid, not CLIP's mean
    scores, attrs = _arrays(demo / "scores" / f"{tag}.h5")
    assert "tiles/test" not in scores and attrs["grid"] == 0
    assert json.loads(attrs["class_names"])[3] == "digit 3" and attrs["normalize"] == "imagenet"
    np.testing.assert_allclose(json.loads(attrs["transform"])["mean"], IMAGENET_MEAN)
    prepared = load_prepared(demo)
    image = load_rgb(prepared.image_root / prepared.images["test"][5])
    prompts = [f"a picture of digit {d}" for d in range(10)]
    expected, _ = _independent_scores(tiny_weights, image, 1, prompts, IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(scores["test"][5], expected[0], atol=2e-5)
    # The same tag with another prompt is another file: refused, named; --tag writes it.
    other = [a if a != "a picture of {}" else "an image of {}" for a in args]
    result = invoke(runner, other, ok=False)
    assert (
        "exists but was made with other settings ({'prompt': 'a picture of {}'})" in result.output
    )
    assert "--tag" in result.output
    invoke(runner, [*other, "--tag", "mine"])
    assert (demo / "scores" / "mine.h5").is_file()
    result = invoke(runner, [*other, "--tag", "mine"])
    assert "is complete; nothing to do" in result.output


def test_one_decode_per_image_for_the_image_and_its_tiles(demo, monkeypatch):
    """A worker item is the whole image then its tiles, row by row, from one decode."""
    from PIL import Image

    import spl.extract.images as images

    decodes = []
    monkeypatch.setattr(images, "load_rgb", lambda path: decodes.append(path) or load_rgb(path))
    prepared = load_prepared(demo)
    path = prepared.image_root / prepared.images["test"][9]
    files = ImageFiles([path], 32, grid=3)
    payload, index, error = files[0]
    assert len(decodes) == 1 and payload.shape == (10, 32, 32, 3) and error == ""
    image = Image.open(path).convert("RGB")
    whole = np.asarray(image.resize((32, 32), Image.BILINEAR))
    tile_5 = np.asarray(
        image.crop((42, 21, 63, 42)).resize((32, 32), Image.BILINEAR)
    )  # row 1, col 2
    assert np.array_equal(payload[0].numpy(), whole) and np.array_equal(payload[6].numpy(), tile_5)
    assert tile_boxes(10, 7, 3) == [
        (0, 0, 3, 2), (3, 0, 6, 2), (6, 0, 9, 2),
        (0, 2, 3, 4), (3, 2, 6, 4), (6, 2, 9, 4),
        (0, 4, 3, 6), (3, 4, 6, 6), (6, 4, 9, 6),
    ]  # fmt: skip
    assert all(r > left and b > top for left, top, r, b in tile_boxes(2, 2, 3))  # never empty
    missing = ImageFiles([demo / "nope.png"], 32, grid=2)[0]
    assert missing[0].shape == (5, 32, 32, 3) and "image not found" in missing[2]


def test_sigkill_midway_then_resume_gives_the_same_file(demo, reference, runner):
    partial = demo / "scores" / f".{TAG_RANDOM_G2}.partial"
    process = subprocess.Popen(
        [sys.executable, HELPER, "pseudo-labels", demo, *CHUNKED, "--chunk-pause", "1"],
        cwd=demo.parent, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
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
    assert not (demo / "scores" / f"{TAG_RANDOM_G2}.h5").exists()  # never a half-written file
    result = invoke(runner, ["pseudo-labels", demo, *CHUNKED])
    assert f"resuming {TAG_RANDOM_G2}.h5: {done} of 8 chunks done" in result.output
    assert re.search(rf"scored {240 - 32 * done} images", result.output)
    scores, _ = _arrays(demo / "scores" / f"{TAG_RANDOM_G2}.h5")
    expected, _ = reference
    assert scores.keys() == expected.keys()
    for key in expected:
        assert np.array_equal(scores[key], expected[key]), key
    assert not partial.exists()
    result = invoke(runner, ["pseudo-labels", demo, *CHUNKED, "--normalize", "imagenet"])
    assert "wrote" in result.output  # another tag: no clash with the finished file


def test_torchrun_two_processes_write_the_single_process_file(demo, reference):
    job = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         HELPER, "pseudo-labels", demo, *CHUNKED],
        cwd=demo.parent, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = job.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # torchrun and both of its workers
        raise
    assert job.returncode == 0, stderr[-3000:]
    share = int(re.search(r"scored (\d+) images .* on rank 0", stdout).group(1))
    assert share == 128  # 8 chunks round-robin: rank 0 takes 4 of 32 rows
    assert stdout.count("wrote ") == 1
    scores, _ = _arrays(demo / "scores" / f"{TAG_RANDOM_G2}.h5")
    expected, _ = reference
    for key in expected:
        assert np.array_equal(scores[key], expected[key]), key


def test_unreadable_images_stop_the_run_or_get_nan_scores(demo, runner, reference):
    prepared = load_prepared(demo)
    position = int(np.searchsorted(prepared.split["val"], 64))  # a val image past 2 chunks
    train_row = int(prepared.split["val"][position])
    missing = prepared.image_root / prepared.images["trainval"][train_row]
    missing.unlink()
    corrupt = prepared.image_root / prepared.images["test"][70]
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = ["pseudo-labels", demo, *CHUNKED]
    result = invoke(runner, args, ok=False)
    assert (
        f"val split row {position} (trainval row {train_row}): image not found: {missing}"
        in result.output
    )
    assert "--skip-bad" in result.output
    result = invoke(runner, [*args, "--skip-bad"])
    assert f"resuming {TAG_RANDOM_G2}.h5: {train_row // 32} of 8 chunks done" in result.output
    assert "2 unreadable images recorded as bad rows (NaN scores)" in result.output
    assert f"test split row 70: cannot decode image {corrupt}" in result.output
    path = demo / "scores" / f"{TAG_RANDOM_G2}.h5"
    scores, attrs = _arrays(path)
    assert attrs["bad_images"] == 2
    with h5py.File(path) as h5:
        assert h5["bad/trainval"][()].tolist() == [train_row]
        assert h5["bad/test"][()].tolist() == [70]
    expected, _ = reference
    for source, row in (("trainval", train_row), ("test", 70)):
        for key in (source, f"tiles/{source}"):
            assert np.isnan(scores[key][row]).all()
            keep = np.arange(len(scores[key])) != row
            assert np.array_equal(scores[key][keep], expected[key][keep])
    loaded = load_scores(prepared, TAG_RANDOM_G2)  # NaN rows are expected where recorded bad
    assert loaded.bad_rows["test"].tolist() == [70]


def test_import_scores_round_trip_and_refusals(demo, runner, tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train": rng.normal(size=(160, 10)).astype(np.float32),
        "test": rng.normal(size=(80, 10)),
        "train-tiles": rng.normal(size=(160, 4, 10)),
        "test-tiles": rng.normal(size=(80, 4, 10)).astype(np.float32),
    }
    files = {}
    for name, array in arrays.items():
        files[name] = tmp_path / f"{name}.npy"
        np.save(files[name], array)
    args = ["import-scores", demo, "--train", files["train"], "--test", files["test"]]
    tiles = ["--train-tiles", files["train-tiles"], "--test-tiles", files["test-tiles"]]
    result = invoke(runner, [*args, *tiles])
    assert f"wrote {demo / 'scores' / 'imported.h5'}" in result.output
    prepared = load_prepared(demo)
    loaded = load_scores(prepared, "imported")
    assert np.array_equal(loaded.scores["trainval"], arrays["train"])
    np.testing.assert_allclose(loaded.scores["test"], arrays["test"], rtol=1e-7)  # now float32
    np.testing.assert_allclose(loaded.tiles["trainval"], arrays["train-tiles"], rtol=1e-7)
    assert loaded.grid == 2 and loaded.attrs["scorer"] == "imported"
    origin = json.loads(loaded.attrs["imported_from"])
    assert origin["trainval"]["sha256"] == sha256_file(files["train"])
    assert origin["tiles/test"]["file"] == str(files["test-tiles"])
    result = invoke(runner, args, ok=False)
    assert "imported.h5 already exists; pass --force" in result.output
    invoke(runner, [*args, "--tag", "flat"])
    assert load_scores(prepared, "flat").tiles is None

    def refused(name, array, *extra):
        path = tmp_path / f"bad-{name}.npy"
        np.save(path, array)
        swap = {"train": 3, "test": 5}[name.split("-")[0]]
        command = [*args[:swap], path, *args[swap + 1 :], "--tag", "x", *extra]
        return invoke(runner, command, ok=False).output.replace("\n", " "), path

    output, path = refused("train", arrays["train"][:150])
    assert f"{path} holds 150 rows; {prepared.path} has 160 in the trainval file" in output
    output, path = refused("test", arrays["test"][:, :9])
    assert f"{path} holds scores for 9 classes; {prepared.path} has 10" in output
    broken = arrays["train"].copy()
    broken[17, 4] = np.nan
    split = "val" if 17 in prepared.split["val"] else "train"
    output, path = refused("train", broken)
    assert f"{path}: NaN or infinite scores in row 17 ({split} split row" in output
    broken = arrays["test"].copy()
    broken[[3, 40]] = np.inf
    output, path = refused("test", broken)
    assert f"{path}: NaN or infinite scores in row 3, row 40" in output
    output, _ = refused("train", arrays["train"], "--train-tiles", files["train-tiles"])
    assert "give tiles for both files" in output
    np.save(tmp_path / "three.npy", np.zeros((160, 3, 10)))
    command = [*args, "--train-tiles", tmp_path / "three.npy", "--test-tiles",
               files["test-tiles"], "--tag", "x"]  # fmt: skip
    output = invoke(runner, command, ok=False).output
    assert "3 tiles per image is not a square grid" in output
    assert not (demo / "scores" / "x.h5").exists()


@pytest.mark.parametrize("module", [feature_file, scores_file], ids=["features", "scores"])
def test_a_stage_file_missing_unreadable_of_another_kind_or_dataset_is_refused_by_name(
    demo, module
):
    prepared = load_prepared(demo)
    if module is feature_file:
        folder, kind, command, load = (
            demo / "features",
            "feature",
            "spl extract",
            module.load_features,
        )
    else:
        folder, kind, command, load = demo / "scores", "scores", "spl pseudo-labels", load_scores
    folder.mkdir(exist_ok=True)
    (folder / "garbled.h5").write_bytes(b"not HDF5 at all")
    with h5py.File(folder / "other-kind.h5", "w") as h5:
        h5.attrs["format"] = "spl.scores" if module is feature_file else "spl.features"
    with h5py.File(folder / "foreign.h5", "w") as h5:
        h5.attrs.update({"format": module.FORMAT, "dataset_fingerprint": "f" * 16,
                         "dataset_name": "elsewhere"})  # fmt: skip

    def message(tag):
        with pytest.raises(SplError) as caught:
            load(prepared, tag)
        return str(caught.value)

    text = message("absent")
    assert f"{folder / 'absent.h5'} not found; {kind} tags of {prepared.name}: " in text
    assert "foreign, garbled, other-kind" in text and command in text
    text = message("garbled")
    assert f"{folder / 'garbled.h5'} is not a readable HDF5 file" in text and command in text
    assert message("other-kind") == f"{folder / 'other-kind.h5'} is not an spl {kind} file"
    text = message("foreign")
    assert f"{folder / 'foreign.h5'} was made from another prepared dataset" in text
    assert "'elsewhere'" in text and f"{command} {demo}" in text and "--force" in text


def test_bad_scorer_settings_are_refused_before_any_work(demo, runner):
    result = invoke(runner, ["pseudo-labels", demo, "--scorer", "resnet50"], ok=False)
    assert "unknown scorer 'resnet50': use openclip:ARCH" in result.output
    result = invoke(runner, ["pseudo-labels", demo, "--scorer", "openclip:ViT-B-99"], ok=False)
    assert "open_clip has no architecture 'ViT-B-99'" in result.output
    args = ["pseudo-labels", demo, "--scorer", SCORER, "--weights", "random", *RUN]
    result = invoke(runner, [*args, "--prompt", "a photo"], ok=False)
    assert "--prompt 'a photo' must hold one {} where the class name goes" in result.output
    result = invoke(runner, [*args, "--grid", "-1"], ok=False)
    assert "--grid must be >= 0" in result.output
    assert not (demo / "scores").exists()


def test_missing_open_clip_names_the_extra(demo, runner, monkeypatch):
    from spl.extract.backbones import get_backbone

    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` fails
    with pytest.raises(SplError, match=r"pip install 'spl\[vlm\]' \(the package open_clip_torch\)"):
        get_backbone("openclip:ViT-B-16", "random")
    result = invoke(runner, ["pseudo-labels", demo, "--weights", "random", *RUN], ok=False)
    assert "pip install 'spl[vlm]'" in result.output and "Traceback" not in result.output
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(SplError, match=r"pip install 'spl\[timm\]'"):
        get_backbone("timm:resnet18", "random")


def test_an_open_clip_tag_offline_says_to_pass_the_file(monkeypatch):
    import open_clip

    from spl.extract.backbones import get_backbone

    def offline(*args, **kwargs):
        raise FileNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", offline)
    with pytest.raises(SplError) as error:
        get_backbone("openclip:ViT-B-16", "openai")
    message = str(error.value)
    assert "cannot get open_clip weights ViT-B-16 openai (cannot find the requested" in message
    assert (
        "download open_clip_model.safetensors (or open_clip_pytorch_model.bin) from "
        "https://huggingface.co/timm/vit_base_patch16_clip_224.openai elsewhere" in message
    )
    assert "--weights openai=PATH" in message and "or --weights PATH" in message


def test_a_declared_tag_gives_a_file_the_tags_activation_and_normalisation(
    monkeypatch, tiny_weights, demo, runner
):
    """`--weights TAG=PATH`: a local copy of a tag's file is named, normalised and built
    (QuickGELU here) as the tag, as open_clip would build it after downloading it."""
    import open_clip

    from spl.extract.backbones import get_backbone
    from spl.extract.libraries import openclip_model

    tag_cfg = {
        "hf_hub": "org/repo/",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25,) * 3,
        "quick_gelu": True,
    }
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, {"fancy": tag_cfg})
    digest = sha256_file(tiny_weights)
    model, spec = openclip_model(TINY, "fancy", tiny_weights, digest)
    assert (spec.weights, spec.mean, spec.std, spec.sha256) == (
        "fancy",
        (0.5,) * 3,
        (0.25,) * 3,
        digest,
    )
    activation = model.visual.transformer.resblocks[0].mlp.gelu
    assert type(activation).__name__ == "QuickGELU" and "QuickGELU" in spec.source
    _, plain = get_backbone(SCORER, weights_path=tiny_weights)
    assert plain.weights == f"file-{digest[:12]}" and plain.mean == CLIP_MEAN
    args = ["pseudo-labels", demo, "--scorer", SCORER, "--weights", f"fancy={tiny_weights}",
            "--grid", "0", *RUN]  # fmt: skip
    invoke(runner, args)
    _, attrs = _arrays(demo / "scores" / f"openclip-{TINY}-fancy-{TINY_SIZE}.h5")
    assert attrs["weights"] == "fancy" and attrs["weights_sha256"] == digest
    assert json.loads(attrs["transform"])["std"] == [0.25] * 3


@pytest.mark.parametrize("module", [feature_file, scores_file], ids=["features", "scores"])
def test_a_stage_file_with_non_finite_rows_is_refused_unless_they_are_recorded_bad(demo, module):
    prepared = load_prepared(demo)
    counts = {src: len(prepared.images[src]) for src in ("trainval", "test")}
    arrays = {src: np.ones((n, prepared.num_classes), np.float32) for src, n in counts.items()}
    arrays["trainval"][[5, 9]] = np.nan
    arrays["test"][2, 1] = np.inf
    attrs = {"tag": "t", "dataset_fingerprint": prepared.fingerprint, "dataset_name": "demo"}
    features = module is feature_file
    folder, what = ("features", "features") if features else ("scores", "scores")
    path, load = demo / folder / "t.h5", module.load_features if features else load_scores

    def write(bad):
        if features:
            module.write_features(path, arrays, {**attrs, "backbone": "x"}, bad_rows=bad,
                                  force=True)  # fmt: skip
        else:
            extra = {"scorer": "imported", "classes": list(prepared.classes), "grid": 0}
            module.write_scores(path, arrays, {**attrs, **extra}, bad_rows=bad, force=True)

    path.parent.mkdir(exist_ok=True)
    write(None)
    with pytest.raises(SplError) as caught:
        load(prepared, "t")
    rows = ", ".join(feature_file.split_row_name(prepared, "trainval", r) for r in (5, 9))
    assert f"{path}: NaN or infinite {what} in 2 trainval rows ({rows}); " in str(caught.value)
    write({"trainval": [5, 9]})
    with pytest.raises(SplError, match=rf"infinite {what} in 1 test rows \(test split row 2\)"):
        load(prepared, "t")
    write({"trainval": [5, 9], "test": [2]})
    assert load(prepared, "t").bad_rows["test"].tolist() == [2]
    assert load(prepared, "t", check_finite=False) is not None
