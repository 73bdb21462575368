"""The gallery cause segment writes (OUT/index.html, index-2.html, ...): the first page's size
and the time writing the pages adds to a segmentation, for a folder of many inputs.

    python benchmarks/gallery_pages.py                  # 10,000 inputs
    python benchmarks/gallery_pages.py --inputs 100000

A toy run segments ``--inputs`` small images (64 px); then the gallery of the finished folder
is written again, timed alone (read from the manifest, pages made, written and recorded in the
folder's ledger), beside the segmentation's own seconds from its summary.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from segment_scale import segment_in_child, train_run, write_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=10_000)
    options = parser.parse_args()
    from cause_cli.inference.manifest import OutputFolder
    from cause_cli.inference.report import write_gallery

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        run = train_run(root, "toy", 64)
        source = write_images(root / "images", options.inputs, 64)
        out = root / "segments"
        _, summary = segment_in_child(source, run, out, batch_size=32)
        names = [f"cluster {index}" for index in range(32)]
        folder = OutputFolder(out)
        started = time.perf_counter()
        write_gallery(folder, summary["written"], names, os.path.relpath(source, out))
        seconds = time.perf_counter() - started
        pages = sorted(out.glob("index*.html"))
        first = (out / "index.html").stat().st_size
        print(f"{options.inputs:,} inputs: segment {summary['seconds']:.1f} s; the gallery's {len(pages)} pages "
              f"{seconds:.2f} s ({100 * seconds / summary['seconds']:.1f} % of the segmentation's time); "
              f"first page {first / 1024:.1f} KB")  # fmt: skip
        print(json.dumps({"pages": len(pages), "gallery_seconds": round(seconds, 3), "first_page_bytes": first}))


if __name__ == "__main__":
    main()
