"""`nanopipe deploy` (flows/deploy.py), and deployments/README.md's setup steps run as written against a real
`prefect server start` on loopback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from flows.deploy import required_pools, worker_commands
from tests.test_flows_server_support import PrefectStack, free_port

REPO = Path(__file__).resolve().parents[1]
README = REPO / "deployments" / "README.md"


def test_the_pools_are_every_pool_prefect_yaml_deploys_to():
    assert required_pools() == ["nanopipe", "nanopipe-nodes", "nanopipe-gpu"]


def test_deploy_refuses_a_temporary_server(monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["deploy"])
    assert exc.value.code == 1 and "needs a Prefect server that stays up" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["deploy", "--server=temporary"])
    assert exc.value.code == 1


def test_the_worker_commands_follow_the_machine():
    pools = required_pools()
    commands = lambda text: [line.split("#")[0].strip() for line in text.splitlines() if line.startswith("  prefect ")]
    without = worker_commands("http://h:4200/api", gpus=0, pools=pools)
    assert commands(without) == ["prefect worker start --pool nanopipe"]
    assert "export PREFECT_API_URL=http://h:4200/api" in without and "on a GPU node" in without
    with_gpus = worker_commands("http://h:4200/api", gpus=2, pools=pools)
    assert commands(with_gpus) == ["prefect worker start --pool nanopipe", "prefect worker start --pool nanopipe-gpu"]
    assert "--pool nanopipe-nodes --work-queue node-k" in with_gpus


def readme_setup() -> list[str]:
    """The commands of the README's setup block, comments dropped, in order."""
    text = README.read_text()
    section = text[text.index("## Server, pool, worker, deploy"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def _read(api_url: str):
    from prefect.client.orchestration import SyncPrefectClient
    with SyncPrefectClient(api_url) as client:
        pools = {p.name: p.type for p in client.read_work_pools()}
        flows = {f.id: f.name for f in client.read_flows()}
        deployments = {f"{flows[d.flow_id]}/{d.name}": d.id for d in client.read_deployments()}
        workers = [w.name for w in client.read_workers_for_work_pool("nanopipe")] if "nanopipe" in pools else []
    return pools, deployments, workers


@pytest.mark.slow
def test_the_readme_setup_runs_as_written(tmp_path):
    """Each line of the README's block, as written; the only change is the address: the server listens on
    127.0.0.1 and a free port (PREFECT_SERVER_API_PORT) instead of every interface and 4200. Lines that
    never end (the server, a worker) run in the background, the others one after another in the same
    environment, as in a shell."""
    steps = readme_setup()
    assert any(s.startswith("prefect server start") for s in steps) and "nanopipe deploy" in steps
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_API_PORT=str(port),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_DATABASE_TIMEOUT="60",
               NANOPIPE_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    stack = PrefectStack(tmp_path, port, env)
    deploy_outputs = []
    try:
        for step in steps:
            line = step.replace("0.0.0.0", "127.0.0.1").replace("<host>:4200", f"127.0.0.1:{port}")
            if line.startswith(("prefect server start", "prefect worker start")):
                log = open(tmp_path / f"bg-{len(stack.processes)}.log", "w")
                stack.processes.append(subprocess.Popen(["bash", "-c", f"exec {line}"], env=env, cwd=REPO,
                                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
                if line.startswith("prefect server start"):
                    _wait_healthy(stack.api_url, stack.processes[-1], tmp_path / "bg-0.log")
                continue
            envfile = tmp_path / "env"   # the shell's environment after the line (an `export` changes it)
            done = subprocess.run(["bash", "-ec", f'{line}\nenv -0 > "$TEST_ENV_FILE"'],
                                  env={**env, "TEST_ENV_FILE": str(envfile)}, cwd=REPO, capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, f"`{line}` failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            env = dict(item.split("=", 1) for item in envfile.read_text().split("\0") if "=" in item)
            env.pop("TEST_ENV_FILE")
            if line == "nanopipe deploy":
                deploy_outputs.append(done.stdout + done.stderr)
        assert env.get("PREFECT_API_URL") == stack.api_url, "the README's export points the rest at the server"

        pools, deployments, workers = _read(stack.api_url)
        assert pools == {name: "process" for name in required_pools()}
        spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
        assert {d["name"] for d in spec["deployments"]} == {name.split("/")[1] for name in deployments}
        text = deploy_outputs[0]
        assert "prefect worker start --pool nanopipe " in text and "created" in text
        deadline = time.monotonic() + 120   # the README's worker registers with the pool
        while not workers and time.monotonic() < deadline:
            time.sleep(1)
            workers = _read(stack.api_url)[2]
        assert workers, (tmp_path / f"bg-{len(stack.processes) - 1}.log").read_text()[-3000:]

        again = subprocess.run(["bash", "-ec", "nanopipe deploy"], env=env, cwd=REPO, capture_output=True, text=True,
                               timeout=600)   # idempotent: nothing new, the same deployments updated in place
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert all(f"work pool {name}: exists (type process)" in again.stdout for name in required_pools())
        assert _read(stack.api_url)[:2] == (pools, deployments)
    finally:
        stack.stop()


def _wait_healthy(api_url: str, process: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    from flows.local_server import answers
    deadline = time.monotonic() + timeout
    while not answers(api_url, timeout=5):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)
