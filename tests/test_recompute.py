"""Recompute beside the artifact (flows/recompute.py): the staging directory, whose it is, and the swap that
replaces an artifact only by one that verifies, and puts the old one back when a cancel lands between its two
renames. Files only; the flows' own tests run it end to end."""

import os
import signal
from pathlib import Path

import pytest
from prefect.exceptions import TerminationSignal

import flows.recompute as recompute_module

from flows.artifacts import read_manifest, verify, write_manifest
from flows.cancel_note import cancel_note
from flows.config import PipelineConfig
from flows.plan import plan_pipeline
from flows.recompute import OWNER_FILE, stage_beside, staging_dir, staging_owner, swap_in


@pytest.fixture
def plan(tmp_path):
    return next(p for p in plan_pipeline(PipelineConfig(preset="demo-cpu"), home=tmp_path) if p.stage == "base_train")


def produce(plan, marker: str) -> None:
    """A complete artifact of `plan` (its checkpoint directory holding `marker`)."""
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_000010.pt").write_text(marker)
    write_manifest(plan.artifact_dir, stage=plan.stage, digest=plan.hash, config=plan.config, upstream={},
                   metrics={"marker": marker}, timings={}, extra={"command": plan.command()})


def test_a_recompute_writes_beside_the_artifact_and_records_its_run(plan):
    staged = stage_beside(plan, "run-a", print)
    staging = staging_dir(plan.artifact_dir)
    assert staged.artifact_dir == str(staging) == plan.artifact_dir + ".recompute"
    assert staged.out_dir == str(staging / "checkpoints") and staged.config["out_dir"] == staged.out_dir
    assert f"--out_dir={staged.out_dir}" in staged.args and f"--out_dir={plan.out_dir}" not in staged.args
    assert staged.hash == plan.hash and staging_owner(plan.artifact_dir) == "run-a"
    assert OWNER_FILE not in read_manifest_files(staged)   # hidden: never part of the artifact


def read_manifest_files(staged) -> set[str]:
    produce(staged, "x")
    return set(read_manifest(staged.artifact_dir)["files"])


def test_a_retry_keeps_its_own_staging_and_another_run_starts_afresh(plan):
    staged = stage_beside(plan, "run-a", print)
    (Path(staged.out_dir)).mkdir(parents=True)
    (Path(staged.out_dir) / "model_000005.pt").write_text("a's checkpoint")
    stage_beside(plan, "run-a", print)   # the same flow run, retried: its checkpoints stay
    assert (Path(staged.out_dir) / "model_000005.pt").read_text() == "a's checkpoint"
    stage_beside(plan, "run-b", print)   # another run: a recompute asked anew starts afresh
    assert not Path(staged.out_dir).exists() and staging_owner(plan.artifact_dir) == "run-b"
    produce(stage_beside(plan, "run-b", print), "b's")
    stage_beside(plan, "run-c", print)   # a complete artifact of this hash is never thrown away
    assert verify(staged.artifact_dir, plan.hash)


def test_the_swap_replaces_the_artifact_only_by_one_that_verifies(plan):
    produce(plan, "old")
    staged = stage_beside(plan, "run-a", print)
    Path(staged.out_dir).mkdir(parents=True)
    (Path(staged.out_dir) / "model_000010.pt").write_text("half")
    with pytest.raises(RuntimeError, match="does not verify.*was kept"):
        swap_in(plan, ref_of(staged), print)
    assert read_manifest(plan.artifact_dir)["metrics"] == {"marker": "old"} and verify(plan.artifact_dir, plan.hash)

    produce(staged, "new")
    ref = swap_in(plan, ref_of(staged), print)
    assert ref.path == plan.artifact_dir and verify(plan.artifact_dir, plan.hash)
    manifest = read_manifest(plan.artifact_dir)
    assert manifest["metrics"] == {"marker": "new"} and manifest["config"]["out_dir"] == plan.out_dir
    assert f"--out_dir={plan.out_dir}" in manifest["command"] and ".recompute" not in str(manifest)
    assert not staging_dir(plan.artifact_dir).exists() and not (Path(plan.artifact_dir) / OWNER_FILE).exists()
    assert [p.name for p in Path(plan.artifact_dir).parent.iterdir() if "replaced" in p.name] == []


def test_a_cancel_between_the_swaps_two_renames_puts_the_artifact_back(plan, monkeypatch):
    """The run's cancel raises wherever the flow is: between moving the old artifact aside and moving the
    recompute in, the old one goes back, and the verified recompute stays in staging."""
    produce(plan, "old")
    staged = stage_beside(plan, "run-a", print)
    produce(staged, "new")
    replace = os.replace

    def cancelled_before_the_second(src, dst):
        if Path(src) == staging_dir(plan.artifact_dir):
            raise TerminationSignal(signal.SIGTERM)
        return replace(src, dst)
    monkeypatch.setattr(recompute_module.os, "replace", cancelled_before_the_second)
    with pytest.raises(TerminationSignal):
        swap_in(plan, ref_of(staged), print)
    monkeypatch.undo()
    assert verify(plan.artifact_dir, plan.hash) and read_manifest(plan.artifact_dir)["metrics"] == {"marker": "old"}
    assert verify(staged.artifact_dir, plan.hash)   # the recompute, kept for a retry to swap in
    assert [p.name for p in Path(plan.artifact_dir).parent.iterdir() if "replaced" in p.name] == []


def ref_of(staged):
    from flows.artifacts import ArtifactRef
    return ArtifactRef(stage=staged.stage, hash=staged.hash, path=staged.artifact_dir, metrics={}, seconds=1.0)


def test_a_cancelled_recompute_says_the_artifact_stays_and_where_a_retry_resumes():
    name, message = cancel_note("base_train", 9, 8, "/h/d4-x.recompute/checkpoints", recomputing="/h/d4-x")
    assert name == "Cancelled at base_train step 9"
    assert message == ("base_train cancelled at step 9 on the run's cancel; /h/d4-x stays as it was (a plain re-run "
                       "uses it); a retry of this run resumes the recompute from its checkpoint at step 8 in "
                       "/h/d4-x.recompute/checkpoints")
    assert cancel_note("tok_eval", None, None, "/h/e/out") == (
        "Cancelled at tok_eval", "tok_eval cancelled at its start on the run's cancel; a re-run starts tok_eval "
        "afresh (no checkpoint yet)")
