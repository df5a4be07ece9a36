"""Work pools beyond `process`: the Kubernetes base job template against a real Prefect server (the pool is
created by the CLI, a deployment's job variables are validated by the server and rendered into a Job manifest
by Prefect's own templating), and the Slurm worker script (syntax, #SBATCH directives, a real worker that
stops on Slurm's SIGTERM)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.test_flows_server_support import prefect_stack

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "deployments" / "k8s" / "base-job-template.json"
SBATCH = REPO / "deployments" / "slurm" / "nanopipe-worker.sbatch"


# -----------------------------------------------------------------------------
# Kubernetes

def _job_configuration_class():
    from prefect.workers.base import BaseJobConfiguration

    class KubernetesJobConfiguration(BaseJobConfiguration):
        """The fields a Kubernetes worker reads from a pool's job_configuration (prefect-kubernetes has the
        same ones; it is needed only where that worker runs)."""

        namespace: str = "default"
        job_manifest: dict[str, Any]
        job_watch_timeout_seconds: int | None = None
        pod_watch_timeout_seconds: int = 60
        stream_output: bool = True

    return KubernetesJobConfiguration


def test_template_declares_every_variable_it_uses():
    from prefect.utilities.templating import find_placeholders
    template = json.loads(TEMPLATE.read_text())
    used = {p.name for p in find_placeholders(json.dumps(template["job_configuration"]))}
    declared = set(template["variables"]["properties"])
    assert used <= declared, f"undeclared: {used - declared}"
    assert declared - used == set(), f"declared but never used: {declared - used}"


def test_kubernetes_pool_from_the_cli_and_a_rendered_gpu_job():
    stack = prefect_stack()
    pool = f"nanopipe-k8s-{uuid.uuid4().hex[:6]}"
    # the CLI knows the `kubernetes` type from the server's registry of worker types, with or without
    # prefect-kubernetes installed here
    done = stack.prefect("work-pool", "create", pool, "--type", "kubernetes", "--base-job-template", str(TEMPLATE))
    assert done.returncode == 0, done.stdout + done.stderr
    rendered, refused_type, refused_run = asyncio.run(_render(stack.api_url, pool))
    assert "nproc_per_node" in refused_type, "the server checks job variables against the pool's schema"
    assert "image" in refused_run, "a run without an image is refused: the template requires one"

    manifest = rendered.job_manifest
    spec = manifest["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["image"] == "registry.example.com/nanopipe:abc123", "resolved from the Prefect variable"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4, "the flow run's override wins"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert container["resources"]["limits"]["memory"] == "900Gi"
    assert "cpu" not in container["resources"]["limits"], "unset optional limits are left out"
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"] == "64Gi"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "nanopipe-home", "persistentVolumeClaim": {"claimName": "nanopipe-cache"}} in spec["volumes"]
    assert {"name": "nanopipe-home", "mountPath": "/nanopipe"} in container["volumeMounts"]
    env = {e["name"]: e for e in container["env"]}
    assert env["NANOPIPE_HOME"]["value"] == "/nanopipe"
    assert env["NANOPIPE_ARTIFACT_STORE"]["value"] == "s3://runs/nanopipe"
    assert env["PYTHONUNBUFFERED"]["value"] == "1" and env["OMP_NUM_THREADS"]["value"] == "8"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "nanopipe-store", "key": key, "optional": True}
    assert all(isinstance(e.get("value", ""), str) for e in container["env"]), "Kubernetes wants string values"
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu" and spec["restartPolicy"] == "Never"
    assert manifest["spec"]["backoffLimit"] == 0, "retries are Prefect's, resuming from checkpoints"
    assert rendered.env == {"NCCL_DEBUG": "WARN"} and rendered.pod_watch_timeout_seconds == 900
    print("\nrendered container:\n" + json.dumps(container, indent=1))


async def _render(api_url: str, pool: str):
    """Deployment and flow run on the pool, job variables merged as a worker merges them, rendered."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.actions import VariableCreate
    from prefect.exceptions import PrefectHTTPStatusError

    async with PrefectClient(api_url) as client:
        work_pool = await client.read_work_pool(pool)
        assert work_pool.type == "kubernetes"
        assert work_pool.base_job_template == json.loads(TEMPLATE.read_text())
        image_variable = f"nanopipe_image_{uuid.uuid4().hex[:6]}"
        await client.create_variable(VariableCreate(name=image_variable, value="registry.example.com/nanopipe:abc123"))
        flow_id = await client.create_flow_from_name(f"k8s-template-check-{uuid.uuid4().hex[:6]}")
        common = dict(flow_id=flow_id, work_pool_name=pool, entrypoint="flows/pipeline.py:full_pipeline")
        with pytest.raises(PrefectHTTPStatusError) as refused:
            await client.create_deployment(name="bad", job_variables={"nproc_per_node": "eight"}, **common)
        refused_type = refused.value.response.text
        bare = await client.create_deployment(name="no-image", **common)
        with pytest.raises(PrefectHTTPStatusError) as refused:
            await client.create_flow_run_from_deployment(bare)
        refused_run = refused.value.response.text
        job_variables = {"image": "{{ prefect.variables.%s }}" % image_variable, "nproc_per_node": 8,
                         "memory_limit": "900Gi", "artifact_store": "s3://runs/nanopipe",
                         "home_volume": {"name": "nanopipe-home",
                                         "persistentVolumeClaim": {"claimName": "nanopipe-cache"}},
                         "env": {"NCCL_DEBUG": "WARN"}}
        deployment_id = await client.create_deployment(name="gpu", job_variables=job_variables, **common)
        flow_run = await client.create_flow_run_from_deployment(deployment_id, job_variables={"nproc_per_node": 4})
        try:
            deployment = await client.read_deployment(deployment_id)
            values = {**deployment.job_variables, **(flow_run.job_variables or {})}
            rendered = await _job_configuration_class().from_template_and_values(
                work_pool.base_job_template, values, client=client)
        finally:
            await client.delete_flow_run(flow_run.id)
            for dep in (deployment_id, bare):
                await client.delete_deployment(dep)
            await client.delete_work_pool(pool)
    return rendered, refused_type, refused_run


