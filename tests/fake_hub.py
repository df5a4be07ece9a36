"""A stand-in for the Hugging Face Hub on 127.0.0.1, for real huggingface-hub calls in hermetic tests.

It answers what `HfApi.dataset_info(files_metadata=True)` and `hf_hub_download` ask of the real Hub, the way the
real Hub answers for LFS files:

    GET  /api/datasets/<repo>/revision/<rev>?blobs=true   the listing: commit, sizes, blob ids, LFS sha256
    HEAD /datasets/<repo>/resolve/<rev>/<file>            302 to the CDN, with X-Repo-Commit, X-Linked-Size,
                                                          X-Linked-Etag (the sha256) and ETag (the pointer's blob id)
    GET  <cdn>/lfs/<sha256>                               the bytes, with Range requests (206 / 416)

The CDN is a second server (another port, so another origin): like the real one it is reached without the
Hub's headers, and huggingface-hub takes the file's metadata from the 302 itself.

Faults to inject: `failures[name]` statuses the CDN answers first (`failures[FakeHub.API]` for the listing),
`cut_after[name]` bytes sent before the connection drops (once), `stall_after[name]` bytes sent before the
answer hangs until the server closes (once), `corrupt_once` names served once with a flipped byte,
`listed_size` / `listed_sha256` lies in the metadata (listing and HEAD alike), `missing` files listed but
404 on resolve, `delay_s` before each file body.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    API = "__api__"

    def __init__(self, repo_id: str, files: dict[str, bytes]):
        self.repo_id, self.files, self.commit = repo_id, files, hashlib.sha1(repo_id.encode()).hexdigest()
        self.failures: dict[str, list[int]] = collections.defaultdict(list)
        self.cut_after: dict[str, int] = {}
        self.stall_after: dict[str, int] = {}
        self.corrupt_once: set[str] = set()
        self.listed_size: dict[str, int] = {}
        self.listed_sha256: dict[str, str] = {}
        self.missing: set[str] = set()
        self.delay_s = 0.0
        self.log: list[tuple[str, str, str | None]] = []  # (method, file or API, Range header): hub and CDN
        self.served = collections.Counter()  # body bytes sent per file
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.servers = [self._serve(self.handle_hub), self._serve(self.handle_cdn)]
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_port}" for s in self.servers)

    def _serve(self, route) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"route": staticmethod(route)}))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return server

    # --- what the tests look at

    def gets(self, name: str) -> list[str | None]:
        """The Range header of every GET of `name`'s bytes, in order."""
        return [rng for method, n, rng in self.log if method == "GET" and n == name]

    def requests(self, name: str) -> list[str]:
        """The method of every request about `name` (HEAD to the hub, GET to the CDN), in order."""
        return [method for method, n, _ in self.log if n == name]

    # --- metadata, as the listing and the HEAD answer both give it

    def size(self, name: str) -> int:
        return self.listed_size.get(name, len(self.files[name]))

    def sha256(self, name: str) -> str:
        return self.listed_sha256.get(name, hashlib.sha256(self.files[name]).hexdigest())

    def pointer_blob_id(self, name: str) -> str:
        """The git blob id of the LFS pointer file that the repo keeps in git for `name`."""
        pointer = (f"version https://git-lfs.github.com/spec/v1\n"
                   f"oid sha256:{self.sha256(name)}\nsize {self.size(name)}\n")
        return hashlib.sha1(f"blob {len(pointer)}\0{pointer}".encode()).hexdigest()

    def listing(self) -> dict:
        siblings = [{"rfilename": "README.md", "size": 5, "blobId": "0" * 40}]
        for name in sorted(self.files):
            siblings.append({"rfilename": name, "size": self.size(name), "blobId": self.pointer_blob_id(name),
                             "lfs": {"size": self.size(name), "sha256": self.sha256(name), "pointerSize": 134}})
        return {"id": self.repo_id, "sha": self.commit, "private": False, "siblings": siblings}

    # --- the hub: listing and resolve

    def handle_hub(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(req.path).path)
        api, resolve = f"/api/datasets/{self.repo_id}/revision/", f"/datasets/{self.repo_id}/resolve/"
        if path.startswith(api):
            self._record(req, self.API)
            if self._injected_failure(req, self.API):
                return
            if path[len(api):] not in ("main", self.commit):
                return self._error(req, 404, "RevisionNotFound")
            return self._send(req, 200, json.dumps(self.listing()).encode(), {"Content-Type": "application/json"})
        if not path.startswith(resolve):
            return self._error(req, 404, "RepoNotFound")
        revision, _, name = path[len(resolve):].partition("/")
        self._record(req, name)
        if revision not in ("main", self.commit):
            return self._error(req, 404, "RevisionNotFound")
        if name not in self.files or name in self.missing:
            return self._error(req, 404, "EntryNotFound", {"X-Repo-Commit": self.commit})
        real_sha256 = hashlib.sha256(self.files[name]).hexdigest()
        self._send(req, 302, b"", {
            "Location": f"{self.cdn_url}/lfs/{real_sha256}?name={urllib.parse.quote(name)}",
            "X-Repo-Commit": self.commit, "ETag": f'"{self.pointer_blob_id(name)}"',
            "X-Linked-Size": str(self.size(name)), "X-Linked-Etag": f'"{self.sha256(name)}"'})

    # --- the CDN: the bytes, by content hash

    def handle_cdn(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        url = urllib.parse.urlsplit(req.path)
        name = urllib.parse.parse_qs(url.query).get("name", [""])[0]
        match = re.fullmatch(r"/lfs/([0-9a-f]{64})", url.path)
        if name not in self.files or not match or hashlib.sha256(self.files[name]).hexdigest() != match[1]:
            return self._error(req, 404, None)
        self._record(req, name)
        if body and self._injected_failure(req, name):
            return
        data = self.files[name]
        headers = {"ETag": f'"{match[1]}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        start, status = 0, 200
        if req.headers.get("Range"):
            start, status = int(re.fullmatch(r"bytes=(\d+)-", req.headers["Range"])[1]), 206
            if start >= len(data):
                return self._error(req, 416, None, {"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if not body:
            return self._send(req, status, b"", headers, length=len(data) - start)
        self._send_file(req, status, name, data[start:], headers)

    def _send_file(self, req, status: int, name: str, payload: bytes, headers: dict) -> None:
        with self.lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            cut = self.cut_after.pop(name, None)
            stall = self.stall_after.pop(name, None)
            if name in self.corrupt_once:
                self.corrupt_once.discard(name)
                payload = payload[:-1] + bytes([payload[-1] ^ 0xFF])
        try:
            req.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(payload))}.items():
                req.send_header(key, value)
            req.end_headers()
            time.sleep(self.delay_s)
            sent = payload[:cut] if cut is not None else payload[:stall] if stall is not None else payload
            req.wfile.write(sent)
            req.wfile.flush()
            with self.lock:
                self.served[name] += len(sent)
            if stall is not None:
                self.closing.wait()  # hangs, as a dead server would, until the test is over
            if cut is not None or stall is not None:
                req.close_connection = True  # the client sees a body shorter than Content-Length
        finally:
            with self.lock:
                self.inflight -= 1

    # --- plumbing

    def _record(self, req, name: str) -> None:
        with self.lock:
            self.log.append((req.command, name, req.headers.get("Range")))

    def _injected_failure(self, req, name: str) -> bool:
        with self.lock:
            status = self.failures[name].pop(0) if self.failures[name] else None
        if status is not None:
            self._error(req, status, None)
        return status is not None

    def _error(self, req, status: int, code: str | None, headers: dict | None = None) -> None:
        self._send(req, status, b'{"error": "injected"}',
                   {"Content-Type": "application/json", **({"X-Error-Code": code} if code else {}), **(headers or {})})

    def _send(self, req, status: int, payload: bytes, headers: dict, length: int | None = None) -> None:
        req.send_response(status)
        for key, value in headers.items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(payload) if length is None else length))
        req.end_headers()
        if payload:
            req.wfile.write(payload)

    def close(self) -> None:
        self.closing.set()
        for server in self.servers:
            server.shutdown()
            server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    route = None  # set per server: FakeHub.handle_hub or FakeHub.handle_cdn

    def do_GET(self):
        self.route(self, body=True)

    def do_HEAD(self):
        self.route(self, body=False)

    def log_message(self, *args):
        pass
