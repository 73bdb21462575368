"""`cause segment` on a big photo costs a few bytes a pixel: the image is decoded once, label
maps and overlays stay in 8-bit pixels and are blended a band of rows at a time, and every
output is byte for byte what the whole-image computation gives."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image, ImageOps

from cause_cli.data.base import read_image
from cause_cli.inference import inputs, outputs
from cause_cli.inference.figures import palette
from cause_cli.inference.inputs import rgb_pixels
from cause_cli.inference.outputs import label_image, overlay_image

from .helpers import invoke, train_small_run


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def whole_overlay(image: Image.Image, labels: np.ndarray, colours: np.ndarray, opacity: float = 0.5) -> Image.Image:
    """The obvious overlay: every pixel's colour looked up at once, the whole image blended."""
    ids = np.asarray(labels, dtype=np.int64)
    return Image.blend(image, Image.fromarray(colours[ids % len(colours)].astype(np.uint8), "RGB"), opacity)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# Bands of one row, two rows (53 rows: the last band is cut short), all rows but one, one band.
BANDS = [1, 2 * 37, 52 * 37, 1 << 20]


@pytest.mark.parametrize("band_pixels", BANDS)
@pytest.mark.parametrize("num_classes", [27, 256, 300])
def test_overlays_equal_the_whole_image_blend_across_band_boundaries(monkeypatch, band_pixels, num_classes):
    monkeypatch.setattr(outputs, "OVERLAY_BAND_PIXELS", band_pixels)
    rng = np.random.default_rng(num_classes)
    image = random_image(37, 53, seed=num_classes)
    colours = palette()
    values = rng.integers(0, num_classes, (20, 15))  # a prediction smaller than the image, resized up
    label = label_image(values, image.size, num_classes, colours.reshape(-1).tolist())
    assert label.mode == ("P" if num_classes <= 256 else "I;16")
    expected = png_bytes(whole_overlay(image, np.asarray(label), colours))
    assert png_bytes(overlay_image(image, label, colours)) == expected
    assert png_bytes(overlay_image(image, np.asarray(label, dtype=np.int64), colours)) == expected
    wide = rng.integers(-3, 600, (53, 37))  # ids past the palette wrap around, as they always did
    assert png_bytes(overlay_image(image, wide, colours, 0.3)) == png_bytes(whole_overlay(image, wide, colours, 0.3))
    few = colours[:5]
    assert png_bytes(overlay_image(image, label, few)) == png_bytes(whole_overlay(image, np.asarray(label), few))
    untouched = png_bytes(image)
    blended = overlay_image(image.copy(), label, colours)
    assert png_bytes(image) == untouched and png_bytes(blended) == expected
    target = image.copy()
    assert overlay_image(target, label, colours, in_place=True) is target
    assert png_bytes(target) == expected


@pytest.mark.parametrize("size", [(1, 1), (1, 9), (9, 1), (2001, 3)])
def test_overlays_of_thin_images_equal_the_whole_image_blend(monkeypatch, size):
    monkeypatch.setattr(outputs, "OVERLAY_BAND_PIXELS", 1000)
    image = random_image(*size)
    labels = np.random.default_rng(1).integers(0, 256, size[::-1]).astype(np.uint8)
    label = Image.fromarray(labels, "P")
    expected = png_bytes(whole_overlay(image, labels, palette()))
    assert png_bytes(overlay_image(image, label, palette())) == expected
    assert png_bytes(overlay_image(image.copy(), label, palette(), in_place=True)) == expected


@pytest.mark.parametrize("band_pixels", [1, 2 * 37, 1 << 20])
def test_pixels_copied_by_bands_equal_the_whole_copy(monkeypatch, band_pixels):
    monkeypatch.setattr(inputs, "PIXEL_BAND_PIXELS", band_pixels)
    image = random_image(37, 53)
    pixels = rgb_pixels(image)
    assert pixels.dtype == np.uint8 and pixels.shape == (53, 37, 3)
    assert np.array_equal(pixels, np.asarray(image))


