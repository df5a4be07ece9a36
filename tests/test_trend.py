"""The lineage's trend on the report card (flows/trend.py): the last runs' key metrics in order, as a table and one
plot written beside report.md, under the regression gate's verdict; absent without an earlier run. The earlier
runs' records go through the key-metrics table's JSON, as the gate reads them back from Prefect."""

import base64
import json
import re
import struct

from flows.gate import TREND_RUNS, compare, key_metrics_table, record_from_table
from flows.report import report_card
from flows.trend import TOKENS_PER_SECOND, TREND_FILE, WALL_TIME, trend_columns, trend_extras, trend_section
from tests.test_report import CPU_ENV, completed, plans_for, publish_flow, table_rows
from tests.flow_support import prefect_backend  # noqa: F401 (a fixture: the module's temporary Prefect server)

LINEAGE = "demo-cpu-d4"
BASIS = {"base val bpb": "cfg", "CORE": "cfg", "SFT GSM8K": "cfg"}


def record(i: int) -> dict:
    """Run i's record as the gate reads it back: published as a table artifact, its rows' JSON parsed."""
    metrics = {"base val bpb": 2.0 - i / 100, "CORE": 0.1 + i / 1000, "SFT GSM8K": 0.01 * (i % 3),
               TOKENS_PER_SECOND: 2000.0 + i, WALL_TIME: 6.5}
    if i % 2:   # the odd runs did not evaluate CORE
        del metrics["CORE"]
    table = key_metrics_table({"lineage": LINEAGE, "metrics": metrics, "basis": BASIS})
    return record_from_table(json.dumps(table))


def history(count: int) -> list[dict]:
    """`count` earlier runs run-1 .. run-<count>, newest first (as the gate's `history` is)."""
    return [{"run": f"run-{i}", "id": f"id-{i}", "ended": f"2026-12-{i % 28 + 1:02d}T03:00", **record(i)}
            for i in range(count, 0, -1)]


NOW = {"base val bpb": 1.5, "CORE": 0.2, "SFT GSM8K": 0.02, TOKENS_PER_SECOND: 2500.0, WALL_TIME: 6.0}


def gate_over(runs: list[dict], now: dict = NOW):
    gate = compare({k: v for k, v in now.items() if k in BASIS}, BASIS, runs[0] if runs else None,
                   f"run {runs[0]['run']}" if runs else "")
    gate.history = runs
    return gate


def test_the_table_lists_the_last_runs_in_order_with_their_values(tmp_path):
    lines = trend_section(gate_over(history(40)), NOW, LINEAGE, tmp_path)
    markdown = "\n".join(lines)
    header = table_rows(markdown, "#")[0]
    assert header == ["#", "run", "ended", "base val bpb", "CORE", "SFT GSM8K", TOKENS_PER_SECOND, WALL_TIME]
    rows = [cells for cells in (table_rows(markdown, str(n)) for n in range(1, TREND_RUNS + 2)) if cells]
    # the last 30 runs: the 29 newest earlier ones, oldest first, then this run
    assert [r[0][1] for r in rows] == [f"run-{i}" for i in range(12, 41)] + ["this run"]
    first, last = rows[0][0], rows[-1][0]
    assert first[3:] == ["1.88", "0.112", "0", "2,012", "6.5"]           # run-12's values, column by column
    assert rows[1][0][4] == "-"                                           # run-13 recorded no CORE
    assert last[2] == "-" and last[3:] == ["1.5", "0.2", "0.02", "2,500", "6"]


def test_columns_go_bpb_core_chatcore_gsm8k_then_speed_and_time():
    recorded = dict.fromkeys([WALL_TIME, "MID ChatCORE", "SFT GSM8K", "SFT ChatCORE", TOKENS_PER_SECOND, "CORE",
                              "base val bpb"], 1.0)
    assert trend_columns([("run-1", "", {"MID GSM8K": 0.1}), ("this run", "", recorded)]) == [
        "base val bpb", "CORE", "MID ChatCORE", "SFT ChatCORE", "MID GSM8K", "SFT GSM8K", TOKENS_PER_SECOND, WALL_TIME]


