"""``cause push``: a trained run onto the Hugging Face Hub, with a model card, so that anyone can
use it as ``--run hf-hub:OWNER/NAME``. Everything goes through ``huggingface_hub``.

Uploaded: the files a run needs (run.json and the three weight files), metrics.json and the
pictures when the run has them, and a generated README.md. Never: resume checkpoints, feature
caches, the training log (it names the training images) or any image of the data.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from .backbones import REGISTRY, hub
from .backbones.hub import hub_settings
from .config import TrainConfig
from .errors import CauseError
from .paths import json_text
from .run_checks import MAX_METRICS_JSON_BYTES, metrics_problem, parse_json
from .runs import METRICS_FILE, RUN_FILE, WEIGHTS_SHA256, RunDirectory, open_run
from .trained import WEIGHT_FILES, check_weight_bytes

PICTURES = ("confusion.png", "samples.png", "curves.png")
CARD_FILE = "README.md"
_HUB_LICENCES = {"Apache-2.0": "apache-2.0", "CC-BY-NC-4.0": "cc-by-nc-4.0", "MIT": "mit"}


def backbone_licence(name: str) -> str:
    spec = REGISTRY.get(name)
    return spec.licence if spec is not None else "see the backbone's model card"


def restricted(licence: str) -> bool:
    """Whether a backbone's licence limits how its outputs may be used (non-commercial, gated)."""
    return "NC" in licence.upper().split("-") or "gated" in licence.lower()


def model_card(info: dict[str, Any], metrics: dict[str, Any] | None, repo_id: str, pictures: list[str]) -> str:
    """README.md for the Hub: YAML metadata, what the run is, its scores, how to use it."""
    # Fields a run.json may leave out (runs from before them) take their defaults here too.
    config, backbone = TrainConfig.from_dict({"data_dir": "", **info["config"]}).to_dict(), info.get("backbone", {})
    licence = backbone_licence(str(backbone.get("name", config["backbone"])))
    metadata = [
        "---",
        "library_name: cause-cli",
        f"license: {_HUB_LICENCES.get(licence, 'other')}",
        "pipeline_tag: image-segmentation",
        "tags:",
        "- image-segmentation",
        "- unsupervised-semantic-segmentation",
        "- cause",
        f"- dataset:{config['dataset']}",
    ]
    if backbone.get("hub_repo"):
        metadata.append(f"base_model: {backbone['hub_repo']}")
    metadata.append("---")
    lines = [
        *metadata,
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"CAUSE (Causal Unsupervised Semantic Segmentation) trained with "
        f"[cause-cli](https://arxiv.org/abs/2310.07379): {info['num_classes']} clusters, the "
        f"{config['head'].upper()} head on the frozen backbone `{config['backbone']}`, at {config['resolution']} px, "
        f"on `{config['dataset']}` data, recipe `{config['recipe']}`.",
        "",
    ]
    if restricted(licence):
        lines += [
            f"**The backbone's licence is {licence}**: these weights were trained on its features, so its terms "
            "apply to how they and their outputs may be used.",
            "",
        ]
    if metrics is not None:
        lines += ["## Scores", "", f"On the {metrics.get('split', 'val')} split, {metrics.get('images')} images:", ""]
        lines += ["| | mIoU % | pixel accuracy % |", "| --- | --- | --- |"]
        rows = [("clusters (Hungarian matching)", metrics)]
        if metrics.get("crf"):
            rows.append(("clusters + dense CRF", metrics["crf"]))
        if metrics.get("linear_probe"):
            rows.append(("linear probe (labels)", metrics["linear_probe"]))
        for key, title in (
            ("kmeans_tokens", "k-means on backbone tokens"),
            ("kmeans_head", "k-means on head features"),
        ):
            if (metrics.get("baselines") or {}).get(key):
                rows.append((f"baseline: {title}", metrics["baselines"][key]))
        lines += [f"| {title} | {_percent(scores.get('miou'))} | {_percent(scores.get('pixel_accuracy'))} |"
                  for title, scores in rows]  # fmt: skip
        lines.append("")
    lines += [f"![{picture}]({picture})" for picture in pictures]
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        'pip install "cause-cli[crf]"',
        f"cause segment ./photos --run hf-hub:{repo_id} --out segments",
        "```",
        "",
        "```python",
        "from cause_cli import load_run",
        "",
        f'labels = load_run("hf-hub:{repo_id}").segment("photo.jpg").labels',
        "```",
        "",
    ]
    return "\n".join(lines)


def _percent(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f}"