def test_decoding_makes_one_image_and_gives_what_decoding_with_copies_gave(tmp_path):
    pixels = np.asarray(random_image(37, 53))
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    turned = Image.fromarray(pixels)
    exif = turned.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: the upright image is 53 x 37
    turned.save(tmp_path / "turned.png", exif=exif.tobytes())
    Image.fromarray(pixels[..., 0]).save(tmp_path / "grey.png")
    Image.fromarray(pixels).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(np.dstack([pixels, pixels[..., :1]])).save(tmp_path / "rgba.png")
    Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")
    for name in ("rgb.png", "turned.png", "grey.png", "palette.png", "rgba.png", "deep.png"):
        for upright in (False, True):
            with Image.open(tmp_path / name) as opened:
                opened.load()
                stored = ImageOps.exif_transpose(opened) if upright else opened.copy()
            image = read_image(tmp_path / name, upright=upright)
            assert image.mode == "RGB"
            if stored.mode == "RGB":
                assert np.array_equal(np.asarray(image), np.asarray(stored)), name
    assert read_image(tmp_path / "turned.png", upright=True).size == (53, 37)

    before = Image.core.get_stats()["new_count"]
    image = read_image(tmp_path / "rgb.png", upright=True)
    assert Image.core.get_stats()["new_count"] - before == 1  # decoded, neither copied nor converted
    (tmp_path / "rgb.png").unlink()  # the file is closed; the pixels are the image's own
    assert np.array_equal(np.asarray(image), pixels)


def numpy_peak(work) -> int:
    """The most bytes that numpy (and Python) held at once while ``work()`` ran."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_label_maps_and_overlays_hold_under_two_bytes_a_pixel_in_arrays(monkeypatch):
    width, height = 2000, 1500
    image = Image.new("RGB", (width, height), (40, 110, 70))
    values = np.random.default_rng(0).integers(0, 27, (768, 1024))  # the prediction, at most 1,024 pixels
    colours = palette()

    def as_segment_writes() -> None:
        label = label_image(values, image.size, 27, colours.reshape(-1).tolist())
        overlay_image(image, label, colours, in_place=True)

    # A band's colours are a few megabytes; a full-size int64 copy of the labels would be 8
    # bytes a pixel, their colours 3.
    assert numpy_peak(as_segment_writes) < 2 * width * height
    monkeypatch.setattr(inputs, "PIXEL_BAND_PIXELS", 1 << 16)
    # The pixels themselves are 3 bytes a pixel; np.asarray would hold them twice while copying.
    assert numpy_peak(lambda: rgb_pixels(image)) < 3.5 * width * height


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_small_run(tmp_path_factory.mktemp("segment-memory"), num_val=1, seed=3)[1]


def test_segmenting_a_big_image_holds_a_few_bytes_a_pixel_in_arrays(trained, tmp_path, monkeypatch):
    width, height = 2000, 1500
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (height // 50, width // 50, 3), dtype=np.uint8)
    pixels = np.repeat(np.repeat(blocks, 50, 0), 50, 1)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    Image.fromarray(pixels[:48, :64]).save(tmp_path / "small.png")
    # Once before, so that what segment imports and caches on first use is not counted.
    warm = ("segment", tmp_path / "small.png", "--run", trained, "--out", tmp_path / "warm", "--device", "cpu", "-q")
    assert invoke(*warm).exit_code == 0
    # Small bands: what is left is what grows with the image (the 1,024-pixel prediction does not).
    monkeypatch.setattr(outputs, "OVERLAY_BAND_PIXELS", 1 << 16)
    monkeypatch.setattr(inputs, "PIXEL_BAND_PIXELS", 1 << 16)
    out = tmp_path / "out"
    command = ("segment", tmp_path / "photo.png", "--run", trained, "--out", out, "--device", "cpu", "-q")
    result = None

    def run() -> None:
        nonlocal result
        result = invoke(*command)

    peak = numpy_peak(run)
    assert result is not None and result.exit_code == 0, result.output if result else None
    # The decoded pixels are 3 bytes a pixel; int64 label maps and their colours would add 22.
    assert peak < 5 * width * height, f"{peak / (width * height):.1f} bytes a pixel"
    label = Image.open(out / "labels" / "photo.png")
    assert label.mode == "P" and label.size == (width, height)
    expected = png_bytes(whole_overlay(Image.fromarray(pixels), np.asarray(label), palette()))
    assert (out / "overlays" / "photo.png").read_bytes() == expected
