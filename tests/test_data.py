"""Image pipeline (METHOD.md section 0), the image-folder dataset and synthetic scenes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cause_cli.data.folder import ImageFolderDataset, hashed_split
from cause_cli.data.synthetic import SCENE_CLASSES, make_scene, write_scenes
from cause_cli.data.transforms import denormalise_to_uint8, normalise, resize_and_crop
from cause_cli.errors import CauseError


@pytest.mark.parametrize(("width", "height"), [(500, 375), (375, 500), (321, 320), (640, 641), (100, 100), (97, 301)])
def test_resize_and_crop_equals_torchvision(width, height):
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    rng = np.random.default_rng(width * height)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    reference = transforms.Compose(
        [
            transforms.Resize(64, interpolation=InterpolationMode.NEAREST),
            transforms.CenterCrop(64),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    ours = normalise(resize_and_crop(image, 64))
    assert ours.shape == (3, 64, 64)
    torch.testing.assert_close(ours, reference(image))


def test_square_resize_for_voc():
    image = Image.new("RGB", (500, 300))
    assert resize_and_crop(image, 32, square_resize=True).size == (32, 32)


def test_denormalise_round_trip():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    back = denormalise_to_uint8(normalise(Image.fromarray(pixels))[None])[0]
    assert np.abs(back.astype(int) - pixels.astype(int)).max() <= 1


def test_synthetic_scenes_are_reproducible(tmp_path):
    first = write_scenes(tmp_path / "a", num_train=3, num_val=2, seed=7)
    second = write_scenes(tmp_path / "b", num_train=3, num_val=2, seed=7)
    for path in sorted((first / "images").rglob("*.png")):
        twin = second / path.relative_to(first)
        assert path.read_bytes() == twin.read_bytes()
    assert (first / "classes.txt").read_text().split() == [c.name for c in SCENE_CLASSES]


def test_synthetic_labels_match_their_regions():
    rng = np.random.default_rng(3)
    image, label = make_scene(rng, 96, 128)
    assert image.shape == (96, 128, 3) and label.shape == (96, 128)
    assert set(np.unique(label)) <= set(range(len(SCENE_CLASSES)))
    # Each class has its own mean colour: pixels of one label are closer to their own mean.
    means = {c: image[label == c].mean(axis=0) for c in np.unique(label)}
    for c, mean in means.items():
        others = [np.linalg.norm(mean - m) for o, m in means.items() if o != c]
        if others:
            assert min(others) > 40


def make_folder(root, names, with_labels=True, size=(40, 32)):
    for name in names:
        path = root / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (10, 200, 30)).save(path)
        if with_labels:
            label = root / "labels" / name
            label = label.with_suffix(".png")
            label.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full(size[::-1], 2, dtype=np.uint8)).save(label)


def test_folder_split_subfolders(tmp_path):
    make_folder(tmp_path, ["train/a.png", "train/sub/b.jpg", "val/c.png"])
    train = ImageFolderDataset(tmp_path, "train", resolution=16)
    val = ImageFolderDataset(tmp_path, "val", resolution=16)
    assert [s.relative for s in train.samples] == ["train/a.png", "train/sub/b.jpg"]
    assert [s.relative for s in val.samples] == ["val/c.png"]
    item = train[1]
    assert item["image"].shape == (3, 16, 16) and item["label"].shape == (16, 16)
    assert int(item["label"].unique().item()) == 2
    assert train.infer_num_classes() == 3


def test_folder_hashed_split_is_stable_and_disjoint(tmp_path):
    names = [f"img_{i:03d}.png" for i in range(60)]
    make_folder(tmp_path, names, with_labels=False)
    train = {s.relative for s in ImageFolderDataset(tmp_path, "train", 16).samples}
    val = {s.relative for s in ImageFolderDataset(tmp_path, "val", 16).samples}
    assert train.isdisjoint(val) and len(train | val) == 60
    assert all(hashed_split(name) == "val" for name in val)
    assert 3 <= len(val) <= 25
    unlabelled = ImageFolderDataset(tmp_path, "all", 16)
    assert not unlabelled.has_labels and unlabelled.infer_num_classes() is None
    assert int(unlabelled[0]["label"].max()) == -1


def test_ignore_value_becomes_minus_one(tmp_path):
    make_folder(tmp_path, ["train/a.png", "val/b.png"])
    label = np.full((32, 40), 255, dtype=np.uint8)
    label[:, :20] = 1
    Image.fromarray(label).save(tmp_path / "labels" / "train" / "a.png")
    item = ImageFolderDataset(tmp_path, "train", 32)[0]
    assert set(item["label"].unique().tolist()) == {-1, 1}


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "has no images/ folder"),
        (lambda root: (root / "images").mkdir(parents=True), "No images for split"),
    ],
)
def test_folder_errors(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(CauseError, match=message):
        ImageFolderDataset(root, "train", 16)


def test_missing_label_is_named(tmp_path):
    make_folder(tmp_path, ["train/a.png", "train/b.png", "val/c.png"])
    (tmp_path / "labels" / "train" / "b.png").unlink()
    with pytest.raises(CauseError, match=r"b\.png has no label"):
        ImageFolderDataset(tmp_path, "train", 16)


def test_label_of_another_size_is_named(tmp_path):
    make_folder(tmp_path, ["train/a.png", "val/c.png"])
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(tmp_path / "labels" / "train" / "a.png")
    with pytest.raises(CauseError, match="is \\(10, 10\\)"):
        ImageFolderDataset(tmp_path, "train", 16)[0]


def test_pixels_normalised_on_the_device_equal_normalising_the_image():
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8))
    from cause_cli.data.transforms import normalise_pixels, pixels

    raw = pixels(image)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 9, 7)
    expected = (torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1) - torch.tensor(
        [0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)  # fmt: skip
    assert torch.equal(normalise_pixels(raw[None], "cpu")[0], expected)
