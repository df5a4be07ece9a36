"""Content-addressed artifacts: hashing properties, manifests that catch damage, one writer per directory."""

import json
import multiprocessing
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.artifacts import (artifact_dir, artifact_hash, artifact_lock, code_version, discard, module_closure,
                             read_manifest, ref_from_manifest, source_hash, verify, write_manifest)
from flows.config import PipelineConfig
from flows.plan import plan_pipeline

hashes = st.text(alphabet="0123456789abcdef", min_size=16, max_size=16)
upstreams = st.dictionaries(st.sampled_from(["tokenizer_dir", "checkpoint_dir", "eval_dir"]), hashes, max_size=3)


# -----------------------------------------------------------------------------
# The hash

@given(stage=st.sampled_from(["tok_train", "base_train"]), digest=hashes, upstream=upstreams, code=st.text(max_size=20))
def test_same_inputs_same_hash(stage, digest, upstream, code):
    reordered = dict(reversed(list(upstream.items())))
    assert artifact_hash(stage, digest, upstream, code) == artifact_hash(stage, digest, reordered, code)


@settings(max_examples=200)
@given(base=st.tuples(st.sampled_from(["tok_train", "base_train"]), hashes, upstreams, st.text(max_size=8)),
       other=st.tuples(st.sampled_from(["tok_train", "base_train"]), hashes, upstreams, st.text(max_size=8)))
def test_any_change_gives_a_new_hash(base, other):
    if base != other:
        assert artifact_hash(*base) != artifact_hash(*other)


def _package(tmp_path: Path) -> Path:
    """pkg/{__init__,common,model,unrelated}.py and pkg/stages/{__init__,train,tok}.py with varied imports."""
    root = tmp_path / "pkg"
    (root / "stages").mkdir(parents=True)
    files = {
        "__init__.py": "__version__ = '1'\n",
        "common.py": "import os\n",
        "model.py": "from pkg.common import os\n",
        "unrelated.py": "x = 1\n",
        "stages/__init__.py": "",
        "stages/tok.py": "from pkg import common\n",
        "stages/train.py": "from .. import model\ndef f():\n    import pkg.stages.tok\n",
    }
    for rel, text in files.items():
        (root / rel).write_text(text)
    return root


def _closure(root, module):
    return sorted(p.relative_to(root).as_posix() for p in module_closure(module, root, package="pkg"))


def test_a_stage_hashes_the_modules_it_imports_and_no_others(tmp_path):
    root = _package(tmp_path)
    assert _closure(root, "pkg.stages.tok") == ["__init__.py", "common.py", "stages/__init__.py", "stages/tok.py"]
    # relative imports, imports inside functions, and what those import in turn
    assert _closure(root, "pkg.stages.train") == ["__init__.py", "common.py", "model.py", "stages/__init__.py",
                                                  "stages/tok.py", "stages/train.py"]


def test_source_hash_follows_the_sources_it_covers(tmp_path):
    root = _package(tmp_path)
    tok = lambda: source_hash(module_closure("pkg.stages.tok", root, package="pkg"), root)
    train = lambda: source_hash(module_closure("pkg.stages.train", root, package="pkg"), root)
    first_tok, first_train = tok(), train()
    assert (tok(), train()) == (first_tok, first_train)
    (root / "unrelated.py").write_text("x = 2\n")
    assert (tok(), train()) == (first_tok, first_train)
    (root / "model.py").write_text("from pkg.common import os  # changed\n")
    assert tok() == first_tok and train() != first_train
    (root / "common.py").write_text("import sys\n")
    assert tok() != first_tok


def test_code_version_names_the_package_version():
    import nanopipe
    version = code_version("nanopipe.stages.tok_train")
    assert version.startswith(nanopipe.__version__ + "+") and version != code_version("nanopipe.stages.base_train")


# -----------------------------------------------------------------------------
# Hashes of a planned pipeline

def _plans(home, **overrides):
    values = {"preset": "demo-cpu", **overrides}
    return {p.step: p for p in plan_pipeline(PipelineConfig.model_validate(values), home=home)}


def test_planning_is_deterministic_and_home_only_moves_the_directory(tmp_path):
    a, b = _plans(tmp_path / "h1"), _plans(tmp_path / "h1")
    c = _plans(tmp_path / "h2")
    assert a == b
    assert {k: p.hash for k, p in a.items()} == {k: p.hash for k, p in c.items()}
    assert a["tok_train"].artifact_dir != c["tok_train"].artifact_dir
    assert Path(a["tok_train"].artifact_dir).name == f"v2048-{a['tok_train'].hash}"


def test_a_semantic_change_moves_the_stage_and_everything_downstream(tmp_path):
    base = _plans(tmp_path)
    changed = _plans(tmp_path, tok_train={"vocab_size": 1024})
    assert changed["tok_train"].hash != base["tok_train"].hash
    assert changed["tok_eval"].hash != base["tok_eval"].hash   # its input changed
    assert changed["tok_eval"].config["tokenizer_dir"].startswith(changed["tok_train"].artifact_dir)


