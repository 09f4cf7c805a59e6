"""`spl extract` with backbones from the optional libraries: `openclip:ARCH` (the image
tower's projected embedding) and `timm:NAME` (the pooled pre-logits feature)."""

import re
import shutil

import h5py
import numpy as np
import pytest
import torch
from scorefixtures import TINY, TINY_SIZE, register

from spl.data.common import SplError, sha256_file
from spl.data.images import IMAGENET_MEAN, build_transform, load_rgb
from spl.data.prepared import load_prepared
from spl.extract.backbones import backbone_tag, get_backbone, weights_id
from spl.extract.features import load_features

from conftest import invoke

RUN = ["--device", "cpu", "--workers", "0", "--no-progress"]


@pytest.fixture(autouse=True, scope="module")
def tiny_clip():
    register()


@pytest.fixture
def demo(demo_small, tmp_path):
    target = tmp_path / "root" / "demo"
    shutil.copytree(demo_small, target, ignore=shutil.ignore_patterns("features", "scores"))
    return target


def _features(dataset, tag):
    with h5py.File(dataset / "features" / f"{tag}.h5") as h5:
        return {src: h5[src][()] for src in ("trainval", "test")}, dict(h5.attrs)


def _images(demo, rows, size, mean, std):
    prepared = load_prepared(demo)
    transform = build_transform(size, mean=mean, std=std)
    return torch.stack(
        [transform(load_rgb(prepared.image_root / prepared.images[s][r])) for s, r in rows]
    )


ROWS = (("trainval", 0), ("trainval", 159), ("test", 41))


def test_timm_backbone_gives_the_pooled_pre_logits_of_a_local_file(demo, runner, tmp_path):
    import timm

    torch.manual_seed(2)
    reference = timm.create_model("resnet10t").eval()  # with its classifier, as files come
    path = tmp_path / "resnet10t.pth"
    torch.save(reference.state_dict(), path)
    digest = sha256_file(path)
    args = ["extract", demo, "--backbone", "timm:resnet10t", "--image-size", "32", *RUN]
    result = invoke(runner, [*args, "--weights", path])
    tag = f"timm-resnet10t-file-{digest[:12]}-32"
    assert f"wrote {demo / 'features' / tag}.h5" in result.output
    features, attrs = _features(demo, tag)
    assert features["trainval"].shape == (160, 512) and attrs["feature_dim"] == 512
    assert attrs["backbone"] == "timm:resnet10t" and attrs["weights_sha256"] == digest
    assert '"mean": [0.485, 0.456, 0.406]' in attrs["transform"]  # timm's config of the model
    x = _images(demo, ROWS, 32, IMAGENET_MEAN, (0.229, 0.224, 0.225))
    with torch.inference_mode():
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
    got = np.stack([features[s][r] for s, r in ROWS])
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)
    assert load_features(load_prepared(demo), tag).dim == 512
    # A local copy of a named tag keeps the tag's name; a file of another model is refused.
    invoke(runner, [*args, "--weights", f"c3_in1k={path}"])
    named, attrs = _features(demo, "timm-resnet10t-c3_in1k-32")
    assert np.array_equal(named["test"], features["test"]) and attrs["weights"] == "c3_in1k"
    other = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), other)
    result = invoke(runner, [*args, "--weights", other], ok=False)
    assert (
        "resnet18.pth does not fit timm resnet10t: Error(s) in loading state_dict" in result.output
    )
    assert "Missing key(s)" in result.output and len(result.output) < 600


def test_timm_names_weights_and_random_init():
    assert weights_id("timm:resnet10t") == "c3_in1k"  # timm's default tag
    assert weights_id("timm:resnet10t.c3_in1k") == "c3_in1k"
    assert backbone_tag("timm:resnet10t.c3_in1k", "c3_in1k", 224) == "timm-resnet10t-c3_in1k-224"
    with pytest.raises(SplError, match="no weights 'in22k'; known: c3_in1k, random"):
        weights_id("timm:resnet10t", "in22k")
    with pytest.raises(SplError, match="timm has no model 'resnet_nope'"):
        weights_id("timm:resnet_nope")
    # A ViT is built for the image size asked for; random init is seeded (same on every rank).
    model, spec = get_backbone("timm:test_vit", "random", image_size=48)
    again, _ = get_backbone("timm:test_vit", "random", image_size=48)
    assert (spec.weights, spec.feature_dim, spec.mean) == ("random", 64, (0.5, 0.5, 0.5))
    x = torch.randn(2, 3, 48, 48)
    with torch.inference_mode():
        assert model(x).shape == (2, 64) and torch.equal(model(x), again(x))


def test_openclip_backbone_is_the_projected_image_embedding(demo, runner, tmp_path):
    import open_clip

    torch.manual_seed(4)
    reference = open_clip.create_model(TINY).eval()
    path = tmp_path / "tiny.safetensors"
    from safetensors.torch import save_file

    save_file(reference.state_dict(), path)
    digest = sha256_file(path)
    args = ["extract", demo, "--backbone", f"openclip:{TINY}", "--weights", path,
            "--image-size", str(TINY_SIZE), *RUN]  # fmt: skip
    invoke(runner, args)
    tag = f"openclip-{TINY}-file-{digest[:12]}-{TINY_SIZE}"
    features, attrs = _features(demo, tag)
    assert features["test"].shape == (80, 24) and attrs["backbone"] == f"openclip:{TINY}"
    assert '"mean": [0.48145466, 0.4578275, 0.40821073]' in attrs["transform"]  # CLIP's
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    x = _images(demo, ROWS, TINY_SIZE, mean, std)
    with torch.inference_mode():
        expected = reference.encode_image(x)  # not normalised
    got = np.stack([features[s][r] for s, r in ROWS])
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)
    assert backbone_tag("openclip:ViT-B-16", "openai", 224) == "openclip-ViT-B-16-openai-224"
    assert weights_id("openclip:ViT-B-16") == "openai"
    with pytest.raises(SplError, match=f"backbone openclip:{TINY} has no published weights"):
        weights_id(f"openclip:{TINY}")


def test_list_backbones_names_the_prefixes(runner):
    result = invoke(runner, ["extract", "--list-backbones"])
    assert re.search(r"openclip:ARCH\s+openai\s+open_clip's tags of ARCH, random", result.output)
    assert re.search(r"timm:NAME\s+timm's default tag\s+timm's tags of NAME", result.output)
    assert "--weights ID=PATH" in result.output
    with pytest.raises(SplError, match=r"by prefix openclip:ARCH \(open_clip\) and timm:NAME"):
        weights_id("resnet5")


def test_a_timm_tag_offline_says_to_pass_the_file(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no connection")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(SplError) as error:
        get_backbone("timm:resnet10t")
    message = str(error.value)
    assert "cannot get timm weights resnet10t.c3_in1k (no connection)" in message
    assert (
        "download model.safetensors from https://huggingface.co/timm/resnet10t.c3_in1k" in message
    )
    assert "--weights c3_in1k=PATH" in message
