"""The ONNX export of a run with a ViT-S/8-shaped backbone (random weights) against the toolkit
on the shared real photos: agreement of the label maps, the file's size, and CPU time per image
of ONNX Runtime beside the toolkit's, in one run.

    python benchmarks/export_check.py                  # dino-vits8 architecture at 224
    python benchmarks/export_check.py --resolution 320
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from segment_scale import train_run

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="dino-vits8")
    parser.add_argument("--resolution", type=int, default=224)
    options = parser.parse_args()
    import onnxruntime

    from cause_cli.data.transforms import normalise, resize_and_crop
    from cause_cli.inference.export import export_run
    from cause_cli.inference.predict import cluster_labels, image_features, load_trained
    from cause_cli.runs import open_run

    photos = sorted((SHARED / "voc2012" / "images").glob("*.png")) + sorted(
        SHARED.glob("cityscapes/leftImg8bit/**/*.png")
    )
    if not photos:
        raise SystemExit(f"no photos under {SHARED}")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        run = train_run(root, options.backbone, options.resolution)
        description = export_run(run, root / "model.onnx")
        model = load_trained(open_run(run), torch.device("cpu"))
        size = model.resolution
        squares = [resize_and_crop(Image.open(path).convert("RGB"), size, square_resize=True) for path in photos]
        session = onnxruntime.InferenceSession(str(root / "model.onnx"), providers=["CPUExecutionProvider"])
        agree = total = 0
        toolkit_seconds = onnx_seconds = 0.0
        for square in squares:  # one image at a time, as a service would
            batch = normalise(square)[None]
            started = time.perf_counter()
            exported = session.run(["labels"], {"images": batch.numpy()})[0][0]
            onnx_seconds += time.perf_counter() - started
            started = time.perf_counter()
            with torch.no_grad():
                ((features, size),) = list(image_features(model, [square]))
                toolkit = cluster_labels(model, features, size)[0].numpy()
            toolkit_seconds += time.perf_counter() - started
            agree += int((exported == toolkit).sum())
            total += toolkit.size
        print(f"backbone {options.backbone} (random weights) at {size} px, {len(photos)} shared real photos")
        print(f"pixels agreeing: {agree / total:.5%} ({total - agree} of {total} differ)")
        print(f"ONNX file: {description['bytes'] / 2**20:.1f} MiB")
        print(f"CPU time per image: onnxruntime {onnx_seconds / len(photos):.3f} s, "
              f"toolkit {toolkit_seconds / len(photos):.3f} s, ratio {toolkit_seconds / onnx_seconds:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
