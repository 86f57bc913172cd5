"""A small Hugging Face Hub look-alike for the tests: standard library only, bound to 127.0.0.1.

It answers the endpoints that ``huggingface_hub`` calls to publish and to download a model repo: whoami-v2,
repos/create, repo info (also per revision), validate-yaml, preupload, the git LFS batch API (upload + verify),
commit (ndjson), branch creation, tree listing and ``resolve/<rev>/<file>`` (HEAD and GET). Repos, branches,
commits, pull requests and blobs live in memory. Every request is recorded (method, path, query, headers,
body) so that tests can assert what the client sent; ``lfs_patterns`` chooses per file whether preupload
answers "lfs" or "regular"; ``fail`` injects error statuses.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob, as the Hub reports for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Recorded:
    """One request as the server received it (header names in lower case)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    status: int = 0

    def json(self) -> Any:
        return json.loads(self.body)

    def ndjson(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    description: str
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    pulls: list[str] = field(default_factory=list)

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


@dataclass
class Failure:
    method: str
    pattern: re.Pattern
    status: int
    times: int | None
    headers: dict[str, str]
    message: str
    hits: int = 0


class HubServer:
    """The fake Hub. ``tokens`` maps a token to its user name; ``orgs`` maps a user to the orgs they can write."""

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}
        self.orgs: dict[str, set[str]] = {}
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.lfs_patterns: list[str] = ["*.safetensors", "*.bin"]
        self.requests: list[Recorded] = []
        self.failures: list[Failure] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # -- test controls -------------------------------------------------------------------------------------
    def add_user(self, name: str, token: str, orgs: tuple[str, ...] = ()) -> None:
        self.tokens[token] = name
        self.orgs[name] = set(orgs)

    def fail(self, method: str, path_regex: str, status: int, *, times: int | None = None,
             headers: dict[str, str] | None = None, message: str = "injected failure") -> Failure:
        """Answer ``status`` to requests matching method and path (``times`` of them, or all)."""
        rule = Failure(method, re.compile(path_regex), status, times, headers or {}, message)
        self.failures.append(rule)
        return rule

    def calls(self, method: str | None = None, contains: str = "") -> list[Recorded]:
        return [r for r in self.requests if (method is None or r.method == method) and contains in r.path]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(revision)
        return dict(commit.files) if commit else {}

    def head(self, repo_id: str, revision: str = "main") -> Commit:
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None, f"{repo_id}@{revision} has no commit"
        return commit

    # -- state changes (called by the handler under the lock) -----------------------------------------------
    def create_repo(self, repo_id: str, owner: str, private: bool) -> Repo:
        repo = Repo(repo_id, owner, private)
        first = self._new_commit(repo, None, "initial commit", "", {".gitattributes": GITATTRIBUTES}, set())
        repo.branches["main"] = first.oid
        self.repos[repo_id] = repo
        return repo

    def _new_commit(self, repo: Repo, parent: Commit | None, message: str, description: str,
                    files: dict[str, bytes], lfs: set[str]) -> Commit:
        seed = f"{repo.repo_id}\0{parent.oid if parent else ''}\0{message}\0{len(repo.commits)}".encode()
        commit = Commit(hashlib.sha1(seed).hexdigest(), parent.oid if parent else None, message, description,
                        files, lfs)
        repo.commits[commit.oid] = commit
        return commit


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        server_state = hub

    return Handler


