"""cause segment on big photos: peak resident memory against the image's size.

    python benchmarks/segment_memory.py                       # 2000, 6000 and 12000 pixels square
    python benchmarks/segment_memory.py --sizes 4000 12000 --save labels,overlays,scores

A tiny run is trained in seconds with the toy backbone, then each image (a flat-colour PNG,
a few hundred bytes on disk: the cost is the decoded pixels, not the file) is segmented on
the CPU in a fresh process (``python -m cause_cli segment`` in a child, no CRF, no loader
workers); its peak is the kernel's high-water mark of that child alone (``ru_maxrss``). The
first row, a 64-pixel image, is the floor (Python, torch, the model); "B/px" is the peak
over the image's pixels, "B/px above floor" what the image adds. The outputs' SHA-256
(first 12 digits) are printed so that two versions of the toolkit can be compared byte for
byte.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from segment_scale import train_run

FLOOR_SIZE = 64


def write_flat_png(path: Path, size: int) -> Path:
    """A ``size`` x ``size`` PNG of one colour, as an aerial tile of sea or field might be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (40, 110, 70)).save(path)
    return path


def segment_in_child(image: Path, run: Path, out: Path, save: str) -> tuple[float, float]:
    """Peak RSS (MiB) of a fresh process that segments ``image``, and its wall time (s)."""
    code = (
        "import resource, sys\n"
        "from cause_cli.cli import run\n"
        "sys.argv = ['cause', 'segment', *sys.argv[1:]]\n"
        "try:\n    run()\nexcept SystemExit as stop:\n    code = stop.code\nelse:\n    code = 0\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    started = time.perf_counter()
    finished = subprocess.run(
        [sys.executable, "-c", code, str(image), "--run", str(run), "--out", str(out), "--device", "cpu",
         "--save", save, "--loader-workers", "0", "-q"],
        capture_output=True, text=True,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"segment failed on {image}:\n{finished.stdout}\n{finished.stderr}")
    return int(finished.stderr.strip().splitlines()[-1]) / 1024, seconds


def digests(out: Path) -> str:
    """The SHA-256 (12 digits) of every output file, by kind."""
    parts = []
    for kind in ("labels", "overlays", "scores"):
        for path in sorted((out / kind).glob("*")):
            parts.append(f"{kind[:-1]}={hashlib.sha256(path.read_bytes()).hexdigest()[:12]}")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 6000, 12000], help="square images' sides")
    parser.add_argument("--save", default="labels,overlays", help="segment's --save")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        run = train_run(root, "toy", 64)
        print(f"{'image':>13} {'Mpx':>7} {'peak MiB':>9} {'B/px':>7} {'B/px above floor':>17} {'seconds':>8}  outputs")
        floor = None
        for size in [FLOOR_SIZE, *options.sizes]:
            image = write_flat_png(root / f"in{size}" / f"flat{size}.png", size)
            out = root / f"out{size}"
            peak, seconds = segment_in_child(image, run, out, options.save)
            pixels = size * size
            floor = peak if floor is None else floor
            above = (peak - floor) * 2**20 / pixels if size != FLOOR_SIZE else float("nan")
            print(f"{f'{size}x{size}':>13} {pixels / 1e6:>7.1f} {peak:>9.1f} {peak * 2**20 / pixels:>7.1f} "
                  f"{above:>17.1f} {seconds:>8.1f}  {digests(out)}", flush=True)  # fmt: skip
            image.unlink()


if __name__ == "__main__":
    main()
