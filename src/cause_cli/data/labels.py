"""Class names, palettes and the label maps of the paper's datasets.

A :class:`LabelMap` turns the ids stored in a dataset's label files into class indices
``0..C-1``, ``-1`` for pixels to ignore. Ids that the map does not know (a corrupt file, a
label of another dataset) are ignored too, and :meth:`LabelMap.apply` says which they were.

COCO-Stuff label files hold ids 0-181 (0-90 things, 91-181 stuff; eleven thing ids are
never used) and 255 for unlabelled pixels:

- ``cocostuff27``: the 27 supercategories of STEGO's fine-to-coarse map (12 thing groups,
  then 15 stuff groups);
- ``cocostuff81``: the 80 used thing classes as 1..80, every stuff class as 0 (``stuff``);
- ``cocostuff171``: the 80 used thing classes as 0..79, the 91 stuff classes as 80..170.

Cityscapes ``*_gtFine_labelIds.png``: ids 7..33 are the 27 classes 0..26, ids 0..6 (void)
and 255 are ignored. Pascal VOC: 0 background, 1..20 the classes, 255 the ignored boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE = -1
OUTSIDE = -2  # in a lookup table: an id the map does not know
IGNORE_ID = 255  # the id every one of these datasets uses for "no label"

# COCO-Stuff ids 0..181, in the order of the stuffthingmaps label files.
COCO_STUFF_NAMES: tuple[str, ...] = (
    # things, 0..90
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "hat", "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket",
    "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk", "toilet", "door",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "blender",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "hair brush",
    # stuff, 91..181
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard",
    "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard",
    "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone",
    "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass",
    "gravel", "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic",
    "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad",
    "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick",
    "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip
FIRST_STUFF_ID = 91
# Thing ids that COCO defined but never annotated.
UNUSED_THING_IDS = frozenset({11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90})

# The 27 coarse classes: 12 thing supercategories (by ranges of thing ids), then 15 stuff ones.
# Two names occur among both things and stuff (food, furniture); they get a suffix so that
# every class name is unique.
_COARSE_THINGS: tuple[tuple[str, int, int], ...] = (
    ("electronic", 71, 76),
    ("appliance", 77, 82),
    ("food-things", 51, 60),
    ("furniture-things", 61, 70),
    ("indoor", 83, 90),
    ("kitchen", 43, 50),
    ("accessory", 25, 32),
    ("animal", 15, 24),
    ("outdoor", 9, 14),
    ("person", 0, 0),
    ("sports", 33, 42),
    ("vehicle", 1, 8),
)
_COARSE_STUFF: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ceiling", ("ceiling-other", "ceiling-tile")),
    ("floor", ("carpet", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood")),
    ("food-stuff", ("food-other", "fruit", "salad", "vegetable")),
    (
        "furniture-stuff",
        ("cabinet", "counter", "cupboard", "desk-stuff", "door-stuff", "furniture-other", "light",
         "mirror-stuff", "shelf", "stairs", "table"),
    ),
    ("rawmaterial", ("cardboard", "metal", "paper", "plastic")),
    (
        "textile",
        ("banner", "blanket", "cloth", "clothes", "curtain", "mat", "napkin", "pillow", "rug",
         "textile-other", "towel"),
    ),
    ("wall", ("wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood")),
    ("window", ("window-blind", "window-other")),
    ("building", ("bridge", "building-other", "house", "roof", "skyscraper", "tent")),
    (
        "ground",
        ("dirt", "gravel", "ground-other", "mud", "pavement", "platform", "playingfield", "railroad", "road",
         "sand", "snow"),
    ),
    ("plant", ("branch", "bush", "flower", "grass", "leaves", "moss", "plant-other", "straw", "tree")),
    ("sky", ("clouds", "sky-other")),
    ("solid", ("hill", "mountain", "rock", "solid-other", "stone", "wood")),
    ("structural", ("cage", "fence", "net", "railing", "structural-other")),
    ("water", ("fog", "river", "sea", "water-other", "waterdrops")),
)  # fmt: skip

CITYSCAPES_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge",
    "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky",
    "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)  # fmt: skip
CITYSCAPES_FIRST_ID = 7  # label id of "road"; ids below it are void
# The official Cityscapes colours of label ids 7..33.
CITYSCAPES_COLOURS: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70), (102, 102, 156),
    (190, 153, 153), (180, 165, 180), (150, 100, 100), (150, 120, 90), (153, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100),
    (0, 0, 230), (119, 11, 32),
)  # fmt: skip

VOC_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def bit_palette(num_colours: int = 256) -> np.ndarray:
    """The Pascal VOC colour map, ``uint8 [N, 3]``: the bits of the index spread over R, G, B."""
    index = np.arange(num_colours)
    colours = np.zeros((num_colours, 3), dtype=np.int64)
    for shift in range(7, -1, -1):
        for channel in range(3):
            colours[:, channel] |= ((index >> channel) & 1) << shift
        index = index >> 3
    return colours.astype(np.uint8)


@dataclass(frozen=True)
class LabelMap:
    """From stored label ids to class indices, with the classes' names and colours."""

    name: str
    class_names: tuple[str, ...]
    table: np.ndarray = field(repr=False)  # int64 [256]: class index, IGNORE or OUTSIDE per stored id
    palette: np.ndarray = field(repr=False)  # uint8 [C, 3]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __call__(self, stored_id: int) -> int:
        """The class index of one stored id (``-1``: ignored or unknown)."""
        value = int(self.table[stored_id]) if 0 <= stored_id < len(self.table) else OUTSIDE
        return IGNORE if value == OUTSIDE else value

    def unknown_ids(self, stored: np.ndarray) -> list[int]:
        """The ids in ``stored`` that the map does not know, sorted."""
        stored = np.asarray(stored)
        if stored.dtype == np.uint8:  # counting is much faster than sorting
            values = np.flatnonzero(np.bincount(stored.ravel(), minlength=256))
        else:
            values = np.unique(stored)
        return [int(v) for v in values if not 0 <= v < len(self.table) or self.table[int(v)] == OUTSIDE]

    def apply(self, stored: np.ndarray) -> np.ndarray:
        """``int64`` class indices of a stored label array; unknown ids become ``-1``."""
        stored = np.asarray(stored).astype(np.int64, copy=False)
        inside = (stored >= 0) & (stored < len(self.table))
        mapped = np.full(stored.shape, IGNORE, dtype=np.int64)
        mapped[inside] = self.table[stored[inside]]
        mapped[mapped == OUTSIDE] = IGNORE
        return mapped