class _Reply(Exception):
    """Ends a request with a status, a JSON body and optional headers (the Hub's error headers)."""

    def __init__(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


def _error(status: int, message: str, code: str | None = None) -> _Reply:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return _Reply(status, {"error": message}, headers)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # the tests read ``hub.requests`` instead
        pass

    # -- plumbing ----------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: dict[str, str], content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        hub = self.server_state
        parts = urlsplit(self.path)
        record = Recorded(self.command, parts.path, parse_qs(parts.query),
                          {k.lower(): v for k, v in self.headers.items()}, self._body())
        with hub._lock:
            hub.requests.append(record)
            try:
                for rule in hub.failures:
                    if rule.method == self.command and rule.pattern.search(parts.path) and (
                            rule.times is None or rule.hits < rule.times):
                        rule.hits += 1
                        raise _Reply(rule.status, {"error": rule.message},
                                     {"X-Error-Message": rule.message, **rule.headers})
                status, body, headers, content_type = self._route(hub, record)
            except _Reply as reply:
                status, headers, content_type = reply.status, reply.headers, "application/json"
                body = json.dumps(reply.body if reply.body is not None else {}).encode()
            record.status = status
        self._send(status, body, headers, content_type)

    do_GET = do_POST = do_PUT = do_HEAD = _handle

    # -- auth ------------------------------------------------------------------------------------------
    def _user(self, hub: HubServer, required: bool) -> str | None:
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None
        if token is None:
            if required:
                raise _error(401, "Invalid credentials in Authorization header")
            return None
        if token not in hub.tokens:
            raise _error(401, "Invalid credentials in Authorization header")
        return hub.tokens[token]

    def _repo(self, hub: HubServer, repo_id: str, write: bool) -> Repo:
        user = self._user(hub, required=write)
        repo = hub.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner and repo.owner not in hub.orgs.get(user or "", ())):
            raise _error(404, "Repository not found", "RepoNotFound")
        if write and user != repo.owner and repo.owner not in hub.orgs.get(user, set()):
            raise _error(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def _commit(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # -- routes ----------------------------------------------------------------------------------------
    def _route(self, hub: HubServer, req: Recorded) -> tuple[int, bytes, dict[str, str], str]:
        segs = [unquote(s) for s in req.path.strip("/").split("/")]
        method = req.method
        if method == "GET" and segs == ["api", "whoami-v2"]:
            user = self._user(hub, required=True)
            orgs = [{"name": o, "type": "org"} for o in sorted(hub.orgs.get(user, ()))]
            return self._json({"type": "user", "name": user, "orgs": orgs,
                               "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if method == "POST" and segs == ["api", "repos", "create"]:
            return self._create_repo(hub, req)
        if method == "POST" and segs == ["api", "validate-yaml"]:
            return self._validate_yaml(req)
        if len(segs) >= 4 and segs[:2] == ["api", "models"]:
            return self._model_api(hub, req, f"{segs[2]}/{segs[3]}", segs[4:])
        if len(segs) >= 2 and segs[1].endswith(".git") and segs[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(hub, req, f"{segs[0]}/{segs[1].removesuffix('.git')}")
        if method == "POST" and len(segs) >= 2 and segs[2:] == ["info", "lfs", "objects", "verify"]:
            payload = req.json()
            data = hub.lfs_store.get(payload["oid"])
            if data is None or len(data) != payload["size"]:
                raise _error(404, "object not uploaded")
            return self._json({})
        if method == "PUT" and len(segs) == 2 and segs[0] == "lfs-upload":
            if hashlib.sha256(req.body).hexdigest() != segs[1]:
                raise _error(400, "sha256 of the uploaded bytes does not match the oid")
            hub.lfs_store[segs[1]] = req.body
            return 200, b"", {}, "text/plain"
        if method in ("GET", "HEAD") and len(segs) >= 5 and segs[2] == "resolve":
            return self._resolve(hub, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]))
        raise _error(404, f"no route for {method} {req.path}")

    def _json(self, data: Any, status: int = 200) -> tuple[int, bytes, dict[str, str], str]:
        return status, json.dumps(data).encode(), {}, "application/json"

    def _create_repo(self, hub: HubServer, req: Recorded) -> tuple[int, bytes, dict[str, str], str]:
        user = self._user(hub, required=True)
        payload = req.json()
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if namespace != user and namespace not in hub.orgs.get(user, set()):
            raise _error(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        if repo_id in hub.repos:
            raise _Reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
        hub.create_repo(repo_id, namespace, payload.get("visibility") == "private")
        return self._json({"url": f"{hub.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, req: Recorded) -> tuple[int, bytes, dict[str, str], str]:
        content = req.json()["content"]
        match = re.match(r"^\s*---\r?\n([\s\S]*?)\r?\n---[ \t]*(\r?\n|$)", content)
        errors = []
        if match:
            try:
                data = yaml.safe_load(match.group(1))
            except yaml.YAMLError as exc:
                errors.append({"message": f"invalid YAML: {exc}"})
            else:
                if data is not None and not isinstance(data, dict):
                    errors.append({"message": "metadata must be a mapping"})
        if errors:
            return 400, json.dumps({"errors": errors, "warnings": []}).encode(), {}, "application/json"
        return self._json({"errors": [], "warnings": []})

    def _model_api(self, hub: HubServer, req: Recorded, repo_id: str, rest: list[str]):
        method = req.method
        if method == "GET" and (not rest or (len(rest) == 2 and rest[0] == "revision")):
            repo = self._repo(hub, repo_id, write=False)
            commit = self._commit(repo, rest[1] if rest else "main")
            return self._json({"id": repo_id, "modelId": repo_id, "private": repo.private, "sha": commit.oid,
                               "siblings": [{"rfilename": p} for p in sorted(commit.files)]})
        if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
            repo = self._repo(hub, repo_id, write=True)
            commit = self._commit(repo, rest[1])
            files = []
            for entry in req.json()["files"]:
                lfs = any(fnmatch.fnmatch(entry["path"], p) for p in hub.lfs_patterns)
                existing = commit.files.get(entry["path"])
                oid = None
                if existing is not None and entry["path"] in commit.lfs:
                    oid = hashlib.sha256(existing).hexdigest()
                elif existing is not None:
                    oid = git_blob_oid(existing)
                files.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular",
                              "shouldIgnore": False, "oid": oid})
            return self._json({"files": files, "commitOid": commit.oid})
        if method == "POST" and len(rest) == 2 and rest[0] == "commit":
            return self._create_commit(hub, req, repo_id, rest[1])
        if method == "POST" and len(rest) == 2 and rest[0] == "branch":
            repo = self._repo(hub, repo_id, write=True)
            if rest[1] in repo.branches:
                raise _error(409, f"Reference already exists: refs/heads/{rest[1]}")
            start = (req.json() if req.body else {}).get("startingPoint") or "main"
            repo.branches[rest[1]] = self._commit(repo, start).oid
            return self._json({})
        if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
            repo = self._repo(hub, repo_id, write=False)
            commit = self._commit(repo, rest[1])
            prefix = "/".join(rest[2:])
            entries = []
            for path, data in sorted(commit.files.items()):
                if prefix and not path.startswith(prefix + "/"):
                    continue
                entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}
                if path in commit.lfs:
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            return self._json(entries)
        raise _error(404, f"no route for {method} {req.path}")

    def _create_commit(self, hub: HubServer, req: Recorded, repo_id: str, revision: str):
        repo = self._repo(hub, repo_id, write=True)
        base = self._commit(repo, revision)
        lines = req.ndjson()
        header = lines[0]["value"]
        files, lfs = dict(base.files), set(base.lfs)
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs.discard(value["path"])
            elif line["key"] == "lfsFile":
                data = hub.lfs_store.get(value["oid"])
                if data is None:
                    raise _error(400, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = data
                lfs.add(value["path"])
            elif line["key"] == "deletedFile":
                files.pop(value["path"], None)
                lfs.discard(value["path"])
            else:
                raise _error(400, f"unsupported commit operation {line['key']}")
        commit = hub._new_commit(repo, base, header["summary"], header.get("description", ""), files, lfs)
        pr_url = None
        if req.query.get("create_pr"):
            repo.pulls.append(revision)
            number = len(repo.pulls)
            repo.branches[f"refs/pr/{number}"] = commit.oid
            pr_url = f"{hub.url}/{repo_id}/discussions/{number}"
        else:
            repo.branches[revision] = commit.oid
        return self._json({"commitUrl": f"{hub.url}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid,
                           "pullRequestUrl": pr_url, "success": True})

    def _lfs_batch(self, hub: HubServer, req: Recorded, repo_id: str):
        self._repo(hub, repo_id, write=True)
        payload = req.json()
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in hub.lfs_store:
                entry["actions"] = {
                    "upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{hub.url}/{repo_id}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(entry)
        return self._json({"transfer": "basic", "objects": objects})

    def _resolve(self, hub: HubServer, repo_id: str, revision: str, path: str):
        repo = self._repo(hub, repo_id, write=False)
        commit = self._commit(repo, revision)
        if path not in commit.files:
            raise _error(404, f"{path} not found", "EntryNotFound")
        data = commit.files[path]
        headers = {"X-Repo-Commit": commit.oid}
        if path in commit.lfs:
            sha = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))})
        else:
            headers["ETag"] = f'"{git_blob_oid(data)}"'
        return 200, data, headers, "application/octet-stream"