def test_the_plot_is_written_and_is_the_one_on_the_card(tmp_path):
    lines = trend_section(gate_over(history(3)), NOW, LINEAGE, tmp_path)
    png = (tmp_path / TREND_FILE).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    # five metrics (bpb, CORE, GSM8K, tokens per second, wall time): four small panels a row, two rows
    assert struct.unpack(">II", png[16:24]) == (640, 26 + 2 * 150)
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)\)", "\n".join(lines))
    assert [base64.b64decode(i) for i in images] == [png]


def test_the_gate_verdict_comes_first(tmp_path):
    earlier = history(5)
    worse = {**NOW, "base val bpb": earlier[0]["metrics"]["base val bpb"] * 1.05}
    lines = trend_section(gate_over(earlier, worse), worse, LINEAGE, tmp_path)
    assert lines[0] == f"## Trend of lineage {LINEAGE}"
    assert lines[2].startswith("**Regression gate: regressed** (1 key metric beyond tolerance): base val bpb rose")
    passed = trend_section(gate_over(earlier), NOW, LINEAGE, tmp_path)
    assert passed[2].startswith("**Regression gate: passed**") and "Compared with run run-5" in passed[2]
    # on the card: the verdict, then the plot, then the table
    config, plans = plans_for(tmp_path)
    card = report_card("nanopipe pipeline (demo-cpu)", [completed(p) for p in plans], plans, CPU_ENV,
                       config=config, gate=gate_over(earlier, worse), trend=lines)
    trend_at = card.index("## Trend of lineage")
    assert trend_at < card.index("**Regression gate: regressed**") < card.index("data:image/png", trend_at) \
        < card.index("| # | run | ended |")


def test_without_an_earlier_run_there_is_no_trend(tmp_path):
    assert trend_section(gate_over([]), NOW, LINEAGE, tmp_path) == []
    assert not (tmp_path / TREND_FILE).exists()
    config, plans = plans_for(tmp_path)
    card = report_card("nanopipe pipeline (demo-cpu)", [completed(p) for p in plans], plans, CPU_ENV,
                       config=config, gate=gate_over([]), trend=[])
    assert "## Trend" not in card and "No earlier run of this lineage to compare with." in card


def test_tokens_per_second_and_wall_time_are_recorded_but_not_gated():
    extras = trend_extras({"base_train": {"tokens_per_sec": 2100.5}}, 390.0)
    assert extras == {WALL_TIME: 6.5, TOKENS_PER_SECOND: 2100.5}
    assert trend_extras({"base_train": {"tokens_per_sec": None}}, 60.0) == {WALL_TIME: 1.0}
    # a run five times slower and slower to finish is no regression of the gate's
    slow = {TOKENS_PER_SECOND: 400.0, WALL_TIME: 60.0, "CORE": 0.2}
    gate = compare(slow, {"CORE": "cfg"}, {"metrics": {TOKENS_PER_SECOND: 2000.0, WALL_TIME: 6.0, "CORE": 0.2},
                                           "basis": {"CORE": "cfg"}})
    assert gate.regressions == [] and [r[0] for r in gate.rows] == ["CORE"]


# -----------------------------------------------------------------------------
# Inside real flow runs (the module's temporary Prefect server): the earlier runs come back through the API

def test_publish_summary_shows_the_lineage_trend_read_back_from_earlier_runs(tmp_path):
    publish = publish_flow("report-trend-test")
    first = publish(str(tmp_path), 1.0)
    assert "## Trend" not in first.markdown                 # nothing earlier: the gate's line says so
    publish(str(tmp_path), 1.05)
    third = publish(str(tmp_path), 0.5)
    card = third.markdown
    assert card.index("## Trend of lineage demo-cpu-d4") < card.index("**Regression gate: regressed**") \
        < card.index("| # | run | ended |")
    runs = [table_rows(card, str(n)) for n in (1, 2, 3, 4)]
    assert all(runs[:3]) and runs[2][0][1] == "this run" and not runs[3]
    header = table_rows(card, "#")[0]
    column = header.index("SFT partial ChatCORE")
    assert [float(r[0][column]) for r in runs[:3]] == [0.1766, round(0.1766 * 1.05, 4), 0.0883]
    assert runs[0][0][header.index(TOKENS_PER_SECOND)] == "2,100"   # recorded by the first run, read back
    assert (tmp_path / "home" / TREND_FILE).read_bytes().startswith(b"\x89PNG")
    # another lineage has no trend yet
    assert "## Trend" not in publish(str(tmp_path), 0.5, depth=6).markdown
