"""
Beyond the anchors: a lineage's key metrics over its last runs, on the report card.

The regression gate (flows/gate.py) compares a run with the lineage's last Completed run only; a slow drift,
each night a little inside the tolerance, passes it every time. The trend shows the key metrics (val bpb,
CORE, ChatCORE, GSM8K, tokens per second, wall time: those the runs recorded) over the last TREND_RUNS runs
of the lineage, this one last, as one small plot and a table, under the gate's verdict. The earlier runs'
values are their key-metrics records (the gate's `history`, read through the Prefect API); tokens per second
and wall time ride in the same record (`trend_extras`) though the gate compares neither.

Without an earlier run the section is absent: the gate's section already says there is nothing to compare.
"""

from __future__ import annotations

from pathlib import Path

from flows.gate import TREND_RUNS, GateResult, fmt, number
from flows.plots import markdown_image, render_small_multiples

TREND_FILE = "trend.png"   # under NANOPIPE_HOME, beside report.md: the last run's trend plot
TOKENS_PER_SECOND, WALL_TIME = "tokens per second", "wall time (min)"
# the order of the columns and panels, by a metric name's last word ("SFT GSM8K" -> GSM8K)
ORDER = ("bpb", "CORE", "ChatCORE", "GSM8K", TOKENS_PER_SECOND, WALL_TIME)
PANELS_PER_ROW = 4


def trend_extras(metrics: dict[str, dict], seconds: float) -> dict[str, float]:
    """What the trend shows beside the gate's metrics: base_train's tokens per second (when it reported
    them) and the run's wall time in minutes (the stages' time in this run; a cached re-run takes little)."""
    extras = {WALL_TIME: round(seconds / 60, 2)}
    tokens = number(metrics.get("base_train", {}).get("tokens_per_sec"))
    if tokens is not None:
        extras[TOKENS_PER_SECOND] = tokens
    return extras


def _rank(name: str) -> int:
    last = name.split()[-1]   # "SFT ChatCORE" is a ChatCORE, not a CORE
    return next((i for i, kind in enumerate(ORDER) if name == kind or last == kind), len(ORDER))


def trend_points(history: list[dict], current: dict[str, float]) -> list[tuple[str, str, dict[str, float]]]:
    """(run, ended, metrics) oldest first, this run last: the last TREND_RUNS runs of the lineage.
    `history` is the gate's, newest first."""
    earlier = [(h.get("run") or "?", h.get("ended") or "", h.get("metrics") or {}) for h in history]
    points = [*reversed(earlier), ("this run", "", current)]
    return points[-TREND_RUNS:]


def trend_columns(points: list[tuple[str, str, dict[str, float]]]) -> list[str]:
    """The metrics any of the runs recorded, in ORDER (then as first seen)."""
    seen = dict.fromkeys(name for _, _, metrics in points for name, v in metrics.items() if number(v) is not None)
    return sorted(seen, key=_rank)   # stable: within one kind, as first seen (MID before SFT before RL)


def _value(name: str, value) -> str:
    value = number(value)
    if value is None:
        return "-"
    return f"{value:,.0f}" if name == TOKENS_PER_SECOND else fmt(value, 4)


def trend_table(points: list[tuple[str, str, dict[str, float]]], columns: list[str]) -> list[str]:
    """A markdown table: a row per run in order (oldest first), a column per metric."""
    lines = ["| # | run | ended | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for i, (run, ended, metrics) in enumerate(points, 1):
        cells = [_value(name, metrics.get(name)) for name in columns]
        lines.append(f"| {i} | {run} | {ended or '-'} | " + " | ".join(cells) + " |")
    return lines


def render_trend(points: list[tuple[str, str, dict[str, float]]], columns: list[str], title: str) -> bytes:
    """One small plot: a panel per metric, x the run's place in the table (this run last, circled)."""
    panels = {name: [(i, v) for i, (_, _, m) in enumerate(points, 1) if (v := number(m.get(name))) is not None]
              for name in columns}
    return render_small_multiples(panels, title, per_row=PANELS_PER_ROW)


def verdict_line(gate: GateResult) -> str:
    """The regression gate's verdict in one line."""
    if gate.regressions:
        return (f"**Regression gate: regressed** ({len(gate.regressions)} key metric"
                f"{'s' if len(gate.regressions) > 1 else ''} beyond tolerance): " + "; ".join(gate.regressions) + ".")
    if any(verdict == "ok" for *_, verdict in gate.rows):
        return f"**Regression gate: passed**: every comparable key metric within its tolerance. {gate.note}."
    return f"**Regression gate: nothing compared**: {gate.note[:1].lower() + gate.note[1:]}."


def trend_section(gate: GateResult, current: dict[str, float], lineage_name: str,
                  home: Path | None = None) -> list[str]:
    """The report card's trend section: the gate's verdict, the plot (also written to home/TREND_FILE) and the
    table; [] without an earlier run of the lineage."""
    if not gate.history:
        return []
    points = trend_points(gate.history, current)
    columns = trend_columns(points)
    lines = [f"## Trend of lineage {lineage_name}", "", verdict_line(gate), "",
             f"The last {len(points)} runs of this lineage (at most {TREND_RUNS}), oldest first, this run last.", ""]
    if not columns:
        return lines + ["No key metric recorded by these runs.", ""]
    png = render_trend(points, columns, f"{lineage_name}: last {len(points)} runs")
    if home is not None:
        from nanopipe.common import atomic_write_bytes
        atomic_write_bytes(Path(home) / TREND_FILE, png)
    return lines + [markdown_image(png, f"{lineage_name} trend"), "", *trend_table(points, columns), ""]
