"""Quality benchmark: does the default pipeline beat plain k-means on the user's own data?

For every scene family (data/synthetic.py: FAMILIES), seed and backbone it writes a folder of
synthetic scenes, runs ``cause train`` with no tuning flags (its default ``--cache-features
auto`` keeps the backbone's tokens, for speed) and ``cause eval --no-crf`` as a user would, and
reads from metrics.json the run's cluster mIoU beside its baselines (k-means on the backbone's
tokens and on the head's features, fitted on the training split without labels) and the linear
probe. It prints one line per family (the mean over seeds and their spread),
then the mean and the worst over families, and writes every figure to OUT/results.json.

Backbones: ``toy`` (the toolkit's own, width 96, 2 blocks) and ``vit-tiny``, a randomly
initialised timm ViT-Ti/16 (width 192, 12 blocks) converted with ``cause fetch --from-file``,
since no pretrained weights can be downloaded here.

    python benchmarks/quality.py                             # the reported families, seeds 0 1 2
    python benchmarks/quality.py --families tune-five tune-seven --seeds 100 101 --train-arg=--probe-refine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cause_cli.data.synthetic import FAMILIES, REPORTED_FAMILIES, write_scenes

RANDOM_VIT = "vit_tiny_patch16_224.augreg_in21k"
BACKBONES = {"toy": "toy", "vit-tiny": RANDOM_VIT}
COLUMNS = ("pipeline", "kmeans_tokens", "kmeans_head", "linear_probe")


def make_random_vit(home: Path) -> None:
    """A randomly initialised ViT-Ti/16 in the cache, through the user's own conversion path."""
    import timm
    import torch
    from safetensors.torch import save_file

    target = home / "random-vit-tiny.safetensors"
    if not target.exists():
        torch.manual_seed(0)
        model = timm.create_model(RANDOM_VIT.split(".")[0], pretrained=False, num_classes=0)
        save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(target))
    cause(["fetch", RANDOM_VIT, "--from-file", str(target)], home)


def cause(arguments: list[str], home: Path, threads: int | None = None) -> str:
    environment = {**os.environ, "CAUSE_HOME": str(home)}
    if threads is not None:
        environment.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    done = subprocess.run(
        [sys.executable, "-m", "cause_cli", *arguments], env=environment, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"cause {' '.join(arguments)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def one_case(
    out: Path, home: Path, backbone: str, family: str, seed: int, args: argparse.Namespace, threads: int
) -> dict[str, Any]:
    data = out / "data" / f"{family}-{seed}"
    if not (data / "classes.txt").exists():
        write_scenes(data, args.train_images, args.val_images, seed=seed, family=FAMILIES[family])
    run = out / "runs" / f"{backbone}-{family}-{seed}" / ("-".join(args.train_arg) or "default")
    started = time.perf_counter()
    if not (run / "probe.safetensors").exists():
        train = ["train", "--data-dir", str(data), "--backbone", BACKBONES[backbone], "--run", str(run)]
        # The default feature cache changes only the speed (tokens kept in float16), not what is learnt.
        cause([*train, "--device", "cpu", "--quiet", *args.train_arg], home, threads)
    seconds = time.perf_counter() - started
    stored = run / "metrics.json"
    if stored.exists() and json.loads(stored.read_text()).get("baselines"):  # evaluated by an earlier pass
        metrics = json.loads(stored.read_text())
    else:
        metrics = json.loads(cause(["eval", "--run", str(run), "--device", "cpu", "--no-crf", "--json"], home, threads))
    result = {
        "backbone": backbone,
        "family": family,
        "seed": seed,
        "train_seconds": round(seconds, 1),
        "pipeline": metrics["miou"],
        "kmeans_tokens": metrics["baselines"]["kmeans_tokens"]["miou"],
        "kmeans_head": metrics["baselines"]["kmeans_head"]["miou"],
        "linear_probe": metrics["linear_probe"]["miou"],
    }
    print(
        f"  {backbone:8s} {family:15s} seed {seed:3d}: "
        + "  ".join(f"{column} {result[column]:5.1f}" for column in COLUMNS)
        + f"  (train {seconds:.0f} s)",
        flush=True,
    )
    return result


def summarise(results: list[dict[str, Any]]) -> None:
    for backbone in sorted({result["backbone"] for result in results}):
        mine = [result for result in results if result["backbone"] == backbone]
        print(f"\nbackbone {backbone}: mean over seeds (spread of the pipeline over seeds), mIoU %")
        print(f"  {'family':15s} " + " ".join(f"{column:>13s}" for column in COLUMNS) + "  spread  pipeline-tokens")
        means: dict[str, dict[str, float]] = {}
        for family in dict.fromkeys(result["family"] for result in mine):
            rows = [result for result in mine if result["family"] == family]
            means[family] = {column: statistics.mean(row[column] for row in rows) for column in COLUMNS}
            spread = max(row["pipeline"] for row in rows) - min(row["pipeline"] for row in rows)
            worst_gap = min(row["pipeline"] - row["kmeans_tokens"] for row in rows)
            print(
                f"  {family:15s} "
                + " ".join(f"{means[family][column]:13.1f}" for column in COLUMNS)
                + f"  {spread:6.1f}  {worst_gap:+.1f} (worst seed)"
            )
        overall = {column: statistics.mean(value[column] for value in means.values()) for column in COLUMNS}
        worst = {column: min(value[column] for value in means.values()) for column in COLUMNS}
        print(f"  {'mean':15s} " + " ".join(f"{overall[column]:13.1f}" for column in COLUMNS))
        print(f"  {'worst family':15s} " + " ".join(f"{worst[column]:13.1f}" for column in COLUMNS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(REPORTED_FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--train-images", type=int, default=320)
    parser.add_argument("--val-images", type=int, default=64)
    parser.add_argument("--train-arg", action="append", default=[], help="An extra cause train argument (repeat).")
    parser.add_argument("--jobs", type=int, default=1, help="Cases run side by side (threads split between them).")
    parser.add_argument("--out", type=Path, default=Path("/tmp/cause-quality"))
    args = parser.parse_args()
    out = args.out.resolve()
    home = out / "cache"
    home.mkdir(parents=True, exist_ok=True)
    if "vit-tiny" in args.backbones:
        make_random_vit(home)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    cases = [(b, f, s) for b in args.backbones for f in args.families for s in args.seeds]
    print(f"{len(cases)} cases, {args.jobs} at a time, train arguments: {args.train_arg or 'none'}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda case: one_case(out, home, *case, args, threads), cases))
    summarise(results)
    name = "results" + ("-" + "-".join(a.strip("-") for a in args.train_arg) if args.train_arg else "") + ".json"
    (out / name).write_text(json.dumps(results, indent=1))
    print(f"\nwritten: {out / name}")


if __name__ == "__main__":
    main()