def push_run(
    run_path: Path | str,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    accept_backbone_licence: bool = False,
) -> str:
    """Upload the run to ``repo_id`` (created when missing); the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if not hub.is_repo_id(repo_id):
        raise CauseError(f"'{repo_id}' is not a Hub repository id; write OWNER/NAME.")
    run = open_run(run_path)
    info = run.read_run_info()
    name = str(info.get("backbone", {}).get("name", info["config"]["backbone"]))
    licence = backbone_licence(name)
    if restricted(licence) and not accept_backbone_licence:
        raise CauseError(
            f"The run's backbone {name} is licensed {licence}, which limits how the weights trained on it may be "
            "used; give --accept-backbone-licence to push anyway (the model card says so)."
        )
    present = [name for name in (METRICS_FILE, *PICTURES) if run.file(name).exists() or run.file(name).is_symlink()]
    # Read once, without following links, and checked for what its name says: what is sent is
    # what was checked, and a link cannot send a file from elsewhere.
    contents = {file: run_file_bytes(run, file) for file in [*WEIGHT_FILES, *present]}
    metrics = None
    if METRICS_FILE in contents:
        metrics, problem = parse_json(contents[METRICS_FILE])
        problem = problem or metrics_problem(metrics, info["num_classes"])  # every field the card reads, checked
        if problem:
            raise CauseError(
                f"{run.file(METRICS_FILE)} is damaged; run cause eval on the run again (or delete the file to push "
                f"the run without scores): {problem}."
            )
    pictures = [name for name in PICTURES if name in contents]
    operations = [CommitOperationAdd(path_in_repo=file, path_or_fileobj=data) for file, data in contents.items()]
    # The Hub's copy of run.json records the weights' SHA-256, which a download checks.
    described = {**info, WEIGHTS_SHA256: {name: hashlib.sha256(contents[name]).hexdigest() for name in WEIGHT_FILES}}
    operations.insert(0, CommitOperationAdd(path_in_repo=RUN_FILE, path_or_fileobj=json_text(described, 2).encode()))
    card = model_card(info, metrics, repo_id, pictures).encode()
    operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card))
    token = get_token()  # HF_TOKEN, or the token `hf auth login` stored
    if token is None:
        raise CauseError(
            f"Pushing to {repo_id} needs a Hugging Face token that may write; set HF_TOKEN or run `hf auth login`."
        )
    api = HfApi(endpoint=hub_settings().endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(
            repo_id,
            operations,
            commit_message=message or f"cause push {run.path.name}",
            revision=revision,
        )
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            raise CauseError(
                f"The Hub did not accept the push to {repo_id} without a valid token; set HF_TOKEN or run "
                "`hf auth login` with a token that may write."
            ) from error
        if status == 403:
            raise CauseError(
                f"The token may not write to {repo_id} (a read-only token, or another owner's namespace); "
                "use a token with write access."
            ) from error
        raise CauseError(f"The Hub refused the push to {repo_id}: {error}.") from error
    except Exception as error:
        if not _is_connection_error(error):
            raise
        raise CauseError(
            f"The Hub at {hub_settings().endpoint} could not be reached to push to {repo_id} "
            f"({error.__class__.__name__}); check the network (or HF_ENDPOINT) and push again."
        ) from error
    return str(commit.commit_url)


# The HTTP clients huggingface_hub has used name their failures to connect so (requests,
# httpx and its forks, urllib3); none of them is an error of the Hub's.
_CONNECTION_ERRORS = {"ConnectionError", "TransportError", "NetworkError", "TimeoutException", "Timeout"}


def _is_connection_error(error: BaseException) -> bool:
    return isinstance(error, OSError) or any(kind.__name__ in _CONNECTION_ERRORS for kind in type(error).__mro__)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_file_bytes(run: RunDirectory, name: str) -> bytes:
    """The bytes of the run's own regular file ``name``, checked to be what its name says, or
    one sentence why not (missing, a link, another kind of file)."""
    path = run.file(name)
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise CauseError(f"{path} is missing; train the run to the end before pushing it.") from None
    except OSError as error:
        reason = "a symbolic link" if path.is_symlink() else f"not readable ({error.strerror})"
        raise CauseError(f"{path} is {reason}; cause pushes only the run's own files.") from error
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise CauseError(f"{path} is not a regular file; cause pushes only the run's own files.")
        if name == METRICS_FILE and os.fstat(handle.fileno()).st_size > MAX_METRICS_JSON_BYTES:
            raise CauseError(f"{path} is damaged: it is larger than any metrics.json cause writes.")
        data = handle.read()
    if name.endswith(".png") and not data.startswith(PNG_SIGNATURE):
        raise CauseError(f"{path} is not a PNG picture; run cause eval on the run again, or delete it.")
    if name in WEIGHT_FILES:
        check_weight_bytes(path, data)
    return data
