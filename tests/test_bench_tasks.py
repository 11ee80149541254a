"""The benchmark's checkers stay honest: every task's reference solution, run directly with
python (no model, no kernel), is accepted by its checker, and a plausible wrong solution is
rejected; answers written in other reasonable formats are accepted too. One data question and
one chart also go through the real CLI with the scripted model, as bench/tasks.py runs them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from autocoder.testing import ScriptedLLM, fenced
from bench.tasks import CATEGORIES, TASKS, Answer, Task
from bench.tasks import check as c
from bench.tasks.direct import run_directly
from tests.conftest import autocoder_cmd

BY_NAME = {t.name: t for t in TASKS}

# Right answers printed otherwise than the reference prints them: the checkers must accept
# each (tolerant of formatting), while the wrong variants show they stay strict on the value.
RESTATED = [
    (
        "region_revenue",
        """
        import pandas as pd
        df = pd.read_csv("sales.csv")
        print((df.units * df.unit_price).groupby(df.region).sum().round(2).to_dict())
        """,
    ),
    (
        "top_country",
        """
        import pandas as pd
        df = pd.read_csv("sales.csv").merge(pd.read_csv("customers.csv"), on="customer_id")
        s = (df.units * df.unit_price).groupby(df.country).sum().sort_values(ascending=False)
        print(s)
        print(f"The country with the highest revenue is {s.index[0]}, with ${s.iloc[0]:,.2f}.")
        """,
    ),
    (
        "busiest_month",
        """
        import pandas as pd
        df = pd.read_csv("sales.csv", parse_dates=["date"])
        counts = df.groupby(df["date"].dt.month).size()
        print("Month with the most orders:", counts.idxmax())
        print("Orders:", counts.max())
        """,
    ),
    (
        "best_weekday",
        """
        import pandas as pd
        df = pd.read_csv("sales.csv", parse_dates=["date"])
        s = (df.units * df.unit_price).groupby(df["date"].dt.strftime("%a")).sum()
        print("Best day:", s.idxmax())
        """,
    ),
    (
        "running_total_date",
        """
        import pandas as pd
        df = pd.read_csv("sales.csv", parse_dates=["date"]).sort_values("date")
        hit = df[(df.units * df.unit_price).cumsum() >= 10000].iloc[0]
        print("Reached 10,000 on", hit["date"].strftime("%B %d, %Y"))
        """,
    ),
    (
        "quarter_growth",
        """
        import pandas as pd
        df = pd.read_csv("sales.csv", parse_dates=["date"])
        q = (df.units * df.unit_price).groupby(df["date"].dt.quarter).sum()
        print("growth:", round((q[2] - q[1]) / q[1], 4))
        """,
    ),
    (
        "celsius_table",
        """
        import pandas as pd
        c = pd.Series(range(-40, 101, 10))
        print(pd.DataFrame({"Celsius": c, "Fahrenheit": c * 9 / 5 + 32}))
        """,
    ),
    (
        "duplicate_rows",
        """
        import numpy as np
        import pandas as pd
        n = pd.read_csv("signups.csv").duplicated().sum()
        print(f"There are {n} duplicated rows out of 323.")
        print(repr(np.int64(n)))
        """,
    ),
    (
        "compound_interest",
        """
        print("Balance after 10 years:", round(10000 * (1 + 0.05 / 12) ** 120, 4))
        """,
    ),
    (
        "top_sku",
        """
        import json
        import pandas as pd
        items = pd.json_normalize(json.load(open("orders.json")), "items")
        print(items.groupby("sku")["qty"].sum().sort_values(ascending=False).head(1))
        """,
    ),
    (
        "busiest_month",
        """
        import pandas as pd
        counts = pd.read_csv("sales.csv", parse_dates=["date"])["date"].dt.month.value_counts()
        print((int(counts.idxmax()), int(counts.max())))
        """,
    ),
    (
        "roman_numerals",
        """
        def roman(n):
            values = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
                      (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]
            out = ""
            for value, s in values:
                count, n = divmod(n, value)
                out += s * count
            return out
        for n in (1994, 2024, 3999):
            print(roman(n))
        """,
    ),
    (
        "word_frequency",
        """
        import re
        from collections import Counter
        print(Counter(re.findall(r"\\w+", open("story.txt").read().lower())).most_common(5))
        """,
    ),
]


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Answer, int]]:
    """Every task's reference and wrong variant, and the restated answers, run once."""
    programs = []
    keys = []
    for task in TASKS:
        for variant, code in (("reference", task.reference), ("wrong", task.wrong)):
            programs.append((code, task.inputs()))
            keys.append((task.name, variant))
    for i, (name, code) in enumerate(RESTATED):
        programs.append((textwrap.dedent(code).strip() + "\n", BY_NAME[name].inputs()))
        keys.append((name, f"restated {i}"))
    results = run_directly(programs, tmp_path_factory.mktemp("direct"))
    return dict(zip(keys, results, strict=True))


