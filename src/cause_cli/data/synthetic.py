"""Synthetic scenes: images made of regions of a few classes that differ in colour and
texture, with their label maps, written in the image-folder layout.

Everything is drawn from ``numpy.random.default_rng(seed)``, so the same seed gives the same
files on every machine. Tests and ``cause demo`` use them as a dataset with known segments;
the :data:`FAMILIES` (more or fewer classes, colours that overlap, small objects, large
images) are the scenes of the quality benchmark (``benchmarks/quality.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..paths import write_atomically

Texture = Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]


# Base colours sit on the six axis directions of the ImageNet-normalised colour space
# (mean +- 2 standard deviations in one channel), so that any two classes are orthogonal or
# opposite there: distinct for a backbone of any kind, even a randomly initialised one.
def _axis_colour(channel: int, sign: float, strength: float = 2.0) -> np.ndarray:
    colour = np.array([0.485, 0.456, 0.406])
    colour[channel] += sign * strength * (0.229, 0.224, 0.225)[channel]
    return np.clip(colour, 0.0, 1.0)


def _paint(colour: np.ndarray, variation: np.ndarray) -> np.ndarray:
    return colour[None, None, :] + variation[..., None]


def _brick(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    mortar = ((yy % 8) < 2) | (((xx + 8 * ((yy // 8) % 2)) % 16) < 2)
    return _paint(_axis_colour(0, +1), np.where(mortar, 0.12, -0.02))


def _water(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    phase = rng.uniform(0, 2 * np.pi)
    return _paint(_axis_colour(0, -1), 0.08 * np.sin(xx / 3.0 + yy / 5.0 + phase))


def _grass(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    return _paint(_axis_colour(1, +1), rng.normal(0, 0.07, yy.shape))


def _heather(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    return _paint(_axis_colour(1, -1), np.where(rng.random(yy.shape) < 0.1, 0.15, 0.0))


def _sky(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    return _paint(_axis_colour(2, +1), 0.08 * yy / max(float(yy.max()), 1.0) - 0.04)


def _sand(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    return _paint(_axis_colour(2, -1), np.where(((yy // 3) + (xx // 3)) % 2 == 0, 0.06, -0.03))


@dataclass(frozen=True)
class SceneClass:
    name: str
    texture: Texture


SCENE_CLASSES: tuple[SceneClass, ...] = (
    SceneClass("brick", _brick),
    SceneClass("water", _water),
    SceneClass("grass", _grass),
    SceneClass("heather", _heather),
    SceneClass("sky", _sky),
    SceneClass("sand", _sand),
)


def make_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    num_classes: int = len(SCENE_CLASSES),
    classes: tuple[SceneClass, ...] = SCENE_CLASSES,
    regions: tuple[int, int] = (3, 6),
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: an RGB ``uint8 [H, W, 3]`` image and its ``uint8 [H, W]`` label map.

    Regions are the cells of a Voronoi diagram of ``regions`` (3 to 6 by default) random sites
    (with wavy borders), each painted with one class's texture.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    num_sites = int(rng.integers(regions[0], regions[1] + 1))
    sites = rng.uniform([0, 0], [height, width], size=(num_sites, 2))
    site_class = rng.integers(0, num_classes, size=num_sites)
    wobble_y = yy + 6 * np.sin(xx / rng.uniform(6, 14))
    wobble_x = xx + 6 * np.sin(yy / rng.uniform(6, 14))
    distance = (wobble_y[None] - sites[:, 0, None, None]) ** 2 + (wobble_x[None] - sites[:, 1, None, None]) ** 2
    label = site_class[distance.argmin(axis=0)].astype(np.uint8)

    image = np.zeros((height, width, 3))
    for index in np.unique(label):
        painted = classes[index].texture(rng, yy, xx)
        image[label == index] = painted[label == index]
    image += rng.normal(0, 0.02, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), label


def write_scenes(
    root: Path,
    num_train: int = 96,
    num_val: int = 32,
    seed: int = 0,
    size_range: tuple[int, int] = (128, 176),
    num_classes: int = len(SCENE_CLASSES),
    family: SceneFamily | None = None,
) -> Path:
    """Write scenes as ``root/images/{train,val}/scene_NNNN.png`` with labels under
    ``root/labels/...`` and the class names in ``root/classes.txt``. Returns ``root``.

    A ``family`` sets the classes, image sizes and regions per image instead."""
    rng = np.random.default_rng(seed)
    classes, regions = SCENE_CLASSES, (3, 6)
    if family is not None:
        classes, regions, size_range = family.classes, family.regions, family.size_range
        num_classes = len(classes)
    for split, count in (("train", num_train), ("val", num_val)):
        for index in range(count):
            height, width = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
            image, label = make_scene(rng, height, width, num_classes, classes, regions)
            name = f"scene_{index:04d}.png"
            _save_png(Image.fromarray(image, "RGB"), root / "images" / split / name)
            _save_png(Image.fromarray(label, "L"), root / "labels" / split / name)
    names = "\n".join(scene_class.name for scene_class in classes[:num_classes]) + "\n"
    write_atomically(root / "classes.txt", lambda target: target.write_text(names))
    return root


# ----------------------------------------------------------------------------- families


def _pattern(name: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A brightness variation ``[H, W]`` that gives a class its texture."""
    if name == "noise":
        return rng.normal(0, 0.07, yy.shape)
    if name == "stripes":
        return np.where((yy % 6) < 3, 0.10, -0.05)
    if name == "diagonal":
        return np.where(((xx + yy) % 8) < 4, 0.10, -0.05)
    if name == "checker":
        return np.where(((yy // 4) + (xx // 4)) % 2 == 0, 0.08, -0.04)
    if name == "dots":
        return np.where(rng.random(yy.shape) < 0.1, 0.15, 0.0)
    if name == "waves":
        return 0.08 * np.sin(xx / 3.0 + yy / 5.0 + rng.uniform(0, 2 * np.pi))
    if name == "gradient":
        return 0.08 * yy / max(float(yy.max()), 1.0) - 0.04
    raise ValueError(f"unknown pattern '{name}'")


def textured_class(name: str, colour: np.ndarray, pattern: str) -> SceneClass:
    def texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        return _paint(colour, _pattern(pattern, rng, yy, xx))

    return SceneClass(name, texture)


def _mixed_colour(first: int, second: int, sign: float) -> np.ndarray:
    """A colour off two channels' axes (between the six axis colours)."""
    return np.clip((_axis_colour(first, sign) + _axis_colour(second, sign)) / 2, 0.0, 1.0)


@dataclass(frozen=True)
class SceneFamily:
    name: str
    classes: tuple[SceneClass, ...]
    size_range: tuple[int, int]
    regions: tuple[int, int]  # regions per image, at least and at most
    about: str


_AXES = [(channel, sign) for channel in range(3) for sign in (+1.0, -1.0)]
_CHANNEL_NAMES = ("red", "green", "blue")


def _axis_name(channel: int, sign: float) -> str:
    return ("more-" if sign > 0 else "less-") + _CHANNEL_NAMES[channel]


# Channel pairs and signs of the mixed colours, in the order families take them.
_MIXED_PAIRS = ((0, 1, +1.0), (1, 2, +1.0), (0, 2, +1.0), (0, 1, -1.0), (1, 2, -1.0), (0, 2, -1.0))


def _in_textures(colours: list[tuple[str, np.ndarray]], patterns: tuple[str, ...]) -> tuple[SceneClass, ...]:
    """Every named colour in every pattern: classes that colour alone cannot tell apart."""
    return tuple(
        textured_class(f"{name}-{pattern}", colour, pattern) for name, colour in colours for pattern in patterns
    )


def _axis_colours(strength: float = 2.0, prefix: str = "") -> list[tuple[str, np.ndarray]]:
    return [(prefix + _axis_name(channel, sign), _axis_colour(channel, sign, strength)) for channel, sign in _AXES]


def _mixed_colours(count: int) -> list[tuple[str, np.ndarray]]:
    return [(f"mixed-{index}", _mixed_colour(*pair)) for index, pair in enumerate(_MIXED_PAIRS[:count])]


FAMILIES: dict[str, SceneFamily] = {
    family.name: family
    for family in (
        SceneFamily(
            "three-large",
            (SCENE_CLASSES[0], SCENE_CLASSES[2], SCENE_CLASSES[4]),
            (160, 224),
            (2, 3),
            "3 classes, 2-3 large regions, 160-224 px",
        ),
        SceneFamily("six-small", SCENE_CLASSES, (128, 160), (8, 14), "6 classes, 8-14 small regions, 128-160 px"),
        SceneFamily(
            "twelve-overlap",
            _in_textures(_axis_colours(), ("noise", "stripes")),
            (128, 176),
            (3, 6),
            "12 classes: 6 colours, each in two textures",
        ),
        SceneFamily(
            "pastel-six",
            tuple(
                textured_class(f"pastel-{_axis_name(channel, sign)}", _axis_colour(channel, sign, 0.8), pattern)
                for (channel, sign), pattern in zip(
                    _AXES, ("checker", "waves", "dots", "noise", "gradient", "diagonal"), strict=True
                )
            ),
            (128, 176),
            (3, 6),
            "6 classes of low-contrast colours (0.8 standard deviations off the mean)",
        ),
        SceneFamily("big-images", SCENE_CLASSES, (256, 320), (3, 6), "6 classes, 256-320 px images"),
        # Families for choosing defaults only, never for reporting them.
        SceneFamily(
            "tune-five",
            tuple(
                textured_class(f"mixed-{index}", _mixed_colour(first, second, sign), pattern)
                for index, ((first, second, sign), pattern) in enumerate(
                    zip(
                        ((0, 1, +1.0), (1, 2, +1.0), (0, 2, -1.0), (0, 1, -1.0), (0, 2, +1.0)),
                        ("noise", "waves", "checker", "dots", "stripes"),
                        strict=True,
                    )
                )
            ),
            (112, 160),
            (5, 10),
            "tuning only: 5 classes of mixed colours, smaller regions",
        ),
        SceneFamily(
            "tune-seven",
            (
                *(
                    textured_class(f"soft-{_axis_name(channel, sign)}", _axis_colour(channel, sign, 1.2), pattern)
                    for (channel, sign), pattern in zip(
                        _AXES, ("waves", "noise", "checker", "dots", "diagonal", "gradient"), strict=True
                    )
                ),
                textured_class("mixed", _mixed_colour(1, 2, -1.0), "stripes"),
            ),
            (144, 192),
            (3, 6),
            "tuning only: 7 classes, colours 1.2 standard deviations off the mean",
        ),
        SceneFamily(
            "tune-overlap",
            _in_textures(_mixed_colours(5), ("checker", "dots")),
            (128, 176),
            (3, 6),
            "tuning only: 10 classes, 5 mixed colours each in two textures",
        ),
        SceneFamily(
            "tune-twelve",
            _in_textures(_mixed_colours(6), ("noise", "diagonal")),
            (128, 176),
            (3, 6),
            "tuning only: 12 classes, 6 mixed colours each in a noise and a diagonal texture",
        ),
        SceneFamily(
            "tune-axis",
            _in_textures(_axis_colours(1.5, prefix="soft-"), ("noise", "diagonal")),
            (128, 176),
            (3, 6),
            "tuning only: 12 classes, 6 colours 1.5 standard deviations off the mean, each in two textures",
        ),
    )
}
REPORTED_FAMILIES = ("three-large", "six-small", "twelve-overlap", "pastel-six", "big-images")
TUNING_FAMILIES = ("tune-five", "tune-seven", "tune-overlap", "tune-twelve", "tune-axis")


def _save_png(image: Image.Image, path: Path) -> None:
    write_atomically(path, lambda target: image.save(target, format="PNG"))
