"""A loopback Hugging Face Hub for tests: the API subset `huggingface_hub` (LFS path) calls.

Stdlib only, 127.0.0.1 only. Use `serve_hub(root_dir)` with ``HF_HUB_DISABLE_XET=1``; every
request lands in ``hub.log`` so tests can assert what was called and how many LFS bytes moved.
`HubServer.inject` makes matching requests fail (an HTTP status, or a reset connection).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

TOKEN = "hf_loopback_test_token"
USER = "tester"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npy", ".npz", ".parquet", ".arrow", ".gz")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores files over 10 MB in LFS whatever their name
GITATTRIBUTES = b"".join(
    f"*{s} filter=lfs diff=lfs merge=lfs -text\n".encode() for s in LFS_SUFFIXES
)
_REPO = r"/api/(?P<type>model|dataset)s/(?P<repo>[^/]+/[^/]+)"
_PREFIX = r"/(?P<prefix>datasets/)?(?P<repo>[^/]+/[^/]+)"


class HubError(Exception):
    """An HTTP error answer; ``code`` goes to X-Error-Code, which the client maps to types."""

    def __init__(self, status: int, message: str, code: str = "", **extra: str) -> None:
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra


@dataclass
class Blob:
    """A file in a commit: regular content, or an LFS pointer to ``lfs_oid`` in the store."""

    size: int
    data: bytes | None = None
    lfs_oid: str | None = None

    def git_oid(self) -> str:
        """Git blob sha1 (of the pointer file for LFS), as the Hub's tree listing gives it."""
        body = self.data if self.data is not None else self.pointer()
        return hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()

    def pointer(self) -> bytes:
        """The git-lfs pointer text that stands in for an LFS file in git."""
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.lfs_oid}\n"
            f"size {self.size}\n"
        ).encode()


@dataclass
class Commit:
    """An immutable snapshot: path -> Blob."""

    oid: str
    parent: str | None
    title: str
    files: dict[str, Blob]
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S.000Z"))


@dataclass
class Repo:
    """A repository: commits plus branch and tag refs."""

    type: str
    id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Fault:
    """An injected failure for requests whose method and path match, ``times`` times (-1: all).

    ``status`` 0 resets the TCP connection instead of answering (the client sees ECONNRESET).
    """

    method: str
    """HTTP method, or ``*`` for any."""
    pattern: str
    """Regular expression searched in the request path."""
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    times: int = 1
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        """True when this fault applies to the request (and has hits left)."""
        live = self.times < 0 or self.hits < self.times
        return live and self.method in ("*", method) and re.search(self.pattern, path) is not None


@dataclass(frozen=True)
class LogEntry:
    """One request: ``mutating`` is True for routes that change Hub state."""

    method: str
    path: str
    status: int
    mutating: bool
    lfs_bytes_in: int
    lfs_bytes_out: int