def _table(pairs: dict[int, int]) -> np.ndarray:
    table = np.full(256, OUTSIDE, dtype=np.int64)
    table[IGNORE_ID] = IGNORE
    for stored, index in pairs.items():
        table[stored] = index
    return table


def _coco_used_things() -> list[int]:
    return [i for i in range(FIRST_STUFF_ID) if i not in UNUSED_THING_IDS]


def _coco27() -> LabelMap:
    pairs: dict[int, int] = {}
    names = [name for name, _, _ in _COARSE_THINGS] + [name for name, _ in _COARSE_STUFF]
    for index, (_, first, last) in enumerate(_COARSE_THINGS):
        pairs.update({fine: index for fine in range(first, last + 1)})
    fine_ids = {name: i for i, name in enumerate(COCO_STUFF_NAMES)}
    for offset, (_, members) in enumerate(_COARSE_STUFF):
        pairs.update({fine_ids[member]: len(_COARSE_THINGS) + offset for member in members})
    return LabelMap("cocostuff27", tuple(names), _table(pairs), bit_palette(len(names)))


def _coco81() -> LabelMap:
    things = _coco_used_things()
    pairs = {fine: index + 1 for index, fine in enumerate(things)}
    pairs.update({fine: 0 for fine in range(FIRST_STUFF_ID, len(COCO_STUFF_NAMES))})
    names = ("stuff", *(COCO_STUFF_NAMES[i] for i in things))
    return LabelMap("cocostuff81", names, _table(pairs), bit_palette(len(names)))


def _coco171() -> LabelMap:
    kept = _coco_used_things() + list(range(FIRST_STUFF_ID, len(COCO_STUFF_NAMES)))
    pairs = {fine: index for index, fine in enumerate(kept)}
    names = tuple(COCO_STUFF_NAMES[i] for i in kept)
    return LabelMap("cocostuff171", names, _table(pairs), bit_palette(len(names)))


def _cityscapes() -> LabelMap:
    pairs = {CITYSCAPES_FIRST_ID + index: index for index in range(len(CITYSCAPES_NAMES))}
    pairs.update({void: IGNORE for void in range(CITYSCAPES_FIRST_ID)})
    palette = np.array(CITYSCAPES_COLOURS, dtype=np.uint8)
    return LabelMap("cityscapes", CITYSCAPES_NAMES, _table(pairs), palette)


def _voc() -> LabelMap:
    pairs = {index: index for index in range(len(VOC_NAMES))}
    return LabelMap("voc2012", VOC_NAMES, _table(pairs), bit_palette(len(VOC_NAMES)))


LABEL_MAPS: dict[str, LabelMap] = {
    label_map.name: label_map for label_map in (_coco27(), _coco81(), _coco171(), _cityscapes(), _voc())
}
