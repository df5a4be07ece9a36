"""
Recompute a stage without ever losing the artifact it replaces.

`recompute_from=X` builds X's new artifact beside the good one, in `<artifact>.recompute` (same inputs, same
hash, another directory), and swaps it in only once its manifest verifies. Until then the good artifact stays
where it was, complete and usable: a recompute that fails or is cancelled leaves it in place (`nanopipe
status` shows it complete, and the unfinished recompute beside it). The staging directory records the flow
run that owns it (`.recompute-run`, outside the manifest): a retry of that same flow run resumes its own
recompute from the checkpoints there; another run's leftovers are discarded first (a recompute asked anew
starts afresh), unless they already form a complete artifact of this hash.

    staged = stage_beside(plan, run_id, log)      # the plan, writing into <artifact>.recompute
    ...run the stage on `staged`...
    ref = swap_in(plan, staged_ref, log)          # the verified new artifact replaces the old one
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from flows.artifacts import MANIFEST, ArtifactRef, artifact_lock, discard, read_manifest, verify
from flows.plan import StagePlan
from nanopipe.common import atomic_write_json

SUFFIX = ".recompute"
OWNER_FILE = ".recompute-run"   # hidden: never listed in the artifact's manifest


def staging_dir(artifact_dir: str | os.PathLike) -> Path:
    """Where a recompute of this artifact is built: `<artifact>.recompute`, beside it."""
    directory = Path(artifact_dir)
    return directory.with_name(directory.name + SUFFIX)


def staging_owner(artifact_dir: str | os.PathLike) -> str | None:
    """The flow run whose recompute the staging directory holds, if there is one."""
    try:
        return (staging_dir(artifact_dir) / OWNER_FILE).read_text().strip() or None
    except OSError:
        return None


def stage_beside(plan: StagePlan, run_id: str, log: Callable[[str], None]) -> StagePlan:
    """The plan of a recompute: writing into the staging directory, which is made ready for this flow run (its
    own earlier attempt kept, so the stage resumes from its checkpoints; another run's discarded)."""
    staging = staging_dir(plan.artifact_dir)
    with artifact_lock(staging, on_wait=log):
        owner = staging_owner(plan.artifact_dir)
        if staging.exists() and owner != run_id and not verify(staging, plan.hash):
            log(f"{plan.stage}: discarding an unfinished recompute of flow run {owner or '?'} in {staging}")
            discard(staging)
        if staging.exists() and owner == run_id:
            log(f"{plan.stage}: continuing this run's recompute in {staging}")
        staging.mkdir(parents=True, exist_ok=True)
        (staging / OWNER_FILE).write_text(f"{run_id}\n")
    final, out = str(plan.artifact_dir), str(plan.out_dir)
    staged_out = str(staging / Path(out).relative_to(final))
    args = [f"--out_dir={staged_out}" if a == f"--out_dir={out}" else a for a in plan.args]
    assert args != plan.args, f"{plan.stage}: no --out_dir={out} among its flags {plan.args}"
    return plan.model_copy(update={"artifact_dir": str(staging), "out_dir": staged_out, "args": args,
                                   "config": {**plan.config, "out_dir": staged_out}})


def swap_in(plan: StagePlan, ref: ArtifactRef, log: Callable[[str], None]) -> ArtifactRef:
    """Replace the artifact by its recompute, once that verifies; the reference to it in its final place.
    The manifest's own record of where it was written (config, command) is rewritten to the final place."""
    final, staging = Path(plan.artifact_dir), staging_dir(plan.artifact_dir)
    check = verify(staging, plan.hash)
    if not check:
        raise RuntimeError(f"{plan.stage}: the recompute in {staging} does not verify ({check.reason}); the "
                           f"artifact in {final} was kept")
    manifest = read_manifest(staging)
    text = json.dumps(manifest).replace(json.dumps(str(staging))[1:-1], json.dumps(str(final))[1:-1])
    atomic_write_json(staging / MANIFEST, json.loads(text))
    with artifact_lock(final, on_wait=log):
        old = final.with_name(f".{final.name}.replaced-{uuid.uuid4().hex[:8]}")
        try:
            if final.exists():
                os.replace(final, old)   # two renames: a reader never sees a half-deleted artifact
            os.replace(staging, final)
        except BaseException:
            # stopped between the renames (the run's cancel or Ctrl-C raises wherever the flow is): the old
            # artifact goes back where it was, and the recompute stays in staging
            if old.exists() and not final.exists():
                os.replace(old, final)
            raise
        (final / OWNER_FILE).unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)
    log(f"{plan.stage}: the recomputed artifact verified and replaced the previous one in {final}")
    return ref.model_copy(update={"path": str(final)})
