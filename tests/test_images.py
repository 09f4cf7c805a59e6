"""The image dataset and the paper's transforms."""

import numpy as np
import pytest
import torch
from PIL import Image

from spl.data.common import SplError
from spl.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, build_transform
from spl.data.prepared import load_prepared


def test_items_carry_image_labels_observed_and_index(demo_small):
    prepared = load_prepared(demo_small)
    dataset = ImageDataset(prepared, "val", build_transform(64), observed_set="uniform-p1-n0-s1200")
    assert len(dataset) == len(prepared.split["val"])
    image, labels, observed, index = dataset[5]
    assert image.shape == (3, 64, 64) and index == 5
    row = prepared.split["val"][5]
    np.testing.assert_array_equal(labels.numpy(), prepared.labels["trainval"][row])
    np.testing.assert_array_equal(
        observed.numpy(), prepared.observed["uniform-p1-n0-s1200"]["trainval"][row]
    )
    assert observed.sum() == 1 and labels[observed.argmax()] == 1
    test_item = ImageDataset(prepared, "test", build_transform(64))[0]
    assert test_item[2].abs().sum() == 0  # no observed set named: all unobserved


def test_eval_transform_is_resize_then_imagenet_normalisation(tmp_path):
    pixels = np.random.RandomState(0).randint(0, 255, (30, 50, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    out = build_transform()(image)
    assert out.shape == (3, 448, 448)  # the paper's default size, aspect not kept
    resized = np.asarray(image.resize((448, 448), Image.BILINEAR), dtype=np.float32) / 255
    expected = (resized - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=0.03)


def test_flip_only_when_training():
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[:, :4] = 255  # left half white
    image = Image.fromarray(pixels)
    evals = {bool(build_transform(8)(image)[0, 0, 0] > 0) for _ in range(20)}
    assert evals == {True}
    torch.manual_seed(0)
    trains = {bool(build_transform(8, train=True)(image)[0, 0, 0] > 0) for _ in range(40)}
    assert trains == {True, False}


def test_missing_image_names_path_and_row(demo_small, tmp_path):
    prepared = load_prepared(demo_small)
    dataset = ImageDataset(prepared, "test", build_transform(32), image_root=tmp_path)
    with pytest.raises(SplError, match=r"test row 0: image not found: .*00000\.png"):
        dataset[0]
    (tmp_path / "images" / "test").mkdir(parents=True)
    (tmp_path / "images" / "test" / "00000.png").write_bytes(b"not a png")
    with pytest.raises(SplError, match="cannot decode image"):
        dataset[0]
