"""cause segment at scale: peak memory against the number of inputs, and images/s against the
backbone's own forward pass, measured side by side in one run.

    python benchmarks/segment_scale.py                   # toy backbone, 200 and 2,000 images
    python benchmarks/segment_scale.py --images 200 20000
    python benchmarks/segment_scale.py --backbone dino-vits8 --resolution 224 --images 160
                                         # a ViT-S/8 (random weights) where the model is the cost

Memory: each segmentation runs in a fresh process (``python -m cause_cli segment``, no CRF);
its peak resident memory is the kernel's high-water mark (``ru_maxrss`` of that child alone).
Speed: the limit is the backbone's forward pass on batches of normalised images at the run's
resolution (what segment cannot go faster than); segment's rate is images written per second
over the whole command, decoding, the head, the label maps and PNG writing included, from
its own summary (model loading left out).
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


def segment_in_child(source: Path, run: Path, out: Path, batch_size: int) -> tuple[float, dict]:
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
         "--batch-size", str(batch_size), "-q"],
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backbone", default="toy", help="toy, or a registry name given random weights")
    parser.add_argument("--resolution", type=int, default=64, help="the run's resolution, and the images' size")
    parser.add_argument("--rounds", type=int, default=3, help="segment-then-backbone speed rounds")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        run = train_run(root, options.backbone, options.resolution)
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
        # This machine's speed drifts by tens of percent over minutes, so the two rates are
        # taken in alternation, each segment run next to a backbone run, and compared per round.
        count = min(options.images)
        source = root / f"images{count}"
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
