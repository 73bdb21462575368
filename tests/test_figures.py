"""The figures a person reads: the confusion matrix after matching and the sample predictions,
readable from 6 to 171 classes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cause_cli.data.labels import LABEL_MAPS
from cause_cli.inference.figures import colourise, confusion_picture, palette, samples_picture, save_png

DARKEST = np.array([8, 48, 107])


def dark_pixels(picture: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.asarray(picture.convert("RGB")).astype(int)
    return np.nonzero(np.abs(pixels - DARKEST).sum(axis=-1) <= 6)


@pytest.mark.parametrize("num_classes", [6, 27, 171])
def test_a_perfect_clustering_is_a_dark_diagonal_whatever_the_cluster_order(tmp_path, num_classes):
    names = list(LABEL_MAPS["cocostuff171"].class_names)[:num_classes]
    order = np.random.default_rng(num_classes).permutation(num_classes)  # cluster k holds class order[k]
    histogram = np.zeros((num_classes, num_classes), dtype=np.int64)
    histogram[np.arange(num_classes), order] = 1000
    picture = confusion_picture(histogram, order, names)
    save_png(picture, tmp_path / "confusion.png")
    assert Image.open(tmp_path / "confusion.png").size == picture.size
    # Cells stay large enough to see and the picture small enough to open, at any class count.
    assert 300 <= picture.width <= 1600 and 300 <= picture.height <= 1600
    rows, columns = dark_pixels(picture)  # the full cells, and the colour bar's top
    grid = columns < columns.max() - 30  # leave out the colour bar on the right
    assert grid.sum() > num_classes * 20
    assert np.corrcoef(rows[grid], columns[grid])[0, 1] > 0.9  # cells are blocks: not exactly 1


def test_cells_show_the_share_of_the_true_class_and_names_are_whole():
    names = ["sky", "grass", "water", "sand", "brick wall", "a class with a long name"]
    histogram = np.diag([900, 900, 900, 900, 900, 450]).astype(np.int64)
    histogram[5, 4] = 450  # half of the last class is predicted as the fifth
    picture = confusion_picture(histogram, np.arange(6), names)
    wrong = picture.copy()
    wrong_histogram = histogram.copy()
    wrong_histogram[5, 4] = 0
    wrong = confusion_picture(wrong_histogram, np.arange(6), names)
    assert np.asarray(picture).tolist() != np.asarray(wrong).tolist()
    # The row labels are not cut: the long name pushes the grid to the right of its full width.
    short = confusion_picture(histogram, np.arange(6), [name[:3] for name in names])
    assert picture.width - short.width > 100


def test_samples_have_a_legend_of_every_colour_shown():
    colours = palette()
    image = np.full((64, 64, 3), 128, np.uint8)
    label = np.zeros((64, 64), np.int64)
    label[:, 32:] = 3
    rows = [[image, colourise(label, colours), colourise(label[:, ::-1], colours)]]
    titles = ["image", "ground truth", "prediction"]
    plain = samples_picture(rows, titles)
    legend = [("sky", colours[0]), ("sand", colours[3])]
    with_legend = samples_picture(rows, titles, legend)
    assert with_legend.width == plain.width and with_legend.height > plain.height
    strip = np.asarray(with_legend)[plain.height :].reshape(-1, 3)
    for _, colour in legend:
        assert (strip == colour).all(axis=-1).any()