class HubServer(ThreadingHTTPServer):
    """In-memory repos; LFS objects on disk under ``root_dir``; a request ``log``."""

    daemon_threads = True

    def __init__(self, root_dir: Path, *, token: str = TOKEN) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root_dir, self.token = root_dir, token
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.repos: dict[tuple[str, str], Repo] = {}
        self.log: list[LogEntry] = []
        self.faults: list[Fault] = []
        self.lock = threading.RLock()
        root_dir.mkdir(parents=True, exist_ok=True)

    def inject(
        self,
        method: str,
        pattern: str,
        status: int,
        *,
        times: int = 1,
        headers: dict[str, str] | None = None,
    ) -> Fault:
        """Fail the next ``times`` requests matching ``method`` and ``pattern`` with ``status``.

        ``status`` 0 resets the connection; ``times`` -1 fails every matching request.
        """
        fault = Fault(method, pattern, status, dict(headers or {}), times)
        with self.lock:
            self.faults.append(fault)
        return fault

    def lfs_path(self, repo: Repo, oid: str) -> Path:
        """Where an LFS object of ``repo`` lives on disk."""
        return self.root_dir / repo.type / repo.id.replace("/", "--") / oid

    def requests(self, method: str | None = None, pattern: str = "") -> list[LogEntry]:
        """Logged requests with this method (any when None) whose path contains ``pattern``."""
        return [e for e in self.log if method in (None, e.method) and pattern in e.path]

    @property
    def lfs_bytes_uploaded(self) -> int:
        """Total LFS bytes received by upload PUTs."""
        return sum(e.lfs_bytes_in for e in self.log)

    @property
    def lfs_bytes_downloaded(self) -> int:
        """Total LFS file bytes served by downloads."""
        return sum(e.lfs_bytes_out for e in self.log)

    def new_commit(self, repo: Repo, parent: str | None, title: str, files: dict[str, Blob]) -> str:
        """Store a commit and return its oid (a sha1 over parent, title and tree)."""
        tree = sorted((p, b.git_oid()) for p, b in files.items())
        seed = json.dumps([parent, title, tree, len(repo.commits)]).encode()
        oid = hashlib.sha1(seed).hexdigest()
        repo.commits[oid] = Commit(oid=oid, parent=parent, title=title, files=dict(files))
        return oid


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer has a length
    disable_nagle_algorithm = True  # else header and body writes stall ~40 ms on delayed ACKs
    server: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output quiet
        return

    # ------------------------------------------------------------------ plumbing

    def _read_body(self) -> bytes:
        # Always drain the body, even for errors: leftovers poison the next keep-alive request.
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                continue
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _fault(self, path: str) -> Fault | None:
        with self.server.lock:
            fault = next((f for f in self.server.faults if f.matches(self.command, path)), None)
            if fault is not None:
                fault.hits += 1
        return fault

    def _reset(self, path: str) -> None:
        """Drop the connection with a TCP RST and no answer (SO_LINGER 0, then close)."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True
        self.server.log.append(LogEntry(self.command, path, 0, False, 0, 0))

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.body, self.query = self._read_body(), parse_qs(url.query)
        self.mutating, self.lfs_in, self.lfs_out = False, 0, 0
        status, headers, payload = 200, dict[str, str](), b""
        fault = self._fault(url.path)
        if fault is not None and fault.status == 0:
            self._reset(url.path)
            return
        try:
            if fault is not None:
                raise HubError(fault.status, f"injected fault: HTTP {fault.status}")
            with self.server.lock:
                status, headers, payload = self._route(url.path)
        except HubError as exc:
            status, payload = exc.status, json.dumps({"error": str(exc), **exc.extra}).encode()
            headers = {"X-Error-Message": str(exc), "Content-Type": "application/json"}
            if exc.code:
                headers["X-Error-Code"] = exc.code
            if fault is not None:
                headers.update(fault.headers)
        self.send_response(status)
        for key, value in {"Content-Length": str(len(payload)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        else:
            self.lfs_out = 0
        entry = LogEntry(self.command, url.path, status, self.mutating, self.lfs_in, self.lfs_out)
        self.server.log.append(entry)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.server.token}"

    def _require_write(self) -> None:
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")
        self.mutating = True

    def _json(self) -> Any:
        return json.loads(self.body or b"{}")

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.server.repos.get((repo_type, unquote(repo_id)))
        if repo is None or (repo.private and not self._authorized()):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, rev: str) -> Commit:
        rev = unquote(rev)
        oid = repo.branches.get(rev) or repo.tags.get(rev) or rev
        if oid not in repo.commits:
            raise HubError(404, f"Revision {rev} not found", "RevisionNotFound")
        return repo.commits[oid]

    def _route(self, path: str) -> tuple[int, dict[str, str], bytes]:
        routes: list[tuple[str, str, Callable[..., Any]]] = [
            ("GET", r"/api/whoami-v2", self._whoami),
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", lambda: {"errors": [], "warnings": []}),
            ("GET", _REPO + r"(?:/revision/(?P<rev>[^/]+))?", self._repo_info),
            ("POST", _REPO + r"/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", _PREFIX + r"\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", r"/lfs/(?P<type>\w+)/(?P<repo>[^/]+/[^/]+)/(?P<oid>\w+)", self._lfs_put),
            ("POST", r"/lfs-verify/(?P<type>\w+)/(?P<repo>[^/]+/[^/]+)", self._lfs_verify),
            ("POST", _REPO + r"/commit/(?P<rev>[^/]+)", self._commit),
            ("POST", _REPO + r"/branch/(?P<name>[^/]+)", self._create_branch),
            ("DELETE", _REPO + r"/branch/(?P<name>[^/]+)", self._delete_branch),
            ("POST", _REPO + r"/tag/(?P<rev>[^/]+)", self._create_tag),
            ("GET", _REPO + r"/refs", self._refs),
            ("GET", _REPO + r"/commits/(?P<rev>[^/]+)", self._commits),
            ("GET", _REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<sub>.+))?", self._tree),
            ("POST", _REPO + r"/paths-info/(?P<rev>[^/]+)", self._paths_info),
            ("GET|HEAD", _PREFIX + r"/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve_file),
        ]
        for methods, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match and self.command in methods.split("|"):
                answer = handler(**{k: v for k, v in match.groupdict().items() if k != "prefix"})
                if isinstance(answer, tuple):
                    return answer
                return 200, {"Content-Type": "application/json"}, json.dumps(answer).encode()
        raise HubError(404, f"no route for {self.command} {path}")

    # ------------------------------------------------------------------ routes

    def _whoami(self) -> Any:  # HfApi.whoami
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")
        return {"type": "user", "name": USER, "orgs": [], "auth": {"type": "access_token"}}

    def _create_repo(self) -> Any:  # HfApi.create_repo
        self._require_write()
        body = self._json()
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        prefix = "datasets/" if repo_type == "dataset" else ""
        url = f"{self.server.endpoint}/{prefix}{repo_id}"
        if (repo_type, repo_id) in self.server.repos:  # exist_ok=True reads "url" from the 409
            raise HubError(409, "You already created this model repo", url=url)
        private = body.get("visibility", "private" if body.get("private") else "public")
        repo = Repo(type=repo_type, id=repo_id, private=private == "private")
        files = {".gitattributes": Blob(size=len(GITATTRIBUTES), data=GITATTRIBUTES)}
        repo.branches["main"] = self.server.new_commit(repo, None, "initial commit", files)
        self.server.repos[(repo_type, repo_id)] = repo
        return {"url": url, "name": repo_id}

    def _repo_info(self, type: str, repo: str, rev: str | None) -> Any:  # model_info, repo_info
        r = self._repo(type, repo)
        commit = self._resolve(r, rev or "main")
        return {
            "id": r.id,
            "author": r.id.split("/")[0],
            "sha": commit.oid,
            "private": r.private,
            "lastModified": commit.date,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            "tags": [],
        }

    def _preupload(self, type: str, repo: str, rev: str) -> Any:  # create_commit, preupload_lfs
        self._require_write()
        self.mutating = False  # answers a question, changes nothing
        head = self._resolve(self._repo(type, repo), rev)
        files = []
        for f in self._json()["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
            remote = head.files.get(f["path"])
            # "oid" lets the client drop unchanged files: sha256 for LFS, git sha1 otherwise.
            oid = remote and (remote.lfs_oid if remote.lfs_oid else remote.git_oid())
            mode = "lfs" if lfs else "regular"
            files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return {"files": files}

    def _lfs_batch(self, repo: str) -> Any:  # lfs.post_lfs_batch_info (basic transfer)
        self._require_write()
        self.mutating = False
        repo_type = "dataset" if self.path.startswith("/datasets/") else "model"
        r = self._repo(repo_type, repo)
        objects = []
        for obj in self._json()["objects"]:
            answer: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if not self.server.lfs_path(r, obj["oid"]).exists():  # no actions = already stored
                base = f"{self.server.endpoint}/lfs/{repo_type}/{r.id}"
                answer["actions"] = {
                    "upload": {"href": f"{base}/{obj['oid']}"},
                    "verify": {"href": f"{self.server.endpoint}/lfs-verify/{repo_type}/{r.id}"},
                }
            objects.append(answer)
        return {"transfer": "basic", "objects": objects}

    def _lfs_put(self, type: str, repo: str, oid: str) -> Any:  # lfs._upload_single_part
        self.mutating = True  # the href is pre-signed: no Authorization header, as on S3
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"uploaded bytes do not hash to {oid}")
        path = self.server.lfs_path(self._repo(type, repo), oid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.body)
        self.lfs_in = len(self.body)
        return {}

    def _lfs_verify(self, type: str, repo: str) -> Any:  # lfs.lfs_upload verify action
        self._require_write()
        body = self._json()
        path = self.server.lfs_path(self._repo(type, repo), body["oid"])
        if not path.exists() or path.stat().st_size != body["size"]:
            raise HubError(404, f"LFS object {body['oid']} not stored")
        self.mutating = False
        return {}

    def _commit(self, type: str, repo: str, rev: str) -> Any:  # create_commit (NDJSON)
        self._require_write()
        r = self._repo(type, repo)
        head = self._resolve(r, rev)
        if unquote(rev) not in r.branches:
            raise HubError(400, f"can only commit to a branch, not {rev}")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, head.oid):
            raise HubError(412, "parentCommit is not the head of the branch")
        files = dict(head.files)
        for item in lines[1:]:
            value = item["value"]
            match item["key"]:
                case "file":
                    data = base64.b64decode(value["content"])
                    files[value["path"]] = Blob(size=len(data), data=data)
                case "lfsFile":
                    lfs_file = self.server.lfs_path(r, value["oid"])
                    if not lfs_file.exists():
                        raise HubError(422, f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = Blob(size=lfs_file.stat().st_size, lfs_oid=value["oid"])
                case "deletedFile":
                    files.pop(value["path"], None)
                case "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: b for p, b in files.items() if not p.startswith(prefix)}
                case other:
                    raise HubError(400, f"unsupported commit operation {other}")
        oid = self.server.new_commit(r, head.oid, header["summary"], files)
        r.branches[unquote(rev)] = oid
        prefix = "datasets/" if type == "dataset" else ""
        url = f"{self.server.endpoint}/{prefix}{r.id}/commit/{oid}"
        return {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None}

    def _create_branch(self, type: str, repo: str, name: str) -> Any:  # HfApi.create_branch
        self._require_write()
        r = self._repo(type, repo)
        if unquote(name) in r.branches:
            raise HubError(409, f"Branch {name} already exists")
        r.branches[unquote(name)] = self._resolve(r, self._json().get("startingPoint", "main")).oid
        return {}

    def _delete_branch(self, type: str, repo: str, name: str) -> Any:  # HfApi.delete_branch
        self._require_write()
        if self._repo(type, repo).branches.pop(unquote(name), None) is None:
            raise HubError(404, f"Branch {name} not found", "RevisionNotFound")
        return {}

    def _create_tag(self, type: str, repo: str, rev: str) -> Any:  # HfApi.create_tag
        self._require_write()
        r, tag = self._repo(type, repo), self._json()["tag"]
        if tag in r.tags:
            raise HubError(409, f"Tag {tag} already exists")
        r.tags[tag] = self._resolve(r, rev).oid
        return {}

    def _refs(self, type: str, repo: str) -> Any:  # HfApi.list_repo_refs
        r = self._repo(type, repo)
        answer: dict[str, Any] = {"converts": [], "pullRequests": []}
        for key, kind, names in (("branches", "heads", r.branches), ("tags", "tags", r.tags)):
            refs = sorted(names.items())
            answer[key] = [
                {"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c} for n, c in refs
            ]
        return answer

    def _commits(self, type: str, repo: str, rev: str) -> Any:  # HfApi.list_repo_commits
        r = self._repo(type, repo)
        commit: Commit | None = self._resolve(r, rev)
        history = []
        while commit is not None:
            entry = {"id": commit.oid, "title": commit.title, "message": "", "date": commit.date}
            history.append({**entry, "authors": [{"user": USER}]})
            commit = r.commits.get(commit.parent or "")
        return history

    def _entries(self, commit: Commit, paths: list[str]) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        for path in paths:
            blob = commit.files.get(path)
            if blob is None:  # a folder (if any file lies under it)
                if any(p.startswith(path + "/") for p in commit.files):
                    folder_oid = hashlib.sha1(path.encode()).hexdigest()
                    entries.append({"type": "directory", "oid": folder_oid, "path": path})
                continue
            entry = {"type": "file", "oid": blob.git_oid(), "size": blob.size, "path": path}
            if blob.lfs_oid:
                pointer_size = len(blob.pointer())
                entry["lfs"] = {"oid": blob.lfs_oid, "size": blob.size, "pointerSize": pointer_size}
            entries.append(entry)
        return entries

    def _tree(self, type: str, repo: str, rev: str, sub: str | None) -> Any:  # list_repo_tree
        commit = self._resolve(self._repo(type, repo), rev)
        base = unquote(sub).strip("/") + "/" if sub else ""
        recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
        paths: set[str] = set()
        for path in commit.files:
            if not path.startswith(base):
                continue
            parts = path[len(base) :].split("/")
            depth = len(parts) if recursive else 1
            paths.update(base + "/".join(parts[: i + 1]) for i in range(depth))
        if base and not paths:
            raise HubError(404, f"{sub} not found", "EntryNotFound")
        return self._entries(commit, sorted(paths))

    def _paths_info(self, type: str, repo: str, rev: str) -> Any:  # HfApi.get_paths_info
        commit = self._resolve(self._repo(type, repo), rev)
        return self._entries(commit, parse_qs(self.body.decode()).get("paths", []))

    def _resolve_file(self, repo: str, rev: str, file: str) -> Any:  # hf_hub_download
        repo_type = "dataset" if self.path.startswith("/datasets/") else "model"
        r = self._repo(repo_type, repo)
        commit, path = self._resolve(r, rev), unquote(file)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"{path} not found at {rev}", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob.git_oid()}"'}
        if blob.lfs_oid:  # the client uses the sha256 as the cache key and checks it
            data = self.server.lfs_path(r, blob.lfs_oid).read_bytes()
            headers.update({"X-Linked-Etag": f'"{blob.lfs_oid}"', "X-Linked-Size": str(blob.size)})
            self.lfs_out = len(data)
        else:
            data = blob.data or b""
        headers["Content-Disposition"] = f"inline; filename*=UTF-8''{quote(path.split('/')[-1])}"
        return 200, headers, data


@contextmanager
def serve_hub(root_dir: Path, *, token: str = TOKEN) -> Iterator[HubServer]:
    """Run a loopback Hub on an ephemeral port; yields the server (``.endpoint``, ``.log``)."""
    server = HubServer(root_dir, token=token)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
