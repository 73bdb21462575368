"""The package's shape: the layers contract of pyproject.toml holds, breaks when a lower layer
imports from a higher one, and no module but the CLI's grows past 400 lines."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "src" / "cause_cli"
LONGEST_MODULE = 400
ALLOWED_LONGER: set[str] = set()

lint_imports = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
needs_import_linter = pytest.mark.skipif(not Path(lint_imports).exists(), reason="import-linter is not installed")


def check_layers(tree: Path) -> subprocess.CompletedProcess[str]:
    """import-linter over the package copy in ``tree/src``, with the repository's contract."""
    environment = {**os.environ, "PYTHONPATH": str(tree / "src")}
    return subprocess.run(
        [lint_imports, "--no-cache", "--config", str(tree / "pyproject.toml")],
        cwd=tree,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def copy_of_package(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(PACKAGE, tree / "src" / "cause_cli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


@needs_import_linter
def test_layers_contract_is_kept(tmp_path):
    result = check_layers(copy_of_package(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@needs_import_linter
@pytest.mark.parametrize(
    ("module", "upward_import"),
    [
        ("model/ops.py", "from ..training import train"),  # the model reaching up into training
        ("training/context.py", "from ..inference.predict import load_trained"),  # training into inference
        ("backbones/registry.py", "from ..data.transforms import normalise"),  # sibling layers are independent
        ("errors.py", "from .paths import cache_home"),  # a core helper importing another
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path, module, upward_import):
    tree = copy_of_package(tmp_path)
    path = tree / "src" / "cause_cli" / module
    lines = path.read_text().splitlines(keepends=True)
    # After the module's own imports, so `from __future__` stays first.
    last_import = max(index for index, line in enumerate(lines) if line.startswith(("import ", "from ")))
    lines.insert(last_import + 1, upward_import + "\n")
    path.write_text("".join(lines))
    result = check_layers(tree)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout


def plant_import(tree: Path, module: str, line: str) -> None:
    """Add ``line`` to the package copy's ``module``, after its own imports."""
    path = tree / "src" / "cause_cli" / module
    lines = path.read_text().splitlines(keepends=True)
    last_import = max(index for index, text in enumerate(lines) if text.startswith(("import ", "from ")))
    lines.insert(last_import + 1, line + "\n")
    path.write_text("".join(lines))


@needs_import_linter
@pytest.mark.parametrize(
    ("module", "planted", "importer", "imported"),
    [
        ("inference/predict.py", "from ..training import train", "inference.predict", "training"),
        ("inference/segment.py", "from ..training.pipeline import prepare", "inference.segment", "training.pipeline"),
        ("trained.py", "from .training.front_door import train_front_door", "trained", "training.front_door"),
    ],
)
def test_inference_and_training_are_siblings_above_the_trained_run(tmp_path, module, planted, importer, imported):
    """Inference reads a run through cause_cli.trained, never through training: an inference
    module importing training breaks the contract, and so does the trained run importing a step."""
    tree = copy_of_package(tmp_path)
    plant_import(tree, module, planted)
    result = check_layers(tree)
    assert result.returncode != 0, result.stdout
    assert f"- cause_cli.{importer} -> cause_cli.{imported} (l." in result.stdout, result.stdout


def test_no_module_is_longer_than_the_limit():
    lengths = {
        str(path.relative_to(PACKAGE)): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
        if path.name not in ALLOWED_LONGER or path.parent != PACKAGE
    }
    too_long = {name: length for name, length in lengths.items() if length > LONGEST_MODULE}
    assert not too_long, f"modules over {LONGEST_MODULE} lines: {too_long}"


def test_each_step_of_the_method_has_its_own_module():
    for step in ("clusterbook", "front_door", "cluster_probe"):
        assert (PACKAGE / "training" / f"{step}.py").is_file(), step


def test_torch_is_required_at_a_version_whose_weights_only_loading_is_safe():
    """torch.load(weights_only=True), which `cause import` and resuming rely on, could be made
    to run code before torch 2.6 (CVE-2025-32434): the package never allows an older torch."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    torch = next(Requirement(line) for line in project["dependencies"] if Requirement(line).name == "torch")
    assert not torch.specifier.contains(Version("2.5.1")), torch
    assert torch.specifier.contains(Version("2.6.0")), torch
