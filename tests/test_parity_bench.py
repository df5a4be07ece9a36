"""bench/bench_parity.py's pure parts (no reference tree needed): the first difference of two sequences, the
README's list of documented differences, the table and its closing count, running chosen parts of a script."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_parity.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_parity", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_difference_names_the_position_and_both_values(bench):
    assert bench.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert bench.first_difference([1, 2, 3], [1, 5, 3]) == "[1] ours 2 | ref 5"
    assert bench.first_difference([1, 2], [1, 2, 3]) == "length: ours 2 | ref 3 (equal up to 2)"
    # nested: the path down to the first differing element
    assert bench.first_difference([[1, 2], [3, [4, 5]]], [[1, 2], [3, [4, 6]]]) == "[1][1][1] ours 5 | ref 6"
    assert bench.first_difference([[1, 2]], [[1]]) == "[0]: length: ours 2 | ref 1 (equal up to 1)"
    assert bench.first_difference(["24"], ["24.0"]) == '[0] ours 24 | ref 24.0'
    assert bench.first_difference([None], ["3"]) == "[0] ours null | ref 3"
    long = bench.first_difference(["x" * 200], ["y"])
    assert len(long) < 150 and long.endswith("| ref y")


README = """# nanopipe

## Coming from nanochat
- `lr:sft` is mentioned here, outside the list

## Differences from nanochat

Some text, then the list:

- `render:Simple*` and `render:SpellingBee`: our own wording.
- `calculator` — keeps `%`.
* `batches:mid@256`: crops long conversations.
- no code span: not an item

### Nested heading
- `lr:mid` under another heading is not listed

## Benchmarks
- `score:GSM8K` belongs to another section
"""


def test_documented_items_are_the_first_code_span_of_each_bullet_of_the_section(bench):
    items = bench.documented_items(README)
    assert items == ["render:Simple*", "calculator", "batches:mid@256"]
    assert bench.is_documented("render:SimpleSpelling", items)
    assert not bench.is_documented("render:SpellingBee", items)  # only the first span of a bullet names its item
    assert not bench.is_documented("lr:sft", items) and not bench.is_documented("score:GSM8K", items)
    assert bench.documented_items("# nanopipe\n- `x`\n") == []


def test_the_table_marks_each_row_and_counts_the_undocumented_differences(bench):
    rows = [("render:GSM8K", None), ("render:SimpleSpelling", "[0][0][4] ours 680 | ref 264"),
            ("lr:mid", "[31] ours 1.0 | ref 0.875"), ("calculator", None)]
    patterns = ["render:Simple*", "calculator"]
    assert bench.undocumented(rows, patterns) == ["lr:mid"]
    table = bench.format_table(rows, patterns).splitlines()
    assert table[0].split(" | ") == ["item                 ", "identical?", "first difference"]
    verdicts = {line.split(" | ")[0].strip(): line.split(" | ")[1].strip() for line in table[2:-1]}
    assert verdicts == {"render:GSM8K": "identical", "render:SimpleSpelling": "documented", "lr:mid": "DIFFERS",
                        "calculator": "identical"}
    assert table[-1] == "undocumented differences: 1"
    assert bench.format_table(rows, ["*"]).splitlines()[-1] == "undocumented differences: 0"


def test_run_script_parts_defines_only_what_is_named(bench, tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import sys\n"
                      "raise SystemExit('the training run itself must not execute')\n"
                      "steps = 4\n"
                      "total = steps * scale\n"
                      "def get_lr_multiplier(it):\n    return 1.0 - it / total\n"
                      "def other():\n    pass\n")
    namespace = bench.run_script_parts(script, {"steps", "total", "get_lr_multiplier"}, {"scale": 2})
    assert namespace["total"] == 8 and [namespace["get_lr_multiplier"](i) for i in (0, 4)] == [1.0, 0.5]
    assert "other" not in namespace and "sys" not in namespace


def test_standin_rows_are_deterministic_and_in_the_hub_schemas(bench):
    words = ["alpha", "bravo", "charlie", "delta", "echo"]
    rows = bench.standin_rows(words)
    assert rows == bench.standin_rows(words)
    assert len(rows["smoltalk/train"]) >= 10_000 and len(rows["mmlu/test"]) >= 5200  # the recipes' slices fit
    arc = rows["ARC-Easy/train"][0]
    assert arc["answerKey"] in arc["choices"]["label"] and len(arc["choices"]["text"]) == len(arc["choices"]["label"])
    mmlu = rows["mmlu/test"][0]
    assert len(mmlu["choices"]) == 4 and mmlu["answer"] in range(4)
    for conv in rows["smoltalk/test"][:50]:
        roles = [m["role"] for m in conv["messages"] if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
