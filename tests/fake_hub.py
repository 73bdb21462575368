"""A Hugging Face Hub on 127.0.0.1 for tests: enough of ``/{repo}/resolve/{revision}/{file}``
for ``huggingface_hub.hf_hub_download``, with the failure modes the toolkit must explain.

- ``HEAD`` and ``GET`` answer 200 with ``X-Repo-Commit`` (40 hex) and ``ETag`` (the SHA-256 of
  ``.safetensors``/``.bin`` files as for the Hub's LFS files, git's blob SHA-1 otherwise);
- ``GET`` honours ``Range: bytes=N-`` with 206;
- a missing repository, revision or file answers 404 with ``X-Error-Code`` RepoNotFound,
  RevisionNotFound or EntryNotFound; a gated repository 403 GatedRepo; a private one 401;
- ``cut_once``: the first full ``GET`` of a file sends half of it and closes the connection;
- ``corrupt``: the bytes served differ from the ETag announced.

Writing, as ``huggingface_hub`` uploads without Xet (the test switches Xet off):
``POST /api/repos/create``, ``POST /api/models/{repo}/branch/{branch}``,
``POST /api/models/{repo}/preupload/{revision}`` (``.safetensors`` files go by LFS, the rest
inline), ``POST /{repo}.git/info/lfs/objects/batch`` with a basic transfer to
``PUT /lfs-upload/{oid}``, ``POST /api/validate-yaml`` and ``POST /api/models/{repo}/commit/{revision}``
(NDJSON). A write
without an ``Authorization`` header answers 401; with the token in :attr:`FakeHub.read_only`, 403.

Every request is logged in :attr:`FakeHub.requests`. The server runs in a daemon thread,
sockets time out, and :meth:`FakeHub.stop` shuts it down.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import socket
import threading
from dataclasses import dataclass, field
from urllib.parse import unquote

import pytest


@dataclass
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class FakeHub:
    files: dict[tuple[str, str], bytes] = field(default_factory=dict)
    gated: set[str] = field(default_factory=set)
    private: set[str] = field(default_factory=set)
    cut_once: set[tuple[str, str]] = field(default_factory=set)
    corrupt: set[tuple[str, str]] = field(default_factory=set)
    requests: list[Request] = field(default_factory=list)
    created: dict[str, bool] = field(default_factory=dict)  # repo -> private
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> bytes
    commits: list[dict] = field(default_factory=list)  # each commit's header and paths
    read_only: set[str] = field(default_factory=set)  # tokens that may read but not write
    _server: http.server.ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def add(self, repo: str, filename: str, data: bytes) -> None:
        self.files[(repo, filename)] = data

    @staticmethod
    def commit(repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    @staticmethod
    def etag(filename: str, data: bytes) -> str:
        if filename.endswith((".safetensors", ".bin", ".pth")):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def repos(self) -> set[str]:
        return {repo for repo, _ in self.files} | self.gated | self.private | set(self.created)

    def start(self) -> FakeHub:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10  # seconds a connection may stay silent

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(send_body=False)

            def do_GET(self) -> None:
                self._answer(send_body=True)

            def _answer(self, send_body: bool) -> None:
                hub.requests.append(Request(self.command, self.path, self.headers.get("Range")))
                parts = unquote(self.path.split("?")[0]).strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "RepoNotFound")
                repo, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                if repo in hub.gated:
                    return self._error(403, "GatedRepo", "Access to model is restricted.")
                if repo in hub.private:
                    return self._error(401, "RepoNotFound", "Invalid username or password.")
                if repo not in hub.repos():
                    return self._error(404, "RepoNotFound")
                commit = hub.commit(repo)
                if revision not in ("main", commit):
                    return self._error(404, "RevisionNotFound")
                data = hub.files.get((repo, filename))
                if data is None:
                    return self._error(404, "EntryNotFound", commit=commit)
                etag = hub.etag(filename, data)
                if (repo, filename) in hub.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                start = 0
                requested = self.headers.get("Range")
                if requested and requested.startswith("bytes="):
                    start = int(requested[len("bytes=") :].split("-")[0] or 0)
                body = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not send_body:
                    return
                if (repo, filename) in hub.cut_once and not start:
                    hub.cut_once.discard((repo, filename))
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

            def do_PUT(self) -> None:
                hub.requests.append(Request(self.command, self.path, None))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                oid = self.path.strip("/").split("/")[-1]
                if hashlib.sha256(body).hexdigest() != oid:
                    return self._error(400, "BadRequest", "content does not match its oid")
                hub.lfs_objects[oid] = body
                self._json({})

            def do_POST(self) -> None:
                hub.requests.append(Request(self.command, self.path, None))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
                if not token:
                    return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                if token in hub.read_only:
                    return self._error(
                        403, "Forbidden", "You don't have the rights to create a model under this namespace"
                    )
                path = unquote(self.path.split("?")[0]).strip("/")
                if path == "api/repos/create":
                    request = json.loads(body)
                    repo = (
                        f"{request['organization']}/{request['name']}"
                        if request.get("organization")
                        else request["name"]
                    )
                    if repo in hub.repos():
                        return self._error(409, "RepoExists", "You already created this model repo")
                    hub.created[repo] = request.get("visibility") == "private" or bool(request.get("private"))
                    return self._json({"url": f"{hub.url}/{repo}", "name": repo})
                if path == "api/validate-yaml":  # the model card's metadata; this server accepts any
                    return self._json({"warnings": []})
                if path.endswith(".git/info/lfs/objects/batch"):
                    request = json.loads(body)
                    objects = [
                        {"oid": item["oid"], "size": item["size"],
                         "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{item['oid']}"}}}
                        for item in request["objects"]
                    ]  # fmt: skip
                    return self._json({"transfer": "basic", "objects": objects})
                parts = path.split("/")
                if len(parts) >= 5 and parts[0] == "api" and parts[1] == "models":
                    repo, action = "/".join(parts[2:4]), parts[4]
                    if repo not in hub.repos():
                        return self._error(404, "RepoNotFound")
                    if action == "branch":
                        return self._json({})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        modes = [
                            {"path": item["path"], "shouldIgnore": False,
                             "uploadMode": "lfs" if item["path"].endswith(".safetensors") else "regular"}
                            for item in files
                        ]  # fmt: skip
                        return self._json({"files": modes})
                    if action == "commit":
                        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                        paths = []
                        for line in lines:
                            value = line["value"]
                            if line["key"] == "file":
                                hub.add(repo, value["path"], base64.b64decode(value["content"]))
                            elif line["key"] == "lfsFile":
                                hub.add(repo, value["path"], hub.lfs_objects[value["oid"]])
                            else:
                                continue
                            paths.append(value["path"])
                        hub.commits.append({"repo": repo, "header": lines[0]["value"], "paths": paths})
                        commit = hub.commit(repo)
                        return self._json(
                            {
                                "commitUrl": f"{hub.url}/{repo}/commit/{commit}",
                                "commitOid": commit,
                                "pullRequestUrl": None,
                            }
                        )
                return self._error(404, "NotFound")

            def _json(self, data: object) -> None:
                body = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status: int, code: str, message: str = "", commit: str | None = None) -> None:
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                if message:
                    self.send_header("X-Error-Message", message)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connections are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def point_hub_at(monkeypatch: pytest.MonkeyPatch, url: str, hf_cache) -> None:
    """Send every Hub request of this test to ``url`` and keep huggingface_hub's cache in ``hf_cache``.

    huggingface_hub read its settings when it was imported; the toolkit reads the environment
    at each download and passes the endpoint explicitly. ``constants.ENDPOINT`` must stay as
    imported (``hf_hub_url`` swaps that prefix for the endpoint passed); switching telemetry
    off stops huggingface_hub's own request for its agent registry at that import-time endpoint.
    """
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)


def forbid_remote_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any connection to a host other than 127.0.0.1 in this test (no DNS lookup either)."""
    original = socket.create_connection

    def guarded(address, *args, **kwargs):  # type: ignore[no-untyped-def]
        if address[0] not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"a test tried to reach {address[0]}")
        return original(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
