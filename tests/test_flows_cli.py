"""The `nanopipe` command's parsing and status view, presets, and the deployments as data (no server)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.artifacts import write_manifest
from flows.config import PipelineConfig
from flows.plan import plan_pipeline
from flows.presets import PRESETS
from flows.stages import STAGE_NAMES
from flows.cli import UsageError, build_pipeline_config, main

REPO = Path(__file__).resolve().parents[1]


def config_from(*argv, stage=None):
    return build_pipeline_config(list(argv), stage=stage)


def test_dotted_overrides_reach_nested_fields_with_their_types():
    cfg = config_from("--preset=demo-cpu", "--base_train.num_iterations", "7", "--tok_train.vocab-size=1024",
                      "--resources.env.NCCL_DEBUG=INFO", "--run_rl", "--recompute_from=base_train",
                      "--tok_eval.references=gpt2,cl100k_base", "--resources.timeout_minutes=1e1")
    assert cfg.base_train.num_iterations == 7 and cfg.tok_train.vocab_size == 1024
    assert cfg.resources.env == {"OMP_NUM_THREADS": "1", "NCCL_DEBUG": "INFO"}   # merged into the preset's
    assert cfg.run_rl is True and cfg.recompute_from == "base_train" and cfg.resources.timeout_minutes == 10
    assert cfg.tok_eval.references == ["gpt2", "cl100k_base"]
    assert cfg.base_train.depth == 4   # the preset's value where nothing was given


def test_stage_flags_may_be_given_undotted_for_a_single_stage():
    from flows.stages import get_stage
    cfg = config_from("--preset=demo-cpu", "--depth=6", "--resources.nproc_per_node=1",
                      stage=get_stage("base_train"))
    assert cfg.base_train.depth == 6 and cfg.resources.nproc_per_node == 1


@pytest.mark.parametrize("argv, needle", [
    (["--tok_train.vocab_size=3"], "--tok_train.vocab_size"),
    (["--tok_trian.vocab_size=3"], "did you mean --tok_train.vocab_size"),
    (["--preset=nope"], "unknown preset 'nope'"),
    (["--run_rl.x=1"], "unknown flag --run_rl.x"),
    (["--recompute_from=nowhere"], "--recompute_from"),
    (["--resources.nnodes=2"], "rdzv_endpoint"),
    (["positional"], "unexpected argument"),
])
def test_bad_overrides_name_the_flag(argv, needle):
    with pytest.raises(UsageError, match=needle):
        config_from(*argv)


def test_the_command_exits_2_with_the_reason(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["status", "--base_train.depth=0"])
    assert exc.value.code == 2 and "--base_train.depth" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["launch"])
    assert exc.value.code == 2 and "unknown command 'launch'" in capsys.readouterr().err


def test_a_cross_field_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["status", "--preset=demo-cpu", "--resources.nproc_per_node=3"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert "stage base_train on 3 process(es)" in err and "--total_batch_size=4096" in err


def test_presets_lists_each_with_its_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["presets"])
    out = capsys.readouterr().out.splitlines()
    assert exc.value.code == 0 and [line.split()[0] for line in out if not line.startswith(" ")] == list(PRESETS)


def test_status_tells_complete_corrupted_incomplete_and_absent(home, capsys):
    args = ["--preset=demo-cpu", f"--home={home}"]
    plans = {p.stage: p for p in plan_pipeline(config_from(*args), home=home)}
    tok = Path(plans["tok_train"].artifact_dir)
    (tok / "tokenizer").mkdir(parents=True)
    (tok / "tokenizer" / "metrics.json").write_text('{"vocab_size": 2048}')
    write_manifest(tok, stage="tok_train", digest=plans["tok_train"].hash, config={}, upstream={},
                   metrics={"vocab_size": 2048}, timings={})
    ev = Path(plans["tok_eval"].artifact_dir)
    (ev / "out").mkdir(parents=True)
    (ev / "out" / "metrics.json").write_text("{}")
    write_manifest(ev, stage="tok_eval", digest=plans["tok_eval"].hash, config={}, upstream={}, metrics={},
                   timings={})
    (ev / "out" / "metrics.json").write_text("[]")   # same size, other bytes
    ckpts = Path(plans["base_train"].out_dir)
    ckpts.mkdir(parents=True)
    for step in (10, 20):
        (ckpts / f"model_{step:06d}.pt").write_bytes(b"w")

    with pytest.raises(SystemExit) as exc:
        main(["status", *args, "--json"])
    assert exc.value.code == 3   # not everything is complete
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tok_train"]["state"] == "complete" and rows["tok_train"]["metrics"] == {"vocab_size": 2048}
    assert rows["tok_eval"]["state"].startswith("corrupted") and "sha256" in rows["tok_eval"]["state"]
    assert rows["base_train"]["state"] == "incomplete (2 checkpoints to resume from)"
    assert rows["base_eval"]["state"] == "absent"


def test_command_prints_the_exact_launch_line(home, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["command", "base_train", "--preset=d12", f"--home={home}", "--resources.nnodes=2",
              "--resources.rdzv_endpoint=node0:29400", "--depth=8",
              "--device_batch_size=16"])   # 16 ranks: 16 x 2048 x 16 tokens per micro-step fit the d12 batch
    assert exc.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("OMP_NUM_THREADS=1 ") and "-m torch.distributed.run --nproc_per_node=8 --nnodes=2" in line
    assert "--rdzv_endpoint=node0:29400" in line and "--depth=8" in line and "--resume_from_step=latest" in line
    assert f"--out_dir={home}/artifacts/base_train/d8-" in line


def test_every_preset_plans_and_validates(tmp_path):
    for name in PRESETS:
        plans = plan_pipeline(PipelineConfig(preset=name), home=tmp_path)
        assert [p.stage for p in plans] == STAGE_NAMES[:len(plans)] and len(plans) >= 4, name


def test_presets_carry_the_memory_constrained_settings():
    bt = {name: PipelineConfig(preset=name).base_train for name in PRESETS}
    assert (bt["speedrun-d20"].depth, bt["speedrun-d20"].device_batch_size) == (20, 32)
    assert (bt["mem-40gb"].depth, bt["mem-40gb"].device_batch_size) == (20, 16)
    assert (bt["mem-24gb"].depth, bt["mem-24gb"].device_batch_size) == (16, 8)
    assert (bt["single-gpu"].depth, bt["single-gpu"].device_batch_size) == (12, 4)
    assert PipelineConfig(preset="single-gpu").resources.nproc_per_node == 1
    assert (bt["d26"].depth, bt["d12"].depth) == (26, 12)


def test_deployments_are_valid_data():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = set()
    for deployment in spec["deployments"]:
        names.add(deployment["name"])
        path, func = deployment["entrypoint"].split(":")
        assert (REPO / path).is_file() and func in (REPO / path).read_text()
        if func == "node_agent":   # started by a multi-node stage's task, one queue per node of its own pool
            assert deployment["work_pool"]["name"] == "nanopipe-nodes" and "parameters" not in deployment
            continue
        # the GPU-sized nightly has a pool of its own, so a CPU machine's worker never picks it up
        assert deployment["work_pool"]["name"] == ("nanopipe-gpu" if deployment["name"] == "nightly" else "nanopipe")
        params = deployment["parameters"]
        PipelineConfig.model_validate(params["config"])
        if func == "stage_flow":
            assert params["stage"] in STAGE_NAMES and deployment["name"] == "stage-" + params["stage"].replace("_", "-")
    assert {"full-pipeline", "nightly"} <= names
    assert {f"stage-{s.replace('_', '-')}" for s in STAGE_NAMES} <= names   # one per stage of the pipeline
    for path in sorted((REPO / "deployments" / "params").glob("*.json")):
        PipelineConfig.model_validate(json.loads(path.read_text())["config"])


def test_the_ui_form_submits_only_what_is_filled_in_so_the_preset_stands():
    schema = PipelineConfig.model_json_schema()["properties"]
    for section in ("data", "common", "tok_train", "base_train", "mid_train", "resources"):
        fields = schema[section]["properties"]
        assert fields and not [f for f, s in fields.items() if "default" in s], section
    # what the form sends when one field was changed: the top-level scalars, the preset, one nested value
    submitted = {"preset": "demo-cpu", "run_rl": False, "stop_after": None, "recompute_from": None,
                 "resources": {}, "base_train": {"num_iterations": 7}}
    expected = PipelineConfig(preset="demo-cpu")
    expected.base_train.num_iterations = 7
    assert PipelineConfig.model_validate(submitted) == expected


def test_the_flow_process_plans_without_importing_torch(tmp_path):
    """The flow (and a worker running it) stays light: planning the demo pipeline imports no torch."""
    code = ("import sys; import flows.pipeline, flows.cli; from flows.config import PipelineConfig; "
            "from flows.plan import plan_pipeline; "
            f"plans = plan_pipeline(PipelineConfig(preset='demo-cpu'), home={str(tmp_path)!r}); "
            "assert len(plans) >= 4; "
            "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("setup, needle", [
    (lambda tmp: ["--home", str(tmp / "a-file")], "is a file, not a directory"),
    (lambda tmp: ["--home", str(tmp / "a-file" / "home")], "cannot be written"),
])
def test_a_run_that_cannot_write_fails_at_once_naming_the_place(tmp_path, capsys, setup, needle, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    started = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        main(["run", "--preset=demo-cpu", *setup(tmp_path)])
    assert exc.value.code == 2 and needle in capsys.readouterr().err and time.monotonic() - started < 30


def test_a_prefect_home_under_a_file_fails_at_once(tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "a-file" / "prefect"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["run", "--preset=demo-cpu", "--home", str(tmp_path / "home")])
    assert exc.value.code == 2 and "PREFECT_HOME" in capsys.readouterr().err


HELP_OPTIONS = {   # what each command's --help must list (its own options), and what it must not
    "run": (["--preset", "--stop_after", "--recompute_from", "--run_rl", "--SECTION.FIELD", "--home", "--server"],
            ["--json", "--exec", "--FIELD "]),
    "stage": (["NAME", "--preset", "--FIELD", "--home", "--server"], ["--json", "--exec"]),
    "status": (["--preset", "--home", "--json"], ["--server", "--exec"]),
    "command": (["NAME", "--preset", "--FIELD", "--home", "--exec"], ["--server", "--json"]),
    "presets": (["NAME"], ["--home", "--server"]),
}


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", list(HELP_OPTIONS))
def test_each_command_help_lists_its_own_options_with_defaults(command, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("NANOPIPE_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example:4200/api")
    text = _help(capsys, command, "--help")
    assert text.startswith(f"usage: nanopipe {command} ")
    listed, absent = HELP_OPTIONS[command]
    for option in listed:
        assert option in text, f"{command} --help lacks {option}"
    for option in absent:
        assert option not in text, f"{command} --help lists {option}, which is another command's"
    if "--home" in listed:   # the defaults as this shell would resolve them
        squeezed = "".join(text.split())   # argparse wraps long paths anywhere
        assert "".join(f"(default: {tmp_path / 'h'}, from NANOPIPE_HOME)".split()) in squeezed
    if "--server" in listed:
        assert "(default:http://prefect.example:4200/api(fromPREFECT_API_URL))" in "".join(text.split())
    if "--preset" in listed:
        assert "demo-cpu" in text and "(default: none)" in text
    assert text == _help(capsys, command, "--preset=d12", "-h")   # -h anywhere on the line


def test_top_level_help_names_every_command_once(capsys):
    from flows.cli import COMMANDS
    text = _help(capsys, "--help")
    assert all(f"    {name} " in text for name in COMMANDS)
    assert text != _help(capsys, "run", "--help") != _help(capsys, "status", "--help")


@pytest.mark.parametrize("how", ["--home", "NANOPIPE_HOME", "default"])
def test_status_says_which_home_it_read_and_why(how, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NANOPIPE_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ["status", "--preset=demo-cpu"]
    if how == "--home":
        args.append(f"--home={tmp_path / 'mine'}")
    elif how == "NANOPIPE_HOME":
        monkeypatch.setenv("NANOPIPE_HOME", str(tmp_path / "env"))
    expected = {"--home": tmp_path / "mine", "NANOPIPE_HOME": tmp_path / "env", "default": tmp_path / "cache" / "nanopipe"}
    with pytest.raises(SystemExit):
        main(args)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"home: {expected[how]} ({how if how != 'default' else 'the default; give --home'}")
    assert first.endswith("it does not exist: nothing has run with this home")
    with pytest.raises(SystemExit):
        main([*args, "--json"])
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["stage"] == "tok_train" and captured.err.startswith(f"home: {expected[how]} (")


def test_batch_advice_is_for_the_runs_world_size(capsys, tmp_path):
    """demo-cpu runs 2 processes: the advice for total_batch_size=5000 is for 2 (4096 or 8192), not for 1
    (6144, which fails again), and `nanopipe run` gives it before any server starts."""
    with pytest.raises(SystemExit) as exc:
        main(["run", "--preset=demo-cpu", "--base_train.total_batch_size=5000", f"--home={tmp_path / 'home'}",
              "--server=http://127.0.0.1:9/api"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err and "Prefect" not in err
    assert "stage base_train on 2 process(es)" in err and "world size (2)" in err
    assert "--total_batch_size=4096 or 8192" in err and "6144" not in err
    assert not (tmp_path / "home").exists()   # refused before anything was written
    for advice in (4096, 8192):   # the advice holds on 2 processes
        plan_pipeline(PipelineConfig(preset="demo-cpu", base_train={"total_batch_size": advice},
                                     mid_train={"total_batch_size": advice}), home=tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["stage", "chat_sft", "--preset=demo-cpu", "--target_examples_per_step=5", "--server=temporary"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "world size (2) = 16; try --target_examples_per_step=16" in err


def test_a_stage_alone_still_checks_its_batch_for_one_process():
    """Outside the pipeline (python -m nanopipe.stages.base_train), the stage's model checks for one process at
    parse time and the stage checks its real world size once launched."""
    from nanopipe.configs import BaseTrainConfig, ConfigError, build_config
    with pytest.raises(ConfigError, match=r"world size \(1\) = 2048 tokens.*=4096 or 6144"):
        build_config(BaseTrainConfig, {"max_seq_len": 256, "device_batch_size": 8, "total_batch_size": 5000})


def test_status_shows_the_artifact_complete_beside_an_unfinished_recompute(home, capsys):
    """A recompute that stopped (flows/recompute.py) leaves the good artifact complete, and status says both."""
    from flows.recompute import OWNER_FILE, staging_dir
    args = ["--preset=demo-cpu", f"--home={home}", "--stop_after=tok_train"]
    plan = plan_pipeline(config_from(*args), home=home)[0]
    tok = Path(plan.artifact_dir)
    (tok / "tokenizer").mkdir(parents=True)
    (tok / "tokenizer" / "metrics.json").write_text('{"vocab_size": 2048}')
    write_manifest(tok, stage="tok_train", digest=plan.hash, config={}, upstream={}, metrics={}, timings={})
    staging = staging_dir(tok)
    (staging / "tokenizer").mkdir(parents=True)
    (staging / OWNER_FILE).write_text("run-1234\n")
    with pytest.raises(SystemExit) as exc:
        main(["status", *args])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and f"tok_train  complete\n           {tok}\n" in out
    assert f"recompute beside it: {staging} (flow run run-1234; a retry of that run continues it)" in out
    from flows.artifacts import artifact_lock
    with artifact_lock(staging):   # a recompute in progress
        with pytest.raises(SystemExit):
            main(["status", *args, "--json"])
    row = json.loads(capsys.readouterr().out)[0]
    assert row["state"] == "complete" and row["recompute"].startswith(f"{staging} (flow run run-1234; running: pid ")


def test_a_run_ends_like_a_normal_exit_without_the_teardown(tmp_path):
    """How `nanopipe run` ends: other threads finish, atexit handlers run, buffered output is written, and
    the exit code is the run's."""
    code = ("import atexit, sys, threading, time\nfrom pathlib import Path\n"
            f"out = Path({str(tmp_path)!r})\n"
            "atexit.register(lambda: (out / 'atexit').write_text('ran'))\n"
            "threading.Thread(target=lambda: (time.sleep(0.5), (out / 'thread').write_text('done'))).start()\n"
            "sys.stdout.write('buffered, no newline')\n"
            "from flows.cli import _exit_without_teardown\n_exit_without_teardown(3)\n"
            "(out / 'after').write_text('the process went on')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered, no newline"
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "done"
    assert not (tmp_path / "after").exists()


def test_the_server_is_spawned_before_the_planning_code_is_imported(tmp_path, monkeypatch):
    """`nanopipe run` spawns its temporary server before importing flows.plan (~0.4 s of CPU)."""
    code = ("import sys\nimport flows.local_server as ls\n"
            "def spawned(self):\n    print('flows.plan' in sys.modules, 'pydantic' in sys.modules)\n"
            "    raise SystemExit(0)\n"
            "ls.TemporaryServer.__init__ = spawned\n"
            "from flows.cli import main\nmain()\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), NANOPIPE_HOME=str(tmp_path / "home"))
    done = subprocess.run([sys.executable, "-c", code, "run", "--preset=demo-cpu"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
