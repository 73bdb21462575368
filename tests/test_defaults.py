"""The toolkit's defaults against METHOD.md, read from the document itself (its section 5 table
and the settings stated in sections 1 to 4), so that neither can change unnoticed."""

from __future__ import annotations

import re

import pytest

from cause_cli.config import TrainConfig
from cause_cli.data.labels import LABEL_MAPS
from cause_cli.inference import crf
from cause_cli.inference.predict import CRF_SHARPNESS
from cause_cli.model.contrastive import ContrastiveSettings
from cause_cli.model.heads import MLPHead, TRHead
from cause_cli.resolve import resolve_thresholds

from .helpers import shared_path


@pytest.fixture(scope="module")
def method() -> str:
    return shared_path("METHOD.md").read_text()


@pytest.fixture(scope="module")
def defaults_table(method) -> dict[str, str]:
    """METHOD.md section 5: ``what -> value``."""
    section = method.split("## 5.")[1].split("## 6.")[0]
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    return {what.strip(): value.strip() for what, value in rows[2:]}


def numbers(text: str) -> list[float]:
    return [float(value) for value in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", text)]


def test_the_table_is_where_this_test_reads_it(defaults_table):
    assert len(defaults_table) == 10


def test_sizes_batch_and_learning_rate(defaults_table):
    config = TrainConfig(data_dir=".")
    assert numbers(defaults_table["clusterbook size K"]) == [config.clusterbook_size]
    assert numbers(defaults_table["head width r / projection dim"]) == [config.reduced_dim, config.projection_dim]
    assert numbers(defaults_table["batch size"])[0] == config.batch_size
    assert numbers(defaults_table["lr"])[0] == config.learning_rate


def test_epochs(defaults_table):
    clusterbook, front_door, mlp, tr = numbers(defaults_table["epochs: clusterbook / front door / cluster probe"])
    assert TrainConfig(data_dir=".").paper_epochs("clusterbook") == clusterbook
    assert TrainConfig(data_dir=".").paper_epochs("front_door") == front_door
    assert TrainConfig(data_dir=".", head="mlp").paper_epochs("cluster_probe") == mlp
    assert TrainConfig(data_dir=".", head="tr").paper_epochs("cluster_probe") == tr


def test_grid_window_bank_and_ema(defaults_table):
    config = TrainConfig(data_dir=".")
    window = numbers(defaults_table["grid sampling window"])
    assert window == [config.grid_window, config.grid_window]
    assert config.grid_sampling
    assert numbers(defaults_table["bank entries kept per code"]) == [config.bank_capacity]
    assert numbers(defaults_table["EMA momentum"]) == [config.ema_momentum]


def test_temperature_and_thresholds_on_the_papers_datasets(defaults_table):
    temperature, positive, negative = numbers(defaults_table["contrastive T, positive / negative thresholds"])
    config = resolve_thresholds(TrainConfig(data_dir=".", dataset="cocostuff27"), paper_dataset=True)
    assert (config.contrastive_temperature, config.positive_threshold, config.negative_threshold) == (
        temperature,
        positive,
        negative,
    )
    # The contrastive loss's own defaults are the paper's too.
    settings = ContrastiveSettings()
    assert (settings.temperature, settings.positive_threshold, settings.negative_threshold) == (
        temperature,
        positive,
        negative,
    )


def test_classes_of_the_papers_datasets(defaults_table):
    coco27, coco81, coco171, cityscapes, voc = numbers(defaults_table["classes C"])
    assert LABEL_MAPS["cocostuff27"].num_classes == coco27
    assert LABEL_MAPS["cocostuff81"].num_classes == coco81
    assert LABEL_MAPS["cocostuff171"].num_classes == coco171
    assert LABEL_MAPS["cityscapes"].num_classes == cityscapes
    assert LABEL_MAPS["voc2012"].num_classes == voc


def test_settings_stated_in_the_text(method):
    config = TrainConfig(data_dir=".")
    # Section 1: tau = 0.1 in the co-membership; section 2: dropout p=0.1, T = 0.07.
    assert re.search(r"tau = 0\.1\b", method) and config.modularity_temperature == 0.1
    assert re.search(r"dropout p=0\.1\b", method) and config.dropout == 0.1
    assert MLPHead(8, 4).dropout.p == config.dropout
    tr = TRHead(8, 4, num_queries=4)
    assert tr.dropout.p == config.dropout and tr.linear1.out_features == 2048  # FFN D -> 2048 -> D
    # Section 4: softmax(3 * cos), 10 iterations, Gaussian sxy=1 compat=3, bilateral 67 / 3 / 4.
    assert re.search(r"softmax\(3 \* cos", method) and CRF_SHARPNESS == 3
    assert re.search(r"10 mean-field iterations", method) and crf.ITERATIONS == 10
    assert re.search(r"sxy=1, compat=3", method) and (crf.GAUSSIAN_SXY, crf.GAUSSIAN_COMPAT) == (1, 3)
    assert re.search(r"sxy=67,\s+srgb=3, compat=4", method)
    assert (crf.BILATERAL_SXY, crf.BILATERAL_SRGB, crf.BILATERAL_COMPAT) == (67, 3, 4)
