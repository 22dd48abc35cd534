"""A loopback stand-in for the Hugging Face Hub: the endpoints ``huggingface_hub`` uses to create a repo and commit
files, so ``push_to_hub`` can be tested end to end with no internet.

It binds 127.0.0.1 on an ephemeral port and serves from one daemon thread per connection (``ThreadingHTTPServer``);
request bodies are capped and sockets time out, and :meth:`FakeHub.close` shuts it down. Routes (as in
``huggingface_hub``'s ``hf_api.py`` and ``_commit_api.py``):

- ``GET /api/whoami-v2``: the fake user ``tester``.
- ``POST /api/repos/create``: creates ``{organization or tester}/{name}``; 409 if it exists.
- ``GET /api/models/{repo_id}`` (and ``/revision/{rev}``): the repo's info, 404 if unknown.
- ``POST /api/validate-yaml``: parses the README's YAML front matter; 400 with an error if it is invalid.
- ``POST /api/models/{repo_id}/preupload/{rev}``: every file in ``"regular"`` upload mode, so the commit carries
  them base64-encoded in its ndjson body (no LFS or Xet transfer).
- ``POST /api/models/{repo_id}/commit/{rev}``: applies the ndjson ``header``/``file``/``deletedFile`` lines.

Anything else answers 404 and is listed in :attr:`FakeHub.unexpected`. Every request must carry the bearer token
given to the constructor (401 otherwise).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

MAX_BODY_BYTES = 256 * 1024 * 1024
USER = "tester"


class FakeHub:
    """The fake Hub's state and server. Use as a context manager, or call :meth:`close`."""

    def __init__(self, token: str = "hf_fake_token_for_tests") -> None:
        self.token = token
        self.lock = threading.Lock()
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self.unexpected: list[tuple[str, str]] = []
        self.yaml_validated: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True)
        self.thread.start()

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The repo's files after all commits so far."""
        with self.lock:
            return dict(self.repos[repo_id])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_REPO_ROUTE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<action>preupload|commit)/(?P<rev>.+)$")
_INFO_ROUTE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(/revision/(?P<rev>.+))?$")


def _handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 60

        def log_message(self, format, *args):  # keep test output quiet
            pass

        # ---- plumbing ---------------------------------------------------------------------

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks, total = [], 0
                while True:
                    size = int(self.rfile.readline().strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    total += size
                    if total > MAX_BODY_BYTES:
                        raise ValueError("request body too large")
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                raise ValueError("request body too large")
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, payload) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {hub.token}":
                return True
            self._send(401, {"error": "Invalid credentials in Authorization header"})
            return False

        def _route(self, method: str) -> None:
            path = unquote(urlsplit(self.path).path)
            with hub.lock:
                hub.requests.append((method, path))
            try:
                body = self._body() if method in ("POST", "PUT") else b""
            except ValueError as error:
                self._send(413, {"error": str(error)})
                return
            if not self._authorized():
                return
            handler = self._dispatch(method, path)
            if handler is None:
                with hub.lock:
                    hub.unexpected.append((method, path))
                self._send(404, {"error": f"fake hub: no route for {method} {path}"})
                return
            handler(body)

        def _dispatch(self, method: str, path: str):
            if method == "GET" and path == "/api/whoami-v2":
                return self._whoami
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo
            if method == "POST" and path == "/api/validate-yaml":
                return self._validate_yaml
            match = _REPO_ROUTE.match(path)
            if method == "POST" and match:
                repo = match["repo"]
                return lambda body: (
                    self._preupload(repo, body) if match["action"] == "preupload" else self._commit(repo, body)
                )
            match = _INFO_ROUTE.match(path)
            if method == "GET" and match:
                return lambda body: self._repo_info(match["repo"])
            return None

        def do_GET(self):  # noqa: N802
            self._route("GET")

        def do_POST(self):  # noqa: N802
            self._route("POST")

        def do_HEAD(self):  # noqa: N802
            self._route("HEAD")

        # ---- endpoints --------------------------------------------------------------------

        def _whoami(self, body: bytes) -> None:
            self._send(
                200,
                {"type": "user", "name": USER, "fullname": "Test User", "orgs": [], "auth": {"type": "access_token"}},
            )

        def _create_repo(self, body: bytes) -> None:
            payload = json.loads(body)
            if payload.get("type", "model") not in (None, "model"):
                self._send(400, {"error": "the fake hub only hosts models"})
                return
            repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
            with hub.lock:
                if repo_id in hub.repos:
                    self._send(
                        409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"}
                    )
                    return
                hub.repos[repo_id] = {}
            self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

        def _repo_info(self, repo_id: str) -> None:
            with hub.lock:
                known = repo_id in hub.repos
                sha = next((c["oid"] for c in reversed(hub.commits) if c["repo_id"] == repo_id), "0" * 40)
            if not known:
                self._send(404, {"error": "Repository not found"})
                return
            self._send(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False, "siblings": []})

        def _validate_yaml(self, body: bytes) -> None:
            content = json.loads(body)["content"]
            with hub.lock:
                hub.yaml_validated.append(content)
            match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
            try:
                metadata = yaml.safe_load(match.group(1)) if match else {}
            except yaml.YAMLError as error:
                self._send(400, {"errors": [{"message": f"invalid YAML: {error}"}], "warnings": []})
                return
            if match and not isinstance(metadata, dict):
                self._send(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
                return
            self._send(200, {"errors": [], "warnings": []})

        def _preupload(self, repo_id: str, body: bytes) -> None:
            with hub.lock:
                known = repo_id in hub.repos
            if not known:
                self._send(404, {"error": "Repository not found"})
                return
            files = json.loads(body)["files"]
            self._send(
                200,
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
            )

        def _commit(self, repo_id: str, body: bytes) -> None:
            with hub.lock:
                known = repo_id in hub.repos
            if not known:
                self._send(404, {"error": "Repository not found"})
                return
            header, added, deleted = None, {}, []
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    header = value
                elif key == "file":
                    if value.get("encoding") != "base64":
                        self._send(400, {"error": f"unsupported encoding {value.get('encoding')!r}"})
                        return
                    added[value["path"]] = base64.b64decode(value["content"])
                elif key in ("deletedFile", "deletedFolder"):
                    deleted.append(value["path"])
                else:
                    self._send(400, {"error": f"the fake hub does not support {key!r} operations"})
                    return
            if header is None:
                self._send(400, {"error": "the commit has no header line"})
                return
            oid = hashlib.sha1(body).hexdigest()
            with hub.lock:
                files = hub.repos[repo_id]
                for path in deleted:
                    for name in [n for n in files if n == path or n.startswith(path.rstrip("/") + "/")]:
                        del files[name]
                files.update(added)
                hub.commits.append(
                    {"repo_id": repo_id, "summary": header.get("summary"), "files": sorted(added), "oid": oid}
                )
            self._send(
                200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
            )

    return Handler
