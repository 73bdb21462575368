"""cause segment at scale: peak memory against the number of inputs, and images/s against the
backbone's own forward pass, measured side by side in one run.

    python benchmarks/segment_scale.py                   # toy backbone, 200 and 2,000 images
    python benchmarks/segment_scale.py --images 200 20000

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZE = 96


def write_images(folder: Path, count: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pixels = np.repeat(np.repeat(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8), SIZE // 6, 0), SIZE // 6, 1)
        Image.fromarray(pixels).save(folder / f"image_{index:06d}.png")
    return folder


def train_toy_run(root: Path) -> Path:
    from cause_cli.data.synthetic import write_scenes

    scenes = write_scenes(root / "scenes", num_train=16, num_val=4, seed=0, size_range=(64, 72))
    run = root / "run"
    subprocess.run([sys.executable, "-m", "cause_cli", "train", "--data-dir", str(scenes), "--run", str(run),
                    "--resolution", "64", "--clusterbook-size", "16", "--epochs-front-door", "1", "--min-updates",
                    "0", "--device", "cpu", "-q"], check=True)  # fmt: skip
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
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        run = train_toy_run(root)
        print(f"{'inputs':>8} {'peak RSS MiB':>13} {'segment img/s':>14}")
        peaks = {}
        rates = []
        for count in options.images:
            source = write_images(root / f"images{count}", count)
            peak, summary = segment_in_child(source, run, root / f"out{count}", options.batch_size)
            rate = summary["written_now"] / summary["seconds"]
            peaks[count] = peak
            rates.append(rate)
            print(f"{count:>8} {peak:>13.1f} {rate:>14.1f}")
        smallest, largest = min(peaks), max(peaks)
        print(f"peak RSS {largest} / {smallest} inputs: {peaks[largest] / peaks[smallest]:.3f}")
        limit = backbone_images_per_second(run, options.batch_size, 400)
        print(f"backbone forward alone: {limit:.1f} img/s at batch {options.batch_size}; segment / backbone: "
              f"{max(rates) / limit:.2f} (best of the runs above)")  # fmt: skip


if __name__ == "__main__":
    main()