def test_a_downstream_change_leaves_upstream_alone(tmp_path):
    base = _plans(tmp_path)
    changed = _plans(tmp_path, tok_eval={"val_chars": 1000})
    assert changed["tok_train"].hash == base["tok_train"].hash
    assert changed["tok_eval"].hash != base["tok_eval"].hash


def test_non_semantic_fields_and_resources_do_not_change_hashes(tmp_path):
    base = _plans(tmp_path)
    same = _plans(tmp_path, tok_train={"run": "my-wandb-run", "log_every_chars": 12345},
                  resources={"nproc_per_node": 8, "timeout_minutes": 5, "retries": 0})
    assert {k: p.hash for k, p in same.items()} == {k: p.hash for k, p in base.items()}


def test_explicit_paths_given_by_the_user_are_replaced_by_the_wiring(tmp_path):
    base = _plans(tmp_path)
    other = _plans(tmp_path, tok_eval={"tokenizer_dir": "/somewhere/else", "out_dir": "/elsewhere"})
    assert other["tok_eval"].hash == base["tok_eval"].hash
    assert other["tok_eval"].config["tokenizer_dir"] == base["tok_eval"].config["tokenizer_dir"]
    assert other["tok_eval"].out_dir.startswith(other["tok_eval"].artifact_dir)


# -----------------------------------------------------------------------------
# Manifest and verification

def _make_artifact(tmp_path) -> Path:
    directory = artifact_dir("base_train", "d4", "0123456789abcdef", home=tmp_path)
    (directory / "out").mkdir(parents=True)
    (directory / "out" / "model_000010.pt").write_bytes(b"weights" * 100)
    (directory / "out" / "metrics.json").write_text(json.dumps({"val_bpb": 1.5}))
    (directory / "stage.log").write_text("log\n")
    (directory / ".scratch.tmp").write_text("ignored")
    write_manifest(directory, stage="base_train", digest="0123456789abcdef", config={"depth": 4}, upstream={},
                   metrics={"val_bpb": 1.5}, timings={"seconds": 2.5})
    return directory


def test_a_written_manifest_verifies_and_lists_files(tmp_path):
    directory = _make_artifact(tmp_path)
    assert verify(directory, "0123456789abcdef")
    manifest = read_manifest(directory)
    assert set(manifest["files"]) == {"out/model_000010.pt", "out/metrics.json", "stage.log"}
    assert manifest["files"]["out/model_000010.pt"]["bytes"] == 700
    assert len(manifest["files"]["stage.log"]["sha256"]) == 64
    assert {"torch", "prefect", "nanopipe", "python"} <= set(manifest["versions"])
    ref = ref_from_manifest(directory)
    assert (ref.hash, ref.metrics, ref.seconds) == ("0123456789abcdef", {"val_bpb": 1.5}, 2.5)


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / "out" / "model_000010.pt").unlink(), "missing"),
    (lambda d: (d / "out" / "model_000010.pt").write_bytes(b"weights" * 99 + b"x" * 7), "sha256"),
    (lambda d: (d / "out" / "model_000010.pt").write_bytes(b"short"), "bytes"),
    (lambda d: (d / "manifest.json").unlink(), "incomplete"),
    (lambda d: (d / "manifest.json").write_text("{not json"), "incomplete"),
])
def test_damage_is_detected_with_a_reason(tmp_path, damage, reason):
    directory = _make_artifact(tmp_path)
    damage(directory)
    check = verify(directory, "0123456789abcdef")
    assert not check and reason in check.reason


def test_a_manifest_for_another_hash_does_not_verify(tmp_path):
    directory = _make_artifact(tmp_path)
    assert not verify(directory, "fedcba9876543210")
    assert not verify(tmp_path / "nowhere")


def test_discard_removes_the_directory(tmp_path):
    directory = _make_artifact(tmp_path)
    discard(directory)
    assert not directory.exists() and not list(directory.parent.glob(f".{directory.name}*discard*"))


# -----------------------------------------------------------------------------
# One writer per directory

def _hold_lock(directory: str, hold_seconds: float, ready) -> None:
    with artifact_lock(directory):
        ready.set()
        time.sleep(hold_seconds)
        Path(directory).mkdir(parents=True, exist_ok=True)
        Path(directory, "written-by-first").write_text("done")


def test_a_second_writer_waits_for_the_first(tmp_path):
    directory = tmp_path / "artifacts" / "tok_train" / "v1-abc"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    first = ctx.Process(target=_hold_lock, args=(str(directory), 1.5, ready))
    first.start()
    assert ready.wait(60)
    waited = []
    with artifact_lock(directory, on_wait=waited.append):
        assert (directory / "written-by-first").exists(), "entered while the first writer held the lock"
    first.join()
    assert waited and "waiting" in waited[0] and "pid" in waited[0]


def test_a_dead_holder_releases_the_lock(tmp_path):
    directory = tmp_path / "artifacts" / "tok_train" / "v1-abc"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(directory), 600, ready))
    holder.start()
    assert ready.wait(60)
    holder.kill()   # SIGKILL: no cleanup runs in the holder
    holder.join()
    started = time.monotonic()
    with artifact_lock(directory):
        pass
    assert time.monotonic() - started < 5
