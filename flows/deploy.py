"""
`nanopipe deploy`: set up a Prefect server for nanopipe in one idempotent command.

1. Creates the work pools `prefect.yaml`'s deployments name that the server lacks, as `prefect work-pool
   create NAME --type process` does (Prefect's default base job template of the process worker); a pool
   that exists is left as it is.
2. Deploys every deployment of `prefect.yaml` with Prefect's own CLI, `prefect --no-prompt deploy --all`,
   from the repository root (the directory the flow runs will work in). Again later, it updates them in place.
3. Prints the worker commands for this machine: the `nanopipe` pool always, the GPU pool where a GPU is
   found, and how nodes 1, 2, ... of a multi-node stage serve `nanopipe-nodes`.

It needs a server that stays up: the configured API (PREFECT_API_URL, environment or profile) or `--server
URL`, never a temporary one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POOL_TYPE = "process"
MANUAL_POOL, GPU_POOL, NODES_POOL = "nanopipe", "nanopipe-gpu", "nanopipe-nodes"


class DeployError(RuntimeError):
    """A step of the setup failed: the message says which and why, in one line."""


def required_pools(spec: Path = REPO / "prefect.yaml") -> list[str]:
    """The work pools prefect.yaml's deployments use, in the order they first appear."""
    import yaml
    names: list[str] = []
    for deployment in yaml.safe_load(spec.read_text()).get("deployments") or []:
        name = (deployment.get("work_pool") or {}).get("name")
        if name and name not in names:
            names.append(name)
    return names


async def _ensure_pools(api_url: str, names: list[str]) -> dict[str, str]:
    """{pool: 'created' | 'exists (type T)'}; creates the missing ones as process pools."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type
    done: dict[str, str] = {}
    async with PrefectClient(api_url) as client:
        for name in names:
            try:
                pool = await client.read_work_pool(work_pool_name=name)
                done[name] = f"exists (type {pool.type})"
                continue
            except ObjectNotFound:
                pass
            template = await get_default_base_job_template_for_infrastructure_type(POOL_TYPE)
            await client.create_work_pool(WorkPoolCreate(name=name, type=POOL_TYPE, base_job_template=template))
            done[name] = "created"
    return done


def ensure_pools(api_url: str, names: list[str]) -> dict[str, str]:
    try:
        return asyncio.run(_ensure_pools(api_url, names))
    except Exception as err:   # a server that is down or refuses: one line, not a traceback
        raise DeployError(f"could not create the work pools on {api_url}: {type(err).__name__}: {err}") from None


def deploy_all(api_url: str) -> None:
    """`prefect --no-prompt deploy --all` from the repository root, its output passed through."""
    env = {**os.environ, "PREFECT_API_URL": api_url}
    done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=REPO, env=env)
    if done.returncode != 0:
        raise DeployError(f"`prefect --no-prompt deploy --all` exited {done.returncode} (its output is above)")


def gpu_count() -> int:
    """GPUs nvidia-smi lists on this machine (0 without it): torch is never imported here."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def worker_commands(api_url: str, gpus: int, pools: list[str]) -> str:
    """What to run on this machine (and on the others) once the deployments exist."""
    venv = Path(sys.prefix)
    activate = f" && . {venv}/bin/activate" if (venv / "bin" / "activate").is_file() else ""
    lines = ["", "Start the workers, each in a shell of its own on this machine:",
             f"  cd {REPO}{activate} && export PREFECT_API_URL={api_url}"]
    if MANUAL_POOL in pools:
        lines.append(f"  prefect worker start --pool {MANUAL_POOL}"
                     "            # runs started by hand (UI Run, prefect deployment run)")
    if GPU_POOL in pools:
        if gpus:
            lines.append(f"  prefect worker start --pool {GPU_POOL}        # the nightly ({gpus} GPU(s) found here)")
        else:
            lines.append(f"No GPU found here: start `prefect worker start --pool {GPU_POOL}` on a GPU node for the "
                         "nightly (its schedule is deployed paused).")
    if NODES_POOL in pools:
        lines.append(f"Multi-node stages: on node k (1, 2, ...) run `prefect worker start --pool {NODES_POOL} "
                     "--work-queue node-k`.")
    return "\n".join(lines)


def run_deploy(choice, gpu: str = "auto") -> int:
    """The whole setup against the server `choice` names (flows/local_server.ServerChoice)."""
    if choice.temporary:
        raise DeployError("nanopipe deploy needs a Prefect server that stays up: set PREFECT_API_URL (or a Prefect "
                          "profile's) to it, or give --server URL; a temporary server would vanish with this command")
    print(f"nanopipe: deploying to the Prefect API at {choice.url} ({choice.reason})", file=sys.stderr)
    pools = required_pools()
    for name, what in ensure_pools(choice.url, pools).items():
        print(f"work pool {name}: {what}")
    deploy_all(choice.url)
    gpus = {"yes": max(gpu_count(), 1), "no": 0}.get(gpu, None)
    print(worker_commands(choice.url, gpu_count() if gpus is None else gpus, pools))
    return 0