# -----------------------------------------------------------------------------
# Slurm

def _directives() -> list[str]:
    """The #SBATCH lines, which sbatch reads only before the first command of the script."""
    lines = SBATCH.read_text().splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = []
    for line in lines[1:]:
        if line.startswith("#SBATCH"):
            directives.append(line)
        elif line.strip() and not line.startswith("#"):
            break
    after = [n for n, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert len(after) == len(directives), "an #SBATCH line after the first command is ignored by sbatch"
    return directives


def test_sbatch_script_parses():
    checked = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    options = {}
    for line in _directives():
        match = re.fullmatch(r"#SBATCH (--[a-z][a-z-]*)(?:=(\S+))?", line)
        assert match, f"not an sbatch option: {line!r}"
        assert match.group(1) not in options, f"{match.group(1)} given twice"
        options[match.group(1)] = match.group(2)
    assert options["--gres"] == "gpu:8" and options["--nodes"] == "1"
    assert "--exclusive" in options and options["--exclusive"] is None
    assert re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}:\d{2}", options["--time"]), options["--time"]
    assert re.fullmatch(r"B:TERM@\d+", options["--signal"]), "SIGTERM to the batch shell, which forwards it"
    known = {"--job-name", "--nodes", "--ntasks-per-node", "--gres", "--exclusive", "--time", "--signal",
             "--output", "--partition", "--account", "--cpus-per-task", "--mem"}
    assert set(options) <= known, set(options) - known


def _slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NANOPIPE_"))}
    return {**env, "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(REPO), "NANOPIPE_VENV": sys.prefix,
            "TMPDIR": str(tmp_path), **extra}


def test_sbatch_script_starts_a_process_worker_with_the_venv(tmp_path):
    env = _slurm_env(tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api", NANOPIPE_WORKER_DRY_RUN="1")
    done = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    command = shlex.split(done.stdout.strip().splitlines()[-1])
    assert command[:4] == ["python", "-m", "prefect", "worker"]
    assert command[command.index("--pool") + 1] == "nanopipe" and command[command.index("--type") + 1] == "process"
    assert command[command.index("--limit") + 1] == "1"
    assert f"NANOPIPE_HOME {tmp_path}/nanopipe-4242" in done.stdout
    missing = subprocess.run(["bash", str(SBATCH)], env={**env, "NANOPIPE_VENV": str(tmp_path / "none")},
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no virtual environment" in missing.stderr
    no_api = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    unset = subprocess.run(["bash", str(SBATCH)], env=no_api, capture_output=True, text=True, timeout=60)
    assert unset.returncode != 0 and "PREFECT_API_URL" in unset.stderr


def test_sbatch_worker_joins_the_pool_and_stops_on_slurms_sigterm(tmp_path):
    from prefect.client.orchestration import SyncPrefectClient

    stack = prefect_stack()
    pool = f"nanopipe-slurm-{uuid.uuid4().hex[:6]}"
    env = _slurm_env(tmp_path, **{k: v for k, v in stack.env.items() if k.startswith("PREFECT_")},
                     NANOPIPE_POOL=pool)
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        script = subprocess.Popen(["bash", str(SBATCH)], env=env, cwd=tmp_path, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with SyncPrefectClient(stack.api_url) as client:
            deadline = time.monotonic() + 180
            while not (workers := _workers(client, pool)):
                assert script.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.5)
            assert [w.name for w in workers] == [f"slurm-4242-{os.uname().nodename.split('.')[0]}"]
            assert client.read_work_pool(pool).type == "process"
            os.kill(script.pid, signal.SIGTERM)   # what `--signal=B:TERM@300` sends to the batch shell
            # Slurm gives the worker the 300 s of that option to stop; a loaded machine may need most of it
            try:
                script.wait(timeout=300)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the worker did not stop within Slurm's 300 s:\n{log_path.read_text()}")
            client.delete_work_pool(pool)
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()
    leftovers = subprocess.run(["pgrep", "-s", str(script.pid)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], f"the worker outlived the batch script: {leftovers}\n{log_path.read_text()}"


def _workers(client, pool: str) -> list:
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
    try:
        return client.read_workers_for_work_pool(pool)
    except (ObjectNotFound, PrefectHTTPStatusError) as err:   # the worker creates the pool when it starts
        if isinstance(err, PrefectHTTPStatusError) and err.response.status_code != 404:
            raise
        return []
