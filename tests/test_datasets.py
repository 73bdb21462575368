"""The paper's datasets (COCO-Stuff 27/81/171, Cityscapes, Pascal VOC 2012), their label maps,
the training crops of METHOD.md section 0, and what bad trees and bad files give.

VOC and Cityscapes trees are built from the real files in ../shared/data/real; COCO-Stuff
trees from small synthetic images written here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cause_cli.cli import app
from cause_cli.data import DATASETS, canonical_name, open_dataset
from cause_cli.data import preparing as crops_module
from cause_cli.data.crops import RECIPES, crop_plan, find_crops
from cause_cli.data.labels import LABEL_MAPS
from cause_cli.data.loading import LoadReport, iterate_batches
from cause_cli.data.preparing import prepare_crops
from cause_cli.errors import CauseError

from .helpers import shared_path

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


# --- trees ------------------------------------------------------------------------------


def make_voc(data_dir: Path, train: int = 2, base: str = "VOCdevkit/VOC2012") -> list[str]:
    """A VOC tree of the ten real validation images: the first ``train`` also form train."""
    source = shared_path("data", "real", "voc2012")
    root = data_dir / base
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    ids = sorted(path.stem for path in (source / "images").glob("*.png"))
    for name in ids:
        Image.open(source / "images" / f"{name}.png").convert("RGB").save(root / "JPEGImages" / f"{name}.jpg")
        shutil.copy(source / "SegmentationClass" / f"{name}.png", root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids[:train]) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    return ids


CITY_FRAME = "frankfurt_000000_000294"


def make_cityscapes(data_dir: Path) -> Path:
    """The real Frankfurt frame in val, and twice (two cities) in train."""
    source = shared_path("data", "real", "cityscapes")
    root = data_dir / "cityscapes"
    for split, city in (("val", "frankfurt"), ("train", "frankfurt"), ("train", "aachen")):
        for kind, suffix in (("leftImg8bit", "leftImg8bit"), ("gtFine", "gtFine_labelIds")):
            target = root / kind / split / city
            target.mkdir(parents=True, exist_ok=True)
            name = f"{CITY_FRAME}_{suffix}.png".replace("frankfurt", city)
            shutil.copy(source / kind / "val" / "frankfurt" / f"{CITY_FRAME}_{suffix}.png", target / name)
    return root


COCO_BANDS = (0, 91, 148, 255)  # person, banner, road, unlabelled: one horizontal band each


def coco_label(size: tuple[int, int] = (40, 40), bands: tuple[int, ...] = COCO_BANDS) -> np.ndarray:
    width, height = size
    rows = np.repeat(np.array(bands, dtype=np.uint8), height // len(bands))
    return np.tile(rows[:, None], (1, width))


def make_coco(data_dir: Path, train: int = 3, val: int = 2, size: tuple[int, int] = (40, 40)) -> Path:
    root = data_dir / "cocostuff"
    rng = np.random.default_rng(0)
    for split, count in (("train2017", train), ("val2017", val)):
        for folder in ("images", "annotations", "curated"):
            (root / folder / split).mkdir(parents=True, exist_ok=True)
        ids = [f"{index + (0 if split == 'train2017' else 500):012d}" for index in range(count)]
        for name in ids:
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / split / f"{name}.jpg")
            Image.fromarray(coco_label(size)).save(root / "annotations" / split / f"{name}.png")
        (root / "curated" / split / "Coco164kFull_Stuff_Coarse.txt").write_text("\n".join(ids) + "\n")
    val_ids = (root / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse.txt").read_text().split()
    (root / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt").write_text(val_ids[0] + "\n")
    return root


# --- label maps ------------------------------------------------------------------------


# (stored id, expected class index); -1 = ignored. Written out by hand from the COCO-Stuff id
# list, STEGO's coarse classes, the reference's 81/171 maps and the Cityscapes/VOC ids.
HAND_WRITTEN = {
    "cocostuff27": [
        (0, 9),  # person -> person
        (2, 11),  # car -> vehicle
        (9, 8),  # traffic light -> outdoor
        (11, 8),  # street sign (unused) -> outdoor
        (17, 7),  # dog -> animal
        (26, 6),  # backpack -> accessory
        (37, 10),  # kite -> sports
        (46, 5),  # cup -> kitchen
        (52, 2),  # apple -> food (things)
        (62, 3),  # couch -> furniture (things)
        (72, 0),  # laptop -> electronic
        (81, 1),  # refrigerator -> appliance
        (83, 4),  # book -> indoor
        (91, 17),  # banner -> textile
        (93, 22),  # branch -> plant
        (101, 12),  # ceiling-tile -> ceiling
        (105, 23),  # clouds -> sky
        (117, 13),  # floor-wood -> floor
        (121, 14),  # fruit -> food (stuff)
        (129, 15),  # light -> furniture (stuff)
        (138, 16),  # paper -> raw material
        (148, 21),  # road -> ground
        (157, 20),  # skyscraper -> building
        (163, 25),  # structural-other -> structural
        (170, 18),  # wall-brick -> wall
        (177, 26),  # water-other -> water
        (180, 19),  # window-other -> window
        (181, 24),  # wood -> solid
        (255, -1),
        (200, -1),  # not a COCO-Stuff id
    ],
    "cocostuff81": [
        (0, 1),  # person
        (10, 11),  # fire hydrant
        (11, -1),  # street sign: never annotated, not in the map
        (12, 12),  # stop sign
        (24, 24),  # giraffe
        (26, 25),  # backpack
        (89, 80),  # toothbrush
        (90, -1),  # hair brush: unused
        (91, 0),  # banner -> stuff
        (181, 0),  # wood -> stuff
        (255, -1),
    ],
    "cocostuff171": [
        (0, 0),
        (10, 10),
        (11, -1),
        (12, 11),
        (26, 24),
        (89, 79),
        (91, 80),  # banner: first stuff class
        (148, 137),  # road
        (181, 170),  # wood: last
        (255, -1),
    ],
    "cityscapes": [(0, -1), (6, -1), (7, 0), (8, 1), (11, 4), (24, 17), (26, 19), (33, 26), (34, -1), (255, -1)],
    "voc2012": [(0, 0), (1, 1), (15, 15), (20, 20), (21, -1), (255, -1)],
}
UNKNOWN = {"cocostuff27": [200], "cocostuff81": [11, 90], "cocostuff171": [11], "cityscapes": [34], "voc2012": [21]}


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_label_maps_against_hand_written_ids(name):
    label_map = LABEL_MAPS[name]
    for stored, expected in HAND_WRITTEN[name]:
        assert label_map(stored) == expected, (name, stored)
    stored = np.array([[s for s, _ in HAND_WRITTEN[name]]], dtype=np.uint8)
    assert label_map.apply(stored).tolist() == [[e for _, e in HAND_WRITTEN[name]]]
    assert label_map.unknown_ids(stored) == UNKNOWN[name]  # 255 and void ids are not unknown
    assert len(set(label_map.class_names)) == label_map.num_classes
    assert label_map.palette.shape == (label_map.num_classes, 3) and label_map.palette.dtype == np.uint8


def test_label_map_sizes_names_and_colours():
    sizes = {name: label_map.num_classes for name, label_map in LABEL_MAPS.items()}
    assert sizes == {"cocostuff27": 27, "cocostuff81": 81, "cocostuff171": 171, "cityscapes": 27, "voc2012": 21}
    assert LABEL_MAPS["cocostuff27"].class_names[9] == "person"
    assert LABEL_MAPS["cocostuff27"].class_names[21] == "ground"
    assert LABEL_MAPS["cocostuff81"].class_names[:2] == ("stuff", "person")
    assert LABEL_MAPS["cocostuff81"].class_names[80] == "toothbrush"
    assert LABEL_MAPS["cocostuff171"].class_names[80] == "banner"
    assert LABEL_MAPS["cocostuff171"].class_names[170] == "wood"
    assert LABEL_MAPS["cityscapes"].class_names[19] == "car"
    assert tuple(LABEL_MAPS["cityscapes"].palette[0]) == (128, 64, 128)
    assert LABEL_MAPS["voc2012"].class_names[15] == "person"
    assert tuple(LABEL_MAPS["voc2012"].palette[15]) == (192, 128, 128)  # VOC's person colour
    # Every COCO-Stuff id 0..181 that the 27-class map knows maps to a class.
    table = LABEL_MAPS["cocostuff27"].table
    assert (table[:182] >= 0).all() and set(table[:182].tolist()) == set(range(27))


def test_dataset_names_and_aliases(tmp_path):
    assert set(DATASETS) == {"cocostuff27", "cocostuff81", "cocostuff171", "cityscapes", "voc2012", "folder"}
    assert canonical_name("pascalvoc") == "voc2012" and canonical_name("coco171") == "cocostuff171"
    with pytest.raises(CauseError, match="Unknown dataset 'ade20k'; this version reads: cocostuff27"):
        open_dataset("ade20k", tmp_path, "val", 32)


# --- readers --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cocostuff27", "cocostuff81", "cocostuff171"])
def test_coco_stuff_items_are_remapped(tmp_path, name):
    make_coco(tmp_path, train=2, val=3)
    val = open_dataset(name, tmp_path, "val", 20)
    assert len(val) == (1 if name == "cocostuff27" else 3)  # COCO-Stuff-27 validates on the _7 list
    assert val.has_labels and val.infer_num_classes() == LABEL_MAPS[name].num_classes
    assert val.class_names == list(LABEL_MAPS[name].class_names)
    item = val[0]
    assert set(item) == {"image", "label", "index", "path"}
    assert item["image"].shape == (3, 20, 20) and item["image"].dtype == torch.uint8
    assert item["label"].shape == (20, 20) and item["label"].dtype == torch.int64
    expected = {"cocostuff27": [9, 17, 21, -1], "cocostuff81": [1, 0, 0, -1], "cocostuff171": [0, 80, 137, -1]}
    for band, value in enumerate(expected[name]):  # 40 -> 20 pixels: each band is 5 rows
        assert (item["label"][band * 5 : band * 5 + 5] == value).all(), (band, value)
    assert len(open_dataset(name, tmp_path, "train", 20)) == 2
    assert len(open_dataset(name, tmp_path, "all", 20)) == 2 + len(val)


def test_label_ids_outside_the_map_are_reported(tmp_path):
    root = make_coco(tmp_path, train=1, val=2)
    first, second = sorted((root / "annotations" / "val2017").glob("*.png"))
    Image.fromarray(coco_label(bands=(0, 200, 230, 255))).save(first)
    dataset = open_dataset("cocostuff81", tmp_path, "val", 20)
    item, unknown = dataset.load(0)
    assert unknown == [200, 230]
    assert (item["label"][5:15] == -1).all()
    report = LoadReport()
    batches = list(iterate_batches(dataset, 2, report))
    assert len(batches) == 1 and batches[0]["label"].shape == (2, 20, 20)
    assert not report.skipped and set(report.unknown_ids) == {200, 230}
    lines = report.lines("cocostuff81")
    assert lines[0].startswith("label id 200 is outside the cocostuff81 label map (ignored) in 1 image(s): val2017/")
    assert second.stem not in "".join(lines)


def test_voc_reads_the_real_files_resized_to_a_square(tmp_path):
    ids = make_voc(tmp_path, train=3)
    val = open_dataset("voc2012", tmp_path, "val", 40)
    assert len(val) == 10 and len(open_dataset("voc2012", tmp_path, "train", 40)) == 3
    assert val.infer_num_classes() == 21 and val.class_names[0] == "background"
    source = shared_path("data", "real", "voc2012", "SegmentationClass")
    for index in (0, 5):
        stored = Image.open(source / f"{ids[index]}.png").resize((40, 40), Image.Resampling.NEAREST)
        expected = np.asarray(stored).astype(np.int64)
        expected[expected == 255] = -1
        item = val[index]
        assert item["image"].shape == (3, 40, 40)
        assert np.array_equal(item["label"].numpy(), expected)
        assert item["path"] == f"JPEGImages/{ids[index]}"


@pytest.mark.parametrize("base", ["pascalvoc/VOCdevkit/VOC2012", "pascalvoc"])
def test_voc_other_roots(tmp_path, base):
    make_voc(tmp_path, base=base)
    assert len(open_dataset("pascalvoc", tmp_path, "val", 16)) == 10


def test_voc_segmentation_class_aug_is_used_when_present(tmp_path):
    ids = make_voc(tmp_path, train=2)
    root = tmp_path / "VOCdevkit" / "VOC2012"
    (root / "SegmentationClassAug").mkdir()
    Image.fromarray(np.full((513, 513), 7, dtype=np.uint8)).save(root / "SegmentationClassAug" / f"{ids[0]}.png")
    (root / "ImageSets/Segmentation/train_aug.txt").write_text(f"{ids[0]}\n{ids[3]}\n{ids[4]}\n")
    train = open_dataset("voc2012", tmp_path, "train", 16)
    assert [sample.image.stem for sample in train.samples] == [ids[0], ids[3], ids[4]]  # train_aug.txt
    assert set(train[0]["label"].unique().tolist()) == {7}  # from SegmentationClassAug
    assert train.samples[1].label.parent.name == "SegmentationClass"  # not in Aug: the official one


def test_cityscapes_reads_the_real_frame(tmp_path):
    make_cityscapes(tmp_path)
    val = open_dataset("cityscapes", tmp_path, "val", 64)
    train = open_dataset("cityscapes", tmp_path, "train", 64)
    assert len(val) == 1 and len(train) == 2 and train.samples[0].relative.startswith("train/aachen/")
    assert val.infer_num_classes() == 27
    stored_path = shared_path("data", "real", "cityscapes", "gtFine", "val", "frankfurt")
    stored = Image.open(stored_path / f"{CITY_FRAME}_gtFine_labelIds.png")
    resized = np.asarray(stored.resize((128, 64), Image.Resampling.NEAREST)).astype(np.int64)
    expected = resized[:, 32:96] - 7  # shorter side 64, then the centred 64 x 64
    expected[expected < 0] = -1
    item = val[0]
    assert np.array_equal(item["label"].numpy(), expected)
    assert item["label"].max() <= 26 and (item["label"] == 19).any()  # cars (label id 26)


# --- bad trees ------------------------------------------------------------------------


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize(
    ("name", "broken", "message"),
    [
        ("cocostuff27", "cocostuff", r"Folder .*cocostuff is missing; COCO-Stuff is expected as .*images/\{train2017"),
        ("cocostuff27", "cocostuff/annotations/val2017", r"Folder .*annotations/val2017 is missing; COCO-Stuff is"),
        (
            "cocostuff27",
            "cocostuff/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt",
            r"Split file .*Coco164kFull_Stuff_Coarse_7.txt is missing; COCO-Stuff is expected",
        ),
        (
            "cocostuff171",
            "cocostuff/annotations/val2017/000000000501.png",
            r"Image/label count mismatch in .*cocostuff: 2 images and 1 labels for the 2 ids in "
            r".*Coco164kFull_Stuff_Coarse.txt; the first one missing is .*annotations/val2017/000000000501.png",
        ),
        (
            "cocostuff81",
            "cocostuff/images/val2017/000000000500.jpg",
            r"2 labels for the 2 ids .* the first one missing is .*images/val2017/000000000500.jpg",
        ),
    ],
)
def test_coco_tree_errors(tmp_path, name, broken, message):
    make_coco(tmp_path, train=1, val=2)
    _remove(tmp_path / broken)
    with pytest.raises(CauseError, match=message):
        open_dataset(name, tmp_path, "val", 16)


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("cityscapes/gtFine/val", r"Folder .*gtFine/val is missing; Cityscapes is expected as .*_leftImg8bit.png and"),
        (
            f"cityscapes/gtFine/val/frankfurt/{CITY_FRAME}_gtFine_labelIds.png",
            r"Image/label count mismatch in .*cityscapes: 1 images and 0 labels; the first one missing is "
            rf".*gtFine/val/frankfurt/{CITY_FRAME}_gtFine_labelIds.png",
        ),
        (f"cityscapes/leftImg8bit/val/frankfurt/{CITY_FRAME}_leftImg8bit.png", r"No \*_leftImg8bit.png images under"),
    ],
)
def test_cityscapes_tree_errors(tmp_path, broken, message):
    make_cityscapes(tmp_path)
    _remove(tmp_path / broken)
    with pytest.raises(CauseError, match=message):
        open_dataset("cityscapes", tmp_path, "val", 16)


def test_cityscapes_label_without_image(tmp_path):
    make_cityscapes(tmp_path)
    _remove(tmp_path / "cityscapes/leftImg8bit/train/aachen")
    with pytest.raises(
        CauseError, match=r"1 images and 2 labels; the first one missing is .*leftImg8bit/train/aachen/"
    ):
        open_dataset("cityscapes", tmp_path, "train", 16)


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("VOCdevkit", r"No JPEGImages folder in .*VOCdevkit/VOC2012, .*pascalvoc; Pascal VOC 2012 is expected as"),
        ("VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt", r"Split file .*Segmentation/val.txt is missing; Pascal"),
        ("VOCdevkit/VOC2012/SegmentationClass", r"Folder .*SegmentationClass is missing; Pascal VOC 2012 is expected"),
        ("VOCdevkit/VOC2012/JPEGImages/val_1.jpg", r"9 images and 10 labels .* missing is .*JPEGImages/val_1.jpg"),
    ],
)
def test_voc_tree_errors(tmp_path, broken, message):
    make_voc(tmp_path)
    _remove(tmp_path / broken)
    with pytest.raises(CauseError, match=message):
        open_dataset("voc2012", tmp_path, "val", 16)


def test_missing_data_dir_and_bad_split(tmp_path):
    with pytest.raises(CauseError, match=r"Data folder .*nowhere does not exist"):
        open_dataset("cityscapes", tmp_path / "nowhere", "val", 16)
    make_cityscapes(tmp_path)
    with pytest.raises(CauseError, match="Unknown split 'test'"):
        open_dataset("cityscapes", tmp_path, "test", 16)


def test_unreadable_files_are_skipped_counted_and_listed(tmp_path):
    root = make_coco(tmp_path, train=5, val=1)
    images = sorted((root / "images" / "train2017").glob("*.jpg"))
    images[1].write_bytes(b"not a jpeg at all")
    images[3].write_bytes(images[3].read_bytes()[:200])  # truncated
    labels = sorted((root / "annotations" / "train2017").glob("*.png"))
    Image.new("RGB", (40, 40)).save(labels[4])  # a colour label cannot hold class ids
    dataset = open_dataset("cocostuff27", tmp_path, "train", 16)
    with pytest.raises(CauseError, match=r"Cannot read .*000000000001.jpg"):
        dataset[1]  # without the guard, one sentence naming the file
    report = LoadReport()
    batches = list(iterate_batches(dataset, 2, report, workers=2))
    assert [batch["index"].tolist() for batch in batches] == [[0], [2]]  # [1], [3, 4] skipped
    assert sorted(Path(path).name for path in report.skipped) == [images[1].name, images[3].name, labels[4].name]
    lines = report.lines("cocostuff27")
    assert lines[0] == "skipped 3 unreadable file(s):" and len(lines) == 4
    assert "single-channel" in report.skipped[str(labels[4])]


# --- crops ----------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(40, 30), (513, 513), (256, 128), (37, 61)])
def test_crop_plan_matches_torchvision_five_and_ten_crop(width, height):
    from torchvision.transforms.functional import five_crop, ten_crop

    pixels = torch.arange(height * width).reshape(1, height, width)
    for recipe in {RECIPES["cocostuff27"], RECIPES["cocostuff81"], RECIPES["voc2012"]}:
        expected = []
        for ratio in recipe.ratios:
            size = [int(height * ratio), int(width * ratio)]
            expected += list(ten_crop(pixels, size) if recipe.mirrored else five_crop(pixels, size))
        plan = crop_plan(width, height, recipe)
        assert len(plan) == len(expected) == recipe.per_image
        mirrored_pixels = pixels.flip(-1)
        for (box, mirrored), reference in zip(plan, expected, strict=True):
            left, top, right, bottom = box
            ours = (mirrored_pixels if mirrored else pixels)[:, top:bottom, left:right]
            assert torch.equal(ours, reference)


def _crop_files(folder: Path) -> tuple[list[Path], list[Path]]:
    images = sorted((folder / "img" / "train").glob("*.jpg"), key=lambda p: int(p.stem))
    labels = sorted((folder / "label" / "train").glob("*.png"), key=lambda p: int(p.stem))
    return images, labels


def test_prepare_coco27_five_crops(tmp_path):
    make_coco(tmp_path, train=3, size=(40, 32))
    summary = prepare_crops("cocostuff27", tmp_path, workers=2)
    folder = tmp_path / "cocostuff" / "cropped" / "cocostuff_five_crop_0.5"
    assert summary.folder == folder and summary.written == 3 and summary.crops == 15
    images, labels = _crop_files(folder)
    assert [int(p.stem) for p in images] == list(range(15)) == [int(p.stem) for p in labels]
    assert {Image.open(p).size for p in images} == {(20, 16)}
    # Crop 0 is the top-left quarter: bands 0 (person, 8 rows) and 91 (banner, 8 rows); stored + 1.
    top_left = np.asarray(Image.open(labels[0]))
    assert top_left.shape == (16, 20)
    assert (top_left[:8] == 9 + 1).all() and (top_left[8:] == 17 + 1).all()
    bottom = np.asarray(Image.open(labels[3]))  # bottom-right: road then unlabelled (0)
    assert (bottom[:8] == 21 + 1).all() and (bottom[8:] == 0).all()
    status = json.loads((folder / "cause-prepare.json").read_text())
    assert status["complete"] and status["crops_per_image"] == 5 and status["crops"] == 15

    train = open_dataset("cocostuff27", tmp_path, "train", 16, crops=True)
    assert len(train) == 15 and train.note == f"training on the 15 prepared crops in {folder}"
    assert train.infer_num_classes() == 27 and train.class_names[9] == "person"
    item = train[0]
    assert item["image"].shape == (3, 16, 16) and set(item["label"].unique().tolist()) == {9, 17}
    assert len(open_dataset("cocostuff27", tmp_path, "train", 16)) == 3  # crops only when asked for

    again = prepare_crops("cocostuff27", tmp_path)
    assert again.already_prepared and again.crops == 15


def test_prepare_ten_crops_for_coco81_and_171(tmp_path):
    make_coco(tmp_path, train=2, size=(40, 40))
    for name, folder_name in (("cocostuff81", "coco81_double_crop_0"), ("cocostuff171", "coco171_double_crop_0")):
        summary = prepare_crops(name, tmp_path, workers=1)
        assert summary.folder == tmp_path / "cocostuff" / "cropped" / folder_name and summary.crops == 40
        images, labels = _crop_files(summary.folder)
        sizes = [Image.open(p).size for p in images[:20]]
        assert sizes == [(20, 20)] * 10 + [(32, 32)] * 10  # ten at 0.5, then ten at 0.8
        # Crop 5 is crop 0 (top-left) of the mirrored image: the top-right corner, mirrored.
        label_5 = np.asarray(Image.open(labels[5]))
        person = {"cocostuff81": 1, "cocostuff171": 0}[name] + 1
        assert (label_5[:10] == person).all()
    assert len(open_dataset("cocostuff171", tmp_path, "train", 16, crops=True)) == 40


def test_prepare_voc_from_real_images(tmp_path):
    make_voc(tmp_path, train=1)
    result = invoke("prepare", "--dataset", "voc2012", "--data-dir", tmp_path, "--quiet")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "pascalvoc" / "cropped" / "pascalvoc_super_crop_0"
    images, labels = _crop_files(folder)
    assert len(images) == len(labels) == 50
    sides = [Image.open(images[10 * k]).size for k in range(5)]
    assert sides == [(153, 153), (205, 205), (256, 256), (307, 307), (359, 359)]  # int(513 * r)
    source = shared_path("data", "real", "voc2012", "SegmentationClass", "val_0.png")
    stored = np.asarray(Image.open(source)).astype(np.int64)
    expected = np.where(stored == 255, 0, stored + 1)[:153, -153:]  # crop 1: top-right at 0.3
    assert np.array_equal(np.asarray(Image.open(labels[1])), expected)
    train = open_dataset("voc2012", tmp_path, "train", 32, crops=True)
    assert len(train) == 50 and train[0]["label"].shape == (32, 32)


def test_prepare_cityscapes_from_the_real_frame(tmp_path):
    make_cityscapes(tmp_path)
    summary = prepare_crops("cityscapes", tmp_path)
    assert summary.folder == tmp_path / "cityscapes" / "cropped" / "cityscapes_five_crop_0.5"
    images, labels = _crop_files(summary.folder)
    assert len(images) == 10 and {Image.open(p).size for p in images} == {(128, 64)}
    root = tmp_path / "cityscapes" / "gtFine" / "train" / "aachen"
    stored = np.asarray(Image.open(root / "aachen_000000_000294_gtFine_labelIds.png"))
    expected = np.where(stored < 7, 0, stored - 6)[32:96, 64:192]  # crop 4: the centre, class + 1
    assert np.array_equal(np.asarray(Image.open(labels[4])), expected)


def test_prepare_resumes_after_an_interruption(tmp_path, monkeypatch):
    make_coco(tmp_path, train=6)
    original = crops_module._write_crops

    def interrupted(dataset, index, *args):
        if index == 2:
            raise KeyboardInterrupt
        return original(dataset, index, *args)

    monkeypatch.setattr(crops_module, "_write_crops", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_crops("cocostuff27", tmp_path, workers=1)
    folder = tmp_path / "cocostuff" / "cropped" / "cocostuff_five_crop_0.5"
    assert not json.loads((folder / "cause-prepare.json").read_text())["complete"]
    train = open_dataset("cocostuff27", tmp_path, "train", 16, crops=True)
    assert len(train) == 6 and "unfinished" in (train.note or "")  # half-made crops are not used
    (folder / "img" / "train" / "0.jpg").unlink()  # and a crop lost on the way

    monkeypatch.setattr(crops_module, "_write_crops", original)
    summary = prepare_crops("cocostuff27", tmp_path, workers=1)
    assert summary.done_before >= 1 and summary.written >= 2  # image 0 and image 2 at least
    assert summary.done_before + summary.written == 6
    images, labels = _crop_files(folder)
    assert [int(p.stem) for p in images] == list(range(30)) == [int(p.stem) for p in labels]
    assert not list(folder.rglob("*.tmp"))


def test_prepare_skips_unreadable_images_and_renumbers(tmp_path):
    root = make_coco(tmp_path, train=4)
    broken = sorted((root / "images" / "train2017").glob("*.jpg"))[1]
    broken.write_bytes(b"\xff\xd8 broken")
    label = sorted((root / "annotations" / "train2017").glob("*.png"))[2]
    Image.fromarray(coco_label(bands=(0, 91, 250, 255))).save(label)
    result = invoke("prepare", "--dataset", "cocostuff27", "--data-dir", tmp_path, "--threads", "2", "--quiet")
    assert result.exit_code == 0, result.output
    assert f"skipped {broken}: cannot identify image file" in result.stderr.replace("\n", "")
    assert "label id 250 is outside the cocostuff27 map (ignored) in 1 file(s)" in result.stderr
    folder = tmp_path / "cocostuff" / "cropped" / "cocostuff_five_crop_0.5"
    images, labels = _crop_files(folder)
    assert [int(p.stem) for p in images] == list(range(15)) == [int(p.stem) for p in labels]
    status = json.loads((folder / "cause-prepare.json").read_text())
    assert status["complete"] and [entry["path"] for entry in status["skipped"]] == [str(broken)]
    again = invoke("prepare", "--dataset", "cocostuff27", "--data-dir", tmp_path)
    assert "already holds the 15 prepared crops" in again.stdout


def test_crops_made_by_the_reference_are_read(tmp_path):
    # crop_dataset.py of the reference writes COCO-Stuff-27 crops here, numbered from 0.
    folder = tmp_path / "cocostuff27" / "cropped" / "cocostuff27_five_crop_0.5"
    for number in range(3):
        (folder / "img" / "train").mkdir(parents=True, exist_ok=True)
        (folder / "label" / "train").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (30, 20), (0, 0, 0)).save(folder / "img" / "train" / f"{number}.jpg")
        Image.fromarray(np.full((20, 30), number, dtype=np.uint8)).save(folder / "label" / "train" / f"{number}.png")
    assert find_crops("cocostuff27", tmp_path)[0] == folder
    train = open_dataset("cocostuff27", tmp_path, "train", 8, crops=True)
    assert len(train) == 3 and [int(train[n]["label"].unique()) for n in range(3)] == [-1, 0, 1]
    assert train.note == f"training on the 3 prepared crops in {folder}"
    result = invoke("prepare", "--dataset", "cocostuff27", "--data-dir", tmp_path)
    assert result.exit_code == 0 and "(not made by cause prepare); kept" in result.stdout.replace("\n", "")


def test_no_crops_says_so(tmp_path):
    make_coco(tmp_path, train=1)
    train = open_dataset("cocostuff81", tmp_path, "train", 16, crops=True)
    assert len(train) == 1
    assert train.note == (
        f"no prepared crops in {tmp_path}/cocostuff/cropped/coco81_double_crop_0, so training uses the uncropped "
        f"training images; `cause prepare --dataset cocostuff81 --data-dir {tmp_path}` writes the paper's "
        "ten-crop at 0.5, 0.8 (20 crops per image)"
    )


def test_prepare_folder_dataset_without_labels(tmp_path):
    for name in ("a", "b"):
        path = tmp_path / "images" / "train" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 18), (200, 10, 10)).save(path)
    (tmp_path / "images" / "val").mkdir()
    Image.new("RGB", (24, 18)).save(tmp_path / "images" / "val" / "c.png")
    summary = prepare_crops("folder", tmp_path)
    assert summary.folder == tmp_path / "cropped" / "folder_five_crop_0.5" and summary.crops == 10
    assert not (summary.folder / "label").exists()
    train = open_dataset("folder", tmp_path, "train", 8, crops=True)
    assert len(train) == 10 and not train.has_labels and int(train[3]["label"].max()) == -1


# --- end to end -------------------------------------------------------------------------


def test_train_on_voc_crops_then_eval_end_to_end(tmp_path):
    make_voc(tmp_path, train=1)
    assert invoke("prepare", "--dataset", "voc2012", "--data-dir", tmp_path, "--quiet").exit_code == 0
    run = tmp_path / "run"
    common = ("--backbone", "toy", "--resolution", "64", "--clusterbook-size", "32", "--batch-size", "10")
    result = invoke("train", "--dataset", "voc2012", "--data-dir", tmp_path, "--run", run, *common, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "training on the 50 prepared crops in" in result.stderr.replace("\n", "")
    assert "training on the 50 prepared crops" in (run / "train.log").read_text()
    assert json.loads((run / "run.json").read_text())["num_classes"] == 21
    result = invoke("eval", "--run", run, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["images"] == 10 and metrics["dataset"] == "voc2012"
    assert 0 <= metrics["miou"] <= 100 and len(metrics["iou_per_class"]) == 21
    assert "person" in metrics["iou_per_class"]


def test_training_skips_unreadable_files_and_lists_them_at_the_end(tmp_path):
    from cause_cli.config import TrainConfig
    from cause_cli.progress import Reporter
    from cause_cli.training import train

    class Collecting(Reporter):
        def __init__(self) -> None:
            self.messages: list[str] = []

        def message(self, text: str) -> None:
            self.messages.append(text)

    root = make_coco(tmp_path, train=4, val=1)
    broken = sorted((root / "images" / "train2017").glob("*.jpg"))[2]
    broken.write_bytes(b"broken")
    config = TrainConfig(
        data_dir=str(tmp_path),
        dataset="coco27",
        resolution=32,
        clusterbook_size=16,
        projection_dim=32,
        batch_size=2,
        epochs_front_door=1,
    )
    reporter = Collecting()
    run = train(config, tmp_path / "run", "cpu", reporter)
    assert reporter.messages[0].startswith("no prepared crops in ")
    assert reporter.messages[-2:] == [
        "skipped 1 unreadable file(s):",
        f"  {broken}: cannot identify image file '{broken}'",
    ]
    assert f"  {broken}: cannot identify" in (run.path / "train.log").read_text()
    assert json.loads((run.path / "run.json").read_text())["config"]["dataset"] == "cocostuff27"
