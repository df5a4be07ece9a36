"""Content-addressed artifacts: hashing properties, manifests that catch damage, one writer per directory."""

import ast
import json
import multiprocessing
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.artifacts import (artifact_dir, artifact_hash, artifact_lock, code_version, discard, module_files,
                             module_hashes, normalized_source, read_manifest, ref_from_manifest, verify,
                             write_manifest)
from flows.config import PipelineConfig
from flows.plan import plan_pipeline
from flows.stages import OUTSIDE_THE_KEY, STAGES, get_stage

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


def _copy_of_nanopipe(tmp_path: Path) -> Path:
    import nanopipe
    root = tmp_path / "nanopipe"
    shutil.copytree(Path(nanopipe.__file__).parent, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_comments_docstrings_and_log_messages_do_not_count(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""doc"""\nimport os\n\ndef f(x):\n    """what f does"""\n    print0(f"x is {x}")  # say it\n'
                      '    logger.info("done")\n    return x + 1\n')
    first = normalized_source(module)
    _edit(module, "what f does", "what f really does")
    _edit(module, "x is {x}", "the value of x: {x}")
    _edit(module, "# say it", "# tell the user")
    _edit(module, '"done"', '"finished"')
    assert normalized_source(module) == first
    _edit(module, "x + 1", "x + 2")
    assert normalized_source(module) != first


def _source_key(tmp_path: Path, body: str) -> str:
    module = tmp_path / "m.py"
    module.write_text(f'"""doc"""\nimport math\nimport torch\n\ndef f(a, b, x, y):\n    """what f does"""\n{body}')
    return normalized_source(module)


@pytest.mark.parametrize("before, after", [
    ("    return math.log(2)\n", "    return math.log(10)\n"),
    ("    z = math.log(2) * a  # bits\n    return z\n", "    z = math.log(10) * a  # bits\n    return z\n"),
    ("    return torch.log(x)\n", "    return torch.log(y)\n"),
    ("    y = error(a)\n    return y\n", "    y = error(b)\n    return y\n"),
    ("    logger.info(str(warning(a)))\n    return warning(a)\n", "    logger.info(str(warning(a)))\n    return warning(b)\n"),
    ("    print(a, file=out)\n", "    print(b, file=out)\n"),          # data written to a file
    ("    self.log_step(self.train_step(a))\n", "    self.log_step(self.train_step(b))\n"),
], ids=["math.log", "math.log-in-expression", "torch.log", "error-helper", "warning-helper", "print-to-file",
        "log_step-runs-a-step"])
def test_a_call_whose_value_is_used_counts_whatever_its_name(tmp_path, before, after):
    """Issue 23: only message statements lose their arguments; `math.log(2)` and `math.log(10)` differ."""
    assert _source_key(tmp_path, before) != _source_key(tmp_path, after)


@pytest.mark.parametrize("before, after", [
    ('    logger.info("a")\n', '    logger.info("b")\n'),
    ('    print0(f"loss {x:.4f}")\n', '    print0(f"val loss: {x:.3f} after {y} steps")\n'),
    ('    print("a", flush=True)\n', '    print("b", a, flush=True)\n'),
    ('    print("a", file=sys.stderr)\n', '    print("b", file=sys.stderr)\n'),
    ('    logging.warning("a %s", x)\n', '    logging.warning("b %s", y)\n'),
    ('    warnings.warn("a")\n', '    warnings.warn("b")\n'),
    ('    self.wandb.log({"loss": x})\n', '    self.wandb.log({"train/loss": x, "y": y})\n'),
    ('    class C:\n        """a"""\n        k = 1  # a\n', '    class C:\n        """b"""\n        k = 1  # b\n'),
], ids=["logger.info", "print0", "print", "print-stderr", "logging.warning", "warnings.warn", "wandb.log",
        "docstring-and-comment"])
def test_editing_a_message_statement_does_not_count(tmp_path, before, after):
    assert _source_key(tmp_path, before + "    return x\n") == _source_key(tmp_path, after + "    return x\n")


def test_a_trained_model_ignores_log_lines_and_eval_prompts_but_not_model_code(tmp_path):
    """Issue: editing a log line or a sample prompt must not retrain; editing the model or optimizer must."""
    root = _copy_of_nanopipe(tmp_path)
    code = get_stage("base_train").code
    hashes = lambda: module_hashes(code, root)
    first = hashes()
    stage = root / "stages" / "base_train.py"
    text = stage.read_text()
    line = next(l for l in text.splitlines() if "print0(f\"" in l)
    stage.write_text(text.replace(line, line.replace('print0(f"', 'print0(f"[edited] '), 1))
    for path in root.rglob("*.py"):          # the sample prompts, wherever they live, are not base_train's code
        if "SAMPLE_PROMPTS = " in path.read_text():
            _edit(path, "SAMPLE_PROMPTS = ", "SAMPLE_PROMPTS = ['An edited prompt'] + ")
            break
    else:
        raise AssertionError("no SAMPLE_PROMPTS found")
    assert hashes() == first
    # the download client is not what decides the text: editing it keeps the tokenizer and the model
    tok_code = get_stage("tok_train").code
    tok_first = module_hashes(tok_code, root)
    (root / "data" / "hub.py").write_text((root / "data" / "hub.py").read_text() + "\nRETRY_NOTE = 'edited'\n")
    assert module_hashes(tok_code, root) == tok_first and hashes() == first
    _edit(root / "gpt.py", "import ", "import math as _unused\nimport ")
    after_gpt = hashes()
    assert after_gpt["nanopipe.gpt"] != first["nanopipe.gpt"]
    assert {m for m in first if first[m] != after_gpt[m]} == {"nanopipe.gpt"}
    _edit(root / "optim.py", "import ", "import math as _unused\nimport ")
    assert hashes()["nanopipe.optim"] != first["nanopipe.optim"]


def test_every_stage_declares_modules_that_exist_and_its_own():
    for stage in STAGES:
        assert stage.module in stage.code
        assert module_hashes(stage.code), stage.name   # raises for a module that does not exist


def imported_nanopipe_modules(module: str) -> set[str]:
    """The nanopipe modules whose code runs when `module` is imported and run: read from the sources (imports
    inside functions included), following each import to the modules it imports in turn."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        files = module_files(name) if name != "nanopipe" else []
        for path in files if len(files) == 1 else [p for p in files if p.name == "__init__.py"][:1]:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    todo += [a.name for a in node.names if a.name.split(".")[0] == "nanopipe"]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "nanopipe":
                    todo.append(node.module)
                    for alias in node.names:   # `from nanopipe.x import y`: y may be a module of its own
                        try:
                            module_files(f"{node.module}.{alias.name}")
                            todo.append(f"{node.module}.{alias.name}")
                        except ValueError:
                            pass
    return seen


def test_every_module_a_stage_runs_is_in_its_code_or_declared_outside_the_key():
    """Moving model code into a new module must not take it out of the cache key: the stage would then reuse
    an artifact that the edited code no longer produces."""
    def covered(name: str, modules) -> bool:   # the module itself, or a package holding it (not the root)
        parts = name.split(".")
        return name in modules or any(".".join(parts[:i]) in modules for i in range(2, len(parts)))
    for stage in STAGES:
        missing = sorted(m for m in imported_nanopipe_modules(stage.module)
                         if not covered(m, stage.code) and not covered(m, OUTSIDE_THE_KEY))
        assert missing == [], (f"{stage.name} runs {missing}: add them to its code in flows/stages.py, or to "
                               f"OUTSIDE_THE_KEY if they do not decide what the stage produces")


def test_code_version_names_the_package_version():
    import nanopipe
    version = code_version(get_stage("tok_train").code)
    assert version.startswith(nanopipe.__version__ + "+") and version != code_version(get_stage("base_train").code)


# -----------------------------------------------------------------------------
# Hashes of a planned pipeline

def _plans(home, **overrides):
    values = {"preset": "demo-cpu", **overrides}
    return {p.stage: p for p in plan_pipeline(PipelineConfig.model_validate(values), home=home)}


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
                  resources={"nproc_per_node": 1, "timeout_minutes": 5, "retries": 0})
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


# -----------------------------------------------------------------------------
# Why a stage will run again

def _produced(plan) -> None:
    """Record `plan` as produced: its directory with a manifest like the stage task writes."""
    Path(plan.out_dir).mkdir(parents=True, exist_ok=True)
    Path(plan.out_dir, "metrics.json").write_text("{}")
    write_manifest(plan.artifact_dir, stage=plan.stage, digest=plan.hash, config=plan.config, upstream=plan.upstream,
                   metrics={}, timings={}, extra={"code": plan.code, "code_version": plan.code_version,
                                                  "semantic_config": plan.semantic_config, "data": plan.data})


def test_status_says_which_config_field_code_module_or_upstream_changed(tmp_path):
    from flows.plan import rerun_reasons
    before = _plans(tmp_path)
    assert rerun_reasons(before["base_train"]) == ["never produced before"]
    for plan in before.values():
        _produced(plan)
    deeper = _plans(tmp_path, base_train={"depth": 6})["base_train"]
    assert rerun_reasons(deeper) == ["config field depth changed (4 -> 6)"]
    new_vocab = _plans(tmp_path, tok_train={"vocab_size": 1024})
    assert rerun_reasons(new_vocab["tok_train"]) == ["config field vocab_size changed (2048 -> 1024)"]
    assert rerun_reasons(new_vocab["base_train"]) == ["upstream tok_train changed"]
    # a manifest written by other code: its module hashes differ from today's
    manifest_path = Path(before["base_train"].artifact_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["code"]["nanopipe.gpt"] = "0" * 16
    manifest_path.write_text(json.dumps(manifest))
    assert "code of nanopipe.gpt changed" in rerun_reasons(deeper)


def test_new_local_shards_in_the_same_directory_give_new_artifacts(tmp_path):
    from flows.plan import rerun_reasons
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "shard_00000.parquet").write_bytes(b"a" * 10)
    (shards / "val.parquet").write_bytes(b"b" * 10)
    data = {"data": {"data_source": "local", "data_dir": str(shards)}}
    before = _plans(tmp_path, **data)
    assert before["tok_train"].data and before["tok_eval"].data
    for plan in before.values():
        _produced(plan)
    assert _plans(tmp_path, **data) == before                     # nothing changed: same addresses
    (shards / "shard_00001.parquet").write_bytes(b"c" * 10)       # more text prepared into the same directory
    after = _plans(tmp_path, **data)
    assert after["tok_train"].hash != before["tok_train"].hash and after["base_train"].hash != before["base_train"].hash
    assert rerun_reasons(after["tok_train"]) == ["the local data shards changed"]
    assert _plans(tmp_path)["tok_train"].data is None              # builtin text is made by code: no fingerprint
