"""A user's own photos on the machine in front of them: ``cause train`` with its defaults on a
small album, against one forward pass of the same backbone over every photo of the album.

    python benchmarks/own_photos.py                         # ViT-S/8 (random weights), MLP head
    python benchmarks/own_photos.py --head tr
    python benchmarks/own_photos.py --album ~/Pictures/holiday --train-arg=--cache-features=off

The album defaults to the real photos in ``../shared/data/real`` (ten Pascal VOC photos and a
Cityscapes frame) with a mirrored copy and a three-quarter crop of each VOC photo, saved as
JPEG: 31 real photos at their own sizes. The backbone is ``dino-vits8`` with random weights,
converted through ``cause fetch --from-file`` as a user would (no weights can be downloaded on
the machines this runs on; the time of a forward pass does not depend on the weights).

Printed: the forward pass over the whole album at the run's resolution (batches of 16, as
training reads them; decoding left out), the training's wall time as a child process, its
ratio to the forward pass, and the time of each step from the run's train.log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

SHARED_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
RANDOM_CHECKPOINT_ARCHITECTURE = {"dino-vits8": "vit_small_patch8_224", "dino-vits16": "vit_small_patch16_224"}


def default_album(folder: Path) -> Path:
    """31 real photos: the shared VOC photos, each also mirrored and cropped to three quarters,
    and the shared Cityscapes frame."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    voc = sorted((SHARED_PHOTOS / "voc2012" / "images").glob("*.png"))
    city = sorted((SHARED_PHOTOS / "cityscapes" / "leftImg8bit").rglob("*.png"))
    if not voc:
        raise SystemExit(f"No photos in {SHARED_PHOTOS}: give --album.")
    for path in voc:
        photo = Image.open(path).convert("RGB")
        width, height = photo.size
        crop = photo.crop((width // 8, height // 8, width - width // 8, height - height // 8))
        for name, picture in ((path.stem, photo), (f"{path.stem}_mirrored", ImageOps.mirror(photo)),
                              (f"{path.stem}_crop", crop)):  # fmt: skip
            picture.save(images / f"{name}.jpg", quality=90)
    for path in city:
        Image.open(path).convert("RGB").save(images / f"{path.stem}.jpg", quality=90)
    return folder


def install_random_backbone(name: str, home: Path) -> None:
    """``name`` with random weights in the cache at ``home``, through ``cause fetch --from-file``."""
    import timm
    from safetensors.torch import save_file

    checkpoint = home / f"random-{name}.safetensors"
    torch.manual_seed(0)
    model = timm.create_model(RANDOM_CHECKPOINT_ARCHITECTURE[name], pretrained=False, num_classes=0)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(checkpoint))
    subprocess.run([sys.executable, "-m", "cause_cli", "fetch", name, "--from-file", str(checkpoint), "-q"],
                   env={**os.environ, "CAUSE_HOME": str(home)}, check=True)  # fmt: skip


def album_photos(album: Path) -> list[Path]:
    suffixes = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
    return sorted(path for path in (album / "images").rglob("*") if path.suffix.lower() in suffixes)


def forward_seconds(name: str, home: Path, photos: list[Path], resolution: int, batch_size: int = 16) -> float:
    """Seconds of the backbone's forward passes over every photo at ``resolution``."""
    os.environ["CAUSE_HOME"] = str(home)
    from cause_cli.backbones import load_backbone
    from cause_cli.data.transforms import normalise_pixels
    from cause_cli.devices import autocast

    device = torch.device("cpu")
    backbone = load_backbone(name, device)
    pixels = []
    for path in photos:
        photo = Image.open(path).convert("RGB").resize((resolution, resolution), Image.Resampling.BILINEAR)
        pixels.append(torch.from_numpy(np.array(photo)).permute(2, 0, 1))
    batches = [torch.stack(pixels[start : start + batch_size]) for start in range(0, len(pixels), batch_size)]
    seconds = 0.0
    with torch.inference_mode():
        for batch in batches:
            images = normalise_pixels(batch, device)
            started = time.perf_counter()
            with autocast(device):
                backbone(images)
            seconds += time.perf_counter() - started
    return seconds


def step_times(log: Path) -> dict[str, float]:
    """Each step's seconds, as train.log says them ("step 2/3 front door: done in 81.2s")."""
    found = {}
    for line in log.read_text().splitlines():
        match = re.search(r"(step \d/3 [a-z ]+): done in ([0-9.]+)s", line)
        if match:
            found[match.group(1)] = float(match.group(2))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--album", type=Path, help="a folder with images/ (default: the shared real photos)")
    parser.add_argument("--backbone", default="dino-vits8", choices=sorted(RANDOM_CHECKPOINT_ARCHITECTURE))
    parser.add_argument("--head", default="mlp", choices=("mlp", "tr"))
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=320)
    parser.add_argument("--train-arg", action="append", default=[], help="one more option for cause train")
    parser.add_argument("--keep", type=Path, help="keep the run in this folder")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        home = root / "home"
        home.mkdir()
        album = options.album or default_album(root / "album")
        photos = album_photos(album)
        install_random_backbone(options.backbone, home)
        before = forward_seconds(options.backbone, home, photos, options.resolution)
        run = options.keep or root / "run"
        command = [sys.executable, "-m", "cause_cli", "train", "--data-dir", str(album), "--run", str(run),
                   "--backbone", options.backbone, "--num-classes", str(options.num_classes), "--head", options.head,
                   "--device", "cpu", "-q", *options.train_arg]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(command, env={**os.environ, "CAUSE_HOME": str(home)}, check=True)
        training = time.perf_counter() - started
        # This machine's speed drifts over minutes: the forward pass is timed on both sides of
        # the training, and the faster is the yardstick (the stricter ratio).
        after = forward_seconds(options.backbone, home, photos, options.resolution)
        forward = min(before, after)
        print(f"album: {len(photos)} photos; {options.backbone} forward over all at {options.resolution} px: "
              f"{before:.1f} s before the training, {after:.1f} s after "
              f"({forward / len(photos):.2f} s a photo)")  # fmt: skip
        settings = " ".join(["defaults", *options.train_arg])
        print(f"cause train ({options.head} head, {settings}): {training:.1f} s = {training / forward:.1f} x "
              "the forward pass")  # fmt: skip
        for step, seconds in step_times(run / "train.log").items():
            print(f"  {step}: {seconds:.1f} s ({seconds / forward:.1f} x)")
        schedule = json.loads((run / "run.json").read_text())["schedule"]
        print("  schedule: " + ", ".join(f"{step} {plan['updates']} updates" for step, plan in schedule.items()))
        for line in (run / "train.log").read_text().splitlines():
            if "feature cache" in line or "bank entries" in line or "estimate" in line:
                print("  log: " + line.split("] ", 1)[-1])


if __name__ == "__main__":
    main()
