"""cause segment at scale: peak memory against the number of inputs, images/s against the
backbone's own forward pass, and images/s against the I/O floor, each measured side by side
in one run.

    python benchmarks/segment_scale.py                   # all three parts, toy backbone
    python benchmarks/segment_scale.py --parts floor     # 400 photos, 320 x 240 JPEG
    python benchmarks/segment_scale.py --parts memory --images 200 20000
    python benchmarks/segment_scale.py --parts speed --backbone dino-vits8 --resolution 224 --images 160
                                         # a ViT-S/8 (random weights) where the model is the cost

Memory: each segmentation runs in a fresh process (``python -m cause_cli segment``, no CRF);
its peak resident memory is the kernel's high-water mark (``ru_maxrss`` of that child alone).
Speed: the limit is the backbone's forward pass on batches of normalised images at the run's
resolution (what segment cannot go faster than); segment's rate is images written per second
over the whole command, decoding, the head, the label maps and PNG writing included, from
its own summary (model loading left out).

The I/O floor: what segment cannot go faster than whatever the model's speed. The same photos
(320 x 240 JPEGs cut from the real photographs in ``../shared/data/real``) are decoded, resized
to the model's input, and given a label map and an overlay, both encoded as segment encodes
them (its own functions) and written, with no model, in as many processes as the machine
has CPUs. Segment runs with its defaults (labels and overlays), then with ``--save labels``,
each beside a floor of the same outputs; rounds alternate, and the median ratio is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_images(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    block = max(1, size // 6)
    for index in range(count):
        pixels = np.repeat(np.repeat(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8), block, 0), block, 1)
        Image.fromarray(pixels).save(folder / f"image_{index:06d}.png")
    return folder


def train_run(root: Path, backbone: str, resolution: int) -> Path:
    """A small run; a backbone other than the toy gets random weights in a cache of its own
    (these machines cannot download, and the speed does not depend on the weights)."""
    from cause_cli.data.synthetic import write_scenes

    if backbone != "toy":
        from safetensors.torch import save_file

        from cause_cli.backbones import build_model, file_sha256, resolve_spec, weights_path
        from cause_cli.paths import write_json

        os.environ["CAUSE_HOME"] = str(root / "cache")
        spec = resolve_spec(backbone)
        torch.manual_seed(0)
        path = weights_path(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({key: value.contiguous() for key, value in build_model(spec).state_dict().items()}, str(path))
        write_json(path.with_name("backbone.json"), {"name": spec.name, "sha256": file_sha256(path)})
    scenes = write_scenes(root / "scenes", num_train=8, num_val=2, seed=0, size_range=(resolution, resolution + 8))
    run = root / "run"
    subprocess.run([sys.executable, "-m", "cause_cli", "train", "--data-dir", str(scenes), "--run", str(run),
                    "--backbone", backbone, "--resolution", str(resolution), "--clusterbook-size", "16",
                    "--batch-size", "4", "--epochs-front-door", "1", "--min-updates", "0", "--device", "cpu", "-q"],
                   check=True)  # fmt: skip
    return run


def segment_in_child(
    source: Path, run: Path, out: Path, batch_size: int, extra: list[str] | None = None
) -> tuple[float, dict]:
    """Peak RSS (MiB) of a child process that segments ``source``, and its summary."""
    code = (
        "import resource, sys\n"
        "from cause_cli.cli import run\n"
        "sys.argv = ['cause', 'segment', *sys.argv[1:]]\n"
        "try:\n    run()\nexcept SystemExit:\n    pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )
    finished = subprocess.run(
        [sys.executable, "-c", code, str(source), "--run", str(run), "--out", str(out), "--device", "cpu",
         "--batch-size", str(batch_size), "-q", *(extra or [])],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    peak_kib = int(finished.stderr.strip().splitlines()[-1])
    return peak_kib / 1024, json.loads((out / "summary.json").read_text())


def backbone_images_per_second(run: Path, batch_size: int, images: int) -> float:
    from cause_cli.inference.predict import load_trained
    from cause_cli.runs import open_run

    model = load_trained(open_run(run), torch.device("cpu"))
    batch = torch.randn(batch_size, 3, model.resolution, model.resolution)
    with torch.no_grad():
        model.backbone(batch)  # warm up
        started = time.perf_counter()
        done = 0
        while done < images:
            model.backbone(batch)
            done += batch_size
    return done / (time.perf_counter() - started)


REAL_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


def write_photos(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` 320 x 240 JPEGs (quality 90) cut at random from the shared real photographs:
    photo-like content, which encodes as photos do (blocks of colour compress far better)."""
    rng = np.random.default_rng(seed)
    found = sorted(REAL_PHOTOS.glob("voc2012/images/*.png")) + sorted(
        REAL_PHOTOS.glob("cityscapes/leftImg8bit/**/*.png")
    )
    if not found:
        raise SystemExit(f"no photographs in {REAL_PHOTOS}: the floor needs ../shared beside the repository")
    photos = [Image.open(path).convert("RGB") for path in found]
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        photo = photos[index % len(photos)]
        width = int(photo.width * rng.uniform(0.5, 1.0))
        height = min(photo.height, int(width * 0.75))
        left, top = rng.integers(0, photo.width - width + 1), rng.integers(0, photo.height - height + 1)
        crop = photo.crop((left, top, left + width, top + height)).resize((320, 240), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.save(folder / f"photo_{index:05d}.jpg", quality=90)
    return folder


def floor_share(job: tuple[list[Path], Path, int, tuple[str, ...]]) -> int:
    """One process's share of the floor: decode, resize for a model, a label map (the image's
    grey levels on a grid of tokens, as blobby as a segmentation's), encode and write."""
    from cause_cli.data.base import read_image
    from cause_cli.data.transforms import resize_and_crop
    from cause_cli.inference.figures import palette
    from cause_cli.inference.outputs import label_image, overlay_image

    paths, out, resolution, save = job
    colours = palette()
    flat = colours.reshape(-1).tolist()
    for path in paths:
        image = read_image(path, upright=True)
        resize_and_crop(image, resolution, square_resize=True)
        grid = image.convert("L").resize((max(1, image.width // 8), max(1, image.height // 8)))
        ids = Image.fromarray(np.asarray(grid) // 10).resize(image.size, Image.Resampling.NEAREST)
        label = label_image(np.asarray(ids), image.size, 27, flat)
        for kind in save:
            picture = label if kind == "labels" else overlay_image(image, label, colours, in_place=True)
            target = out / kind / path.with_suffix(".png").name
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.tmp")
            picture.save(temporary, format="PNG")
            os.replace(temporary, target)
    return len(paths)


def floor_images_per_second(
    paths: list[Path], out: Path, resolution: int, save: tuple[str, ...], processes: int | None = None
) -> float:
    """Images/s of the I/O floor over ``paths`` in ``processes`` (default: one per CPU)."""
    import multiprocessing

    from cause_cli.devices import available_cpus

    processes = processes or available_cpus()
    jobs = [(paths[share::processes], out, resolution, save) for share in range(processes)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(abs, range(processes))  # the processes are up before the clock starts
        started = time.perf_counter()
        done = sum(pool.map(floor_share, jobs))
        return done / (time.perf_counter() - started)


def floor_part(root: Path, options: argparse.Namespace) -> None:
    from cause_cli.devices import available_cpus

    processes = available_cpus()
    source = write_photos(root / "photos", options.photos)
    run = train_run(root / "floor-run", "toy", options.floor_resolution)
    print(f"{options.photos} photos, 320 x 240 JPEG; toy run at {options.floor_resolution} px; "
          f"floor in {processes} processes")  # fmt: skip
    for save in (("labels", "overlays"), ("labels",)):
        ratios = []
        for round_index in range(options.rounds):
            out = root / f"floor-{'-'.join(save)}-{round_index}"
            extra = ["--save", ",".join(save)]
            _, summary = segment_in_child(source, run, out / "segment", options.batch_size, extra)
            rate = summary["written_now"] / summary["seconds"]
            photos = sorted(source.glob("*.jpg"))
            floor = floor_images_per_second(photos, out / "floor", options.floor_resolution, save, processes)
            ratios.append(rate / floor)
            print(f"--save {','.join(save)} round {round_index + 1}: segment {rate:.1f} img/s, "
                  f"I/O floor {floor:.1f} img/s: {rate / floor:.3f}")  # fmt: skip
        print(
            f"--save {','.join(save)}: segment / I/O floor, median of {options.rounds}: {float(np.median(ratios)):.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backbone", default="toy", help="toy, or a registry name given random weights")
    parser.add_argument("--resolution", type=int, default=64, help="the run's resolution, and the images' size")
    parser.add_argument("--rounds", type=int, default=3, help="segment-then-limit speed rounds")
    parser.add_argument(
        "--parts", nargs="+", choices=["memory", "speed", "floor"], default=["memory", "speed", "floor"]
    )
    parser.add_argument("--photos", type=int, default=400, help="photos for the I/O floor")
    parser.add_argument("--floor-resolution", type=int, default=128, help="the floor's toy run (the toy's own size)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        if "floor" in options.parts:
            floor_part(root, options)
        if "memory" not in options.parts and "speed" not in options.parts:
            return
        run = train_run(root, options.backbone, options.resolution)
        if "memory" in options.parts:
            memory_part(root, run, options)
        if "speed" in options.parts:
            speed_part(root, run, options)


def memory_part(root: Path, run: Path, options: argparse.Namespace) -> None:
    print(f"{'inputs':>8} {'peak RSS MiB':>13} {'segment img/s':>14}")
    peaks = {}
    for count in options.images:
        source = write_images(root / f"images{count}", count, options.resolution)
        peak, summary = segment_in_child(source, run, root / f"out{count}", options.batch_size)
        peaks[count] = peak
        print(f"{count:>8} {peak:>13.1f} {summary['written_now'] / summary['seconds']:>14.2f}")
    smallest, largest = min(peaks), max(peaks)
    if largest != smallest:
        print(f"peak RSS {largest} / {smallest} inputs: {peaks[largest] / peaks[smallest]:.3f}")


def speed_part(root: Path, run: Path, options: argparse.Namespace) -> None:
    # This machine's speed drifts by tens of percent over minutes, so the two rates are
    # taken in alternation, each segment run next to a backbone run, and compared per round.
    count = min(options.images)
    source = write_images(root / f"speed-images{count}", count, options.resolution)
    ratios = []
    for round_index in range(options.rounds):
        _, summary = segment_in_child(source, run, root / f"speed{round_index}", options.batch_size)
        rate = summary["written_now"] / summary["seconds"]
        limit = backbone_images_per_second(run, options.batch_size, count)
        ratios.append(rate / limit)
        print(f"round {round_index + 1}: segment {rate:.2f} img/s, backbone forward alone {limit:.2f} img/s "
              f"(batch {options.batch_size}, {count} images): {rate / limit:.3f}")  # fmt: skip
    print(f"segment / backbone, median of {options.rounds} rounds: {float(np.median(ratios)):.3f}")


if __name__ == "__main__":
    main()