def test_the_benchmark_has_at_least_40_tasks_in_every_category() -> None:
    assert len(TASKS) >= 40
    assert set(Counter(t.category for t in TASKS)) == set(CATEGORIES)


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_a_task_names_its_files_and_they_are_made_the_same_every_time(task: Task) -> None:
    inputs = task.inputs()
    assert inputs == task.inputs()
    for name in inputs:
        assert name in task.prompt, f"the prompt does not name {name}"


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_the_reference_passes_its_checker_and_the_wrong_variant_fails(
    task: Task, direct: dict[tuple[str, str], tuple[Answer, int]]
) -> None:
    answer, code = direct[(task.name, "reference")]
    assert code == 0, answer.output
    verdict = task.check(answer)
    assert verdict.ok, f"{verdict.why}\n--- output:\n{answer.output}"

    answer, _ = direct[(task.name, "wrong")]
    verdict = task.check(answer)
    assert not verdict.ok, f"the wrong variant passed:\n{answer.output}"
    assert verdict.why


@pytest.mark.parametrize(
    ("i", "name"), enumerate(name for name, _ in RESTATED), ids=[n for n, _ in RESTATED]
)
def test_a_right_answer_formatted_otherwise_passes(
    i: int, name: str, direct: dict[tuple[str, str], tuple[Answer, int]]
) -> None:
    answer, code = direct[(name, f"restated {i}")]
    assert code == 0, answer.output
    verdict = BY_NAME[name].check(answer)
    assert verdict.ok, f"{verdict.why}\n--- output:\n{answer.output}"


def test_numbers_are_read_as_people_write_them() -> None:
    text = "total $1,234.50; change −3 (−2.5%), np.float64(2.5), 1e3 rows, v2 and x.5, 2023-07-04"
    assert c.numbers(text) == [1234.5, -3, -2.5, 2.5, 1000, 2023, 7, 4]


def test_the_answer_is_the_last_line_with_a_number() -> None:
    assert c.final_number(Answer("rows: 300\nThe answer is 17.\nDone."), 17)
    assert not c.final_number(Answer("17 duplicates\nchecked 300 rows"), 17)
    assert c.final_number(Answer("16.7%"), 1 / 6, tol=0.001, percent=True)
    assert c.final_number(Answer("0.1667"), 1 / 6, tol=0.001, percent=True)
    assert not c.final_number(Answer("16.7"), 1 / 6, tol=0.001)


def test_each_name_must_be_followed_by_its_own_value() -> None:
    want = {"North": 10.5, "South": 20.25}
    assert c.keyed_numbers(Answer("{'North': 10.5, 'South': 20.25}"), want, tol=0.01)
    assert c.keyed_numbers(Answer("region\nNorth    10.50\nSouth    20.25\n"), want, tol=0.01)
    assert not c.keyed_numbers(Answer("{'North': 20.25, 'South': 10.5}"), want, tol=0.01)
    assert not c.keyed_numbers(
        Answer("North 10.5\nSouth 20.25\nFinal: North 11, South 20.25"), want, tol=0.01
    )


def test_a_choice_is_the_last_line_that_names_one() -> None:
    days = ["Monday", "Tuesday"]
    aliases = {"Monday": ["Mon"], "Tuesday": ["Tue"]}
    assert c.final_choice(Answer("Monday 10\nTuesday 30\nBest: Tue"), "Tuesday", days, aliases)
    assert not c.final_choice(Answer("Tuesday 30\nMonday 10"), "Tuesday", days, aliases)
    assert not c.final_choice(Answer("Monday or Tuesday"), "Tuesday", days, aliases)


def test_dates_and_months_in_their_usual_spellings() -> None:
    import datetime as dt

    day = dt.date(2023, 6, 22)
    for text in ("2023-06-22", "June 22, 2023", "22 June 2023", "Jun 22 2023", "2023-06-22 00:00"):
        assert c.dates(text) == [day], text
    for text in ("September", "Sep 2023", "2023-09", "09/2023", "Month with most orders: 9 (35)"):
        assert c.names_month(text, 2023, 9), text
    assert not c.names_month("Orders: 9", 2023, 9)


@pytest.fixture
def runner_script() -> Iterator[ModuleType]:
    """bench/tasks.py as a module (`bench.tasks` is the catalog package of the same name)."""
    path = Path(__file__).resolve().parents[1] / "bench" / "tasks.py"
    spec = importlib.util.spec_from_file_location("bench_tasks_script", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["region_revenue", "units_bar_png"])
def test_through_the_cli_the_reference_is_correct_and_the_wrong_code_a_wrong_success(
    name: str,
    runner_script: ModuleType,
    llm: ScriptedLLM,
    cli_env: dict[str, str],
    tmp_path: Path,
) -> None:
    task = BY_NAME[name]
    model = runner_script.resolve_model("endpoint", cli_env)
    outcomes = []
    for code in (task.reference, task.wrong):
        llm.script(fenced(code))
        outcomes.append(
            runner_script.run_task(task, model, "1", tmp_path, timeout=180, cli=autocoder_cmd())
        )
        assert task.prompt in llm.requests[0]["messages"][-1]["content"]

    right, wrong = outcomes
    assert (right.kind, right.status, right.attempts) == ("correct", "success", 1), right
    assert right.tokens is not None
    assert (wrong.kind, wrong.status) == ("wrong", "success"), wrong
    table = runner_script.summary(outcomes)
    assert "1/2" in table and "WRONG success" in table

    recorded = tmp_path / "runs.jsonl"
    recorded.write_text("".join(json.dumps(dataclasses.asdict(o)) + "\n" for o in outcomes))
    assert [o.kind for o in runner_script.rejudge(recorded)] == ["correct", "wrong"]
