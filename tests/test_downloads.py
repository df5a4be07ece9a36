"""nanopipe.remote: files fetched from a URL into NANOPIPE_HOME (the reference's identity conversations and
word list), served here by a loopback HTTP server: cached, checked against size and sha256, written atomically,
one clear line when the network is not there, and reported by planning before any stage runs."""

import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nanopipe import remote
from nanopipe.remote import RemoteFile, RemoteFileError, availability_problem, fetch, remote_file

IDENTITY = b"".join(json.dumps([{"role": "user", "content": f"who are you {i}?"},
                                {"role": "assistant", "content": "I am nanopipe."}]).encode() + b"\n"
                    for i in range(3))


class Server:
    """A loopback HTTP server of {path: bytes}; `truncate` paths send half their body under the full length."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.truncate, self.requests = dict(files), set(), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, body_too: bool):
                server.requests.append((self.command, self.path))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if body_too:
                    self.wfile.write(body[:len(body) // 2] if self.path in server.truncate else body)

            def do_GET(self):
                self._answer(True)

            def do_HEAD(self):
                self._answer(False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def gets(self) -> int:
        return sum(1 for method, _ in self.requests if method == "GET")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port_url(path: str) -> str:
    """A loopback URL nothing listens on: what an offline machine sees (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


def leftovers(folder) -> list[str]:
    """Files in a cache folder other than the lock: a partial download would show up here."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.is_dir() else []


@pytest.fixture
def words(shared_dir):
    path = shared_dir / "data" / "words" / "words_alpha.txt"
    if not path.is_file():
        pytest.skip(f"the word list is not in the shared data folder: expected {path}")
    return path.read_bytes()


def pinned_word_list(url: str) -> RemoteFile:
    return RemoteFile(url, "words_alpha.txt", "words", remote.WORD_LIST.size, remote.WORD_LIST.sha256)


# -----------------------------------------------------------------------------

def test_the_pinned_word_list_is_the_one_in_shared_data(words):
    assert (len(words), hashlib.sha256(words).hexdigest()) == (remote.WORD_LIST.size, remote.WORD_LIST.sha256)


def test_word_list_is_downloaded_once_checked_and_served_from_the_cache(home, words, monkeypatch):
    from nanopipe.tasks import spelling

    with Server({"/words_alpha.txt": words}) as server:
        url = server.url("/words_alpha.txt")
        # 'download' means the public list: point it at the loopback copy, with the real list's size and sha256
        monkeypatch.setattr(spelling, "WORD_LIST_URL", url)
        monkeypatch.setitem(remote.KNOWN_FILES, url, pinned_word_list(url))
        loaded = spelling.load_words("download")
        assert (home / "words" / "words_alpha.txt").read_bytes() == words
        assert len(loaded) == 370_099 and loaded[:3] == ["a", "aa", "aaa"]
        assert spelling.load_words("download") == loaded and server.gets() == 1   # the cached copy, checked
        (home / "words" / "words_alpha.txt").write_bytes(words[:-1] + b"z")       # damaged on disk
        assert spelling.load_words("download") == loaded and server.gets() == 2   # fetched again


def test_a_download_with_the_wrong_checksum_is_refused_and_leaves_no_file(home, words):
    tampered = words.replace(b"strawberry", b"strawberrz", 1)
    assert len(tampered) == len(words) and tampered != words
    with Server({"/words_alpha.txt": tampered, "/short.txt": words[:100]}) as server:
        with pytest.raises(RemoteFileError, match=r"refusing the download .*: sha256 [0-9a-f]{64}, expected 2d8c"):
            fetch(pinned_word_list(server.url("/words_alpha.txt")))
        with pytest.raises(RemoteFileError, match="refusing the download .*: 100 bytes, expected 4234861"):
            fetch(pinned_word_list(server.url("/short.txt")))
    assert leftovers(home / "words") == []


def test_a_cut_transfer_leaves_no_partial_file(home):
    with Server({"/identity_conversations.jsonl": IDENTITY}) as server:
        server.truncate.add("/identity_conversations.jsonl")
        file = remote_file(server.url("/identity_conversations.jsonl"))
        cut = f"the connection ended after {len(IDENTITY) // 2} of {len(IDENTITY)} bytes"
        with pytest.raises(RemoteFileError, match=f"cannot download .*: {cut}"):
            fetch(file)
    assert leftovers(home / "downloads") == []


def test_offline_is_one_clear_line_and_writes_nothing(home):
    file = remote_file(closed_port_url("/identity_conversations.jsonl"))
    with pytest.raises(RemoteFileError) as err:
        fetch(file)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"cannot download {file.url}: ")
    assert "offline?" in message and str(file.target()) in message
    problem = availability_problem(file)
    assert problem.startswith(f"cannot reach {file.url}: ") and "offline?" in problem
    assert leftovers(home / "downloads") == []
    with Server({}) as server:  # an HTTP error says which
        with pytest.raises(RemoteFileError, match="HTTP Error 404"):
            fetch(remote_file(server.url("/missing.jsonl")))


def test_an_unpinned_file_is_recorded_at_first_download_and_verified_afterwards(home):
    from nanopipe.tasks.customjson import CustomJSON

    with Server({"/identity_conversations.jsonl": IDENTITY}) as server:
        url = server.url("/identity_conversations.jsonl")
        task = CustomJSON(url)
        assert len(task) == 3 and task[2]["messages"][0]["content"] == "who are you 2?"
        file = remote_file(url)
        record = json.loads(file.record_path().read_text())
        assert (record["url"], record["size"], record["sha256"]) == (url, len(IDENTITY),
                                                                     hashlib.sha256(IDENTITY).hexdigest())
        assert len(CustomJSON(url)) == 3 and server.gets() == 1
        # the source changes and the cached copy is lost: the new bytes do not match the record
        server.files["/identity_conversations.jsonl"] = IDENTITY.replace(b"nanopipe", b"somebody")
        file.target().unlink()
        with pytest.raises(RemoteFileError, match=r"refusing the download .*: sha256 [0-9a-f]{64}, expected "
                                                  + hashlib.sha256(IDENTITY).hexdigest()):
            fetch(file)
    assert not file.target().exists()


def test_urls_with_the_same_file_name_do_not_share_a_cache_entry():
    a = remote_file("https://example.org/a/identity_conversations.jsonl")
    b = remote_file("https://example.org/b/identity_conversations.jsonl")
    assert a.name != b.name and a.name.endswith("-identity_conversations.jsonl")
    assert remote_file(remote.IDENTITY_CONVERSATIONS.url) == remote.IDENTITY_CONVERSATIONS


# -----------------------------------------------------------------------------
# Presets and planning

def test_gpu_presets_name_the_reference_chat_data_and_cpu_presets_stay_offline():
    from flows.config import PipelineConfig
    from flows.presets import PRESETS

    for name in PRESETS:
        cfg = PipelineConfig(preset=name)
        data = (cfg.mid_train.identity_path, cfg.chat_sft.identity_path, cfg.mid_train.spelling_words,
                cfg.chat_sft.spelling_words, cfg.chat_eval.spelling_words_path)
        if name.startswith(("demo", "cpu")):
            assert data == (None, None, "builtin", "builtin", None), name
        else:
            assert data == (remote.IDENTITY_CONVERSATIONS.url,) * 2 + ("download",) * 3, name
    assert remote.IDENTITY_CONVERSATIONS.url == ("https://karpathy-public.s3.us-west-2.amazonaws.com/"
                                                 "identity_conversations.jsonl")


def test_the_speedrun_plans_its_chat_stages_on_the_reference_data(home):
    from flows.config import PipelineConfig
    from flows.plan import plan_pipeline

    data = {p.stage: [a for a in p.args if a.startswith(("--identity_path", "--spelling_words"))]
            for p in plan_pipeline(PipelineConfig(preset="speedrun-d20"), home=home)}
    identity = f"--identity_path={remote.IDENTITY_CONVERSATIONS.url}"
    assert data["mid_train"] == data["chat_sft"] == [identity, "--spelling_words=download"]
    assert data["chat_eval_mid"] == data["chat_eval_sft"] == ["--spelling_words_path=download"]


def test_planning_reports_a_download_it_cannot_reach_before_any_stage_runs(home, monkeypatch):
    from flows import plan as planning
    from flows.config import PipelineConfig

    monkeypatch.setattr(planning, "dry_run", lambda *a, **k: pytest.fail("a dry run started before the input check"))
    with Server({"/identity_conversations.jsonl": IDENTITY, "/words.txt": b"apple\nbanana\n"}) as server:
        identity, words = server.url("/identity_conversations.jsonl"), server.url("/words.txt")
        values = {"preset": "demo-cpu", "resources": {"nproc_per_node": 1},
                  "mid_train": {"identity_path": identity, "spelling_words": words},
                  "chat_eval": {"task": ["SpellingBee"], "spelling_words_path": words}}
        plans = planning.plan_pipeline(PipelineConfig.model_validate(values), home=home)
        planning.check_inputs(plans)  # reachable: nothing to report, nothing downloaded
        assert server.gets() == 0 and server.requests
    with pytest.raises(planning.PlanError) as err:  # the same plans once the network is gone
        planning.preflight(plans)
    problems = str(err.value).split("; ")
    assert [p.split(": cannot reach ")[0] for p in problems] == [
        "stage mid_train: --mid_train.identity_path", "stage mid_train: --mid_train.spelling_words",
        "stage chat_eval_mid: --chat_eval.spelling_words_path", "stage chat_eval_sft: --chat_eval.spelling_words_path"]
    assert all("offline?" in p for p in problems)
