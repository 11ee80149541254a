"""Tasks that need care: an empty file, wording a quick reading gets wrong (made unambiguous
by the prompt), and library defaults that quietly give a wrong answer."""

from __future__ import annotations

import datetime as dt
import statistics
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal

from . import datasets as ds
from .base import PASS, Answer, Task, Verdict, fail
from .check import final_number, keyed_numbers, lines, mentions


def check_empty(answer: Answer) -> Verdict:
    said = lines(answer.output)
    if not said or "no payments" not in said[-1].lower():
        return fail(f"the last line is {said[-1:]!r}, not 'no payments'")
    if mentions(answer.output, "nan"):
        return fail("the output has a NaN")
    return PASS


def orders_2024_times() -> list[dt.datetime]:
    return [dt.datetime.fromisoformat(r["ordered_at"]) for r in ds.orders_2024()]


def check_iso_week(answer: Answer) -> Verdict:
    n = sum(t.isocalendar()[:2] == (2024, 10) for t in orders_2024_times())
    return final_number(answer, n)


def check_march(answer: Answer) -> Verdict:
    return final_number(answer, sum((t.year, t.month) == (2024, 3) for t in orders_2024_times()))


def check_april(answer: Answer) -> Verdict:
    n = sum(r["date"][3:].startswith("04/2024") for r in ds.deliveries())
    return final_number(answer, n)


def check_half_up(answer: Answer) -> Verdict:
    total = sum(Decimal(r["price"]).quantize(Decimal(1), ROUND_HALF_UP) for r in ds.prices())
    return final_number(answer, float(total))


def check_zips(answer: Answer) -> Verdict:
    return final_number(answer, sum(r["zip"].startswith("0") for r in ds.addresses()))


def check_unknown_region(answer: Answer) -> Verdict:
    counts = Counter(r["region"] or "Unknown" for r in ds.clients())
    return keyed_numbers(answer, dict(counts))


def check_headerless(answer: Answer) -> Verdict:
    cents = sum(ds.cents(r["value"]) for r in ds.readings() if r["sensor"] == "S2")
    return final_number(answer, cents / 100, tol=0.006)


def check_european(answer: Answer) -> Verdict:
    return final_number(answer, sum(r["amount_cents"] for r in ds.invoices()) / 100, tol=0.006)


def check_median(answer: Answer) -> Verdict:
    values = ds.number_list()
    assert len(values) % 2 == 0
    return final_number(answer, statistics.median(values))


def check_absent_zero(answer: Answer) -> Verdict:
    return final_number(answer, statistics.fmean(r["score"] or 0 for r in ds.grades()), tol=0.006)


def check_growth(answer: Answer) -> Verdict:
    quarter: Counter[int] = Counter()
    for row in ds.sales():
        quarter[(int(row["date"][5:7]) - 1) // 3 + 1] += ds.revenue_cents(row)
    growth = (quarter[2] - quarter[1]) / quarter[1]
    return final_number(answer, growth, tol=0.0005, percent=True)


def orders_inputs() -> dict[str, bytes]:
    return {"orders_2024.csv": ds.orders_2024_csv()}


TASKS = [
    Task(
        name="empty_file",
        category="care",
        prompt="""What is the average payment amount in payments.csv? If there are no payments,
        print "no payments" instead of a number.""",
        inputs=lambda: {"payments.csv": ds.payments_csv()},
        check=check_empty,
        reference="""
        import pandas as pd
        df = pd.read_csv("payments.csv")
        print("no payments" if df.empty else round(df["amount"].mean(), 2))
        """,
        wrong="""
        import pandas as pd
        print(pd.read_csv("payments.csv")["amount"].mean())
        """,
    ),
    Task(
        name="iso_week",
        category="care",
        prompt="""How many orders in orders_2024.csv fall in ISO week 10 of 2024 (ISO 8601 weeks,
        which start on Monday)? Print the number.""",
        inputs=orders_inputs,
        check=check_iso_week,
        reference="""
        import pandas as pd
        df = pd.read_csv("orders_2024.csv", parse_dates=["ordered_at"])
        iso = df["ordered_at"].dt.isocalendar()
        print(((iso["year"] == 2024) & (iso["week"] == 10)).sum())
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("orders_2024.csv", parse_dates=["ordered_at"])
        print((df["ordered_at"].dt.strftime("%U").astype(int) == 10).sum())
        """,
    ),
    Task(
        name="whole_month",
        category="care",
        prompt="""How many orders in orders_2024.csv were placed in March 2024, from 1 March to
        31 March with both days included? Print the number.""",
        inputs=orders_inputs,
        check=check_march,
        reference="""
        import pandas as pd
        df = pd.read_csv("orders_2024.csv", parse_dates=["ordered_at"])
        print((df["ordered_at"].dt.to_period("M") == "2024-03").sum())
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("orders_2024.csv", parse_dates=["ordered_at"])
        t = df["ordered_at"]
        print(((t >= "2024-03-01") & (t <= "2024-03-31")).sum())
        """,
    ),
    Task(
        name="day_first_dates",
        category="care",
        prompt="""The dates in deliveries.csv are written day/month/year. How many deliveries were
        made in April 2024? Print the number.""",
        inputs=lambda: {"deliveries.csv": ds.deliveries_csv()},
        check=check_april,
        reference="""
        import pandas as pd
        df = pd.read_csv("deliveries.csv")
        d = pd.to_datetime(df["date"], format="%d/%m/%Y")
        print(((d.dt.year == 2024) & (d.dt.month == 4)).sum())
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("deliveries.csv")
        d = pd.to_datetime(df["date"], format="mixed")
        print(((d.dt.year == 2024) & (d.dt.month == 4)).sum())
        """,
    ),
    Task(
        name="round_half_up",
        category="care",
        prompt="""Round every price in prices.csv to the nearest whole dollar, with halves always
        rounded up (2.50 becomes 3, 3.50 becomes 4), and print the sum of the rounded prices.""",
        inputs=lambda: {"prices.csv": ds.prices_csv()},
        check=check_half_up,
        reference="""
        import numpy as np
        import pandas as pd
        df = pd.read_csv("prices.csv")
        print(int(np.floor(df["price"] + 0.5).sum()))
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("prices.csv")
        print(int(df["price"].round().sum()))
        """,
    ),
    Task(
        name="zip_leading_zero",
        category="care",
        prompt="""How many addresses in addresses.csv have a ZIP code that starts with 0? Print the
        number.""",
        inputs=lambda: {"addresses.csv": ds.addresses_csv()},
        check=check_zips,
        reference="""
        import pandas as pd
        df = pd.read_csv("addresses.csv", dtype={"zip": str})
        print(df["zip"].str.startswith("0").sum())
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("addresses.csv")
        print(df["zip"].astype(str).str.startswith("0").sum())
        """,
    ),
    Task(
        name="missing_as_unknown",
        category="care",
        prompt="""Count the clients in each region of clients.csv. Clients with no region count
        under "Unknown". Print each region with its count.""",
        inputs=lambda: {"clients.csv": ds.clients_csv()},
        check=check_unknown_region,
        reference="""
        import pandas as pd
        df = pd.read_csv("clients.csv")
        print(df["region"].fillna("Unknown").value_counts())
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("clients.csv")
        print(df["region"].value_counts())
        """,
    ),
    Task(
        name="no_header_row",
        category="care",
        prompt="""readings.csv has no header row; its columns are sensor, timestamp and value. What
        is the total value for sensor S2? Print it to 2 decimals.""",
        inputs=lambda: {"readings.csv": ds.readings_csv()},
        check=check_headerless,
        reference="""
        import pandas as pd
        df = pd.read_csv("readings.csv", header=None, names=["sensor", "timestamp", "value"])
        print(f"{df.loc[df['sensor'] == 'S2', 'value'].sum():.2f}")
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("readings.csv")
        df.columns = ["sensor", "timestamp", "value"]
        print(f"{df.loc[df['sensor'] == 'S2', 'value'].sum():.2f}")
        """,
    ),
    Task(
        name="decimal_comma",
        category="care",
        prompt="""invoices.csv comes from a European system: fields are separated by semicolons and
        amounts are written like 1.234,56 (a dot between thousands, a comma before the cents).
        What is the total amount? Print it to the cent.""",
        inputs=lambda: {"invoices.csv": ds.invoices_csv()},
        check=check_european,
        reference="""
        import pandas as pd
        df = pd.read_csv("invoices.csv", sep=";", thousands=".", decimal=",")
        print(f"{df['amount'].sum():.2f}")
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("invoices.csv", sep=";")
        amount = pd.to_numeric(df["amount"].str.replace(",", "."), errors="coerce")
        print(f"{amount.sum():.2f}")
        """,
    ),
    Task(
        name="median_of_text_numbers",
        category="care",
        prompt="""numbers.txt has one whole number per line. What is their median? With an even
        count, the median is the mean of the two middle values.""",
        inputs=lambda: {"numbers.txt": ds.numbers_txt()},
        check=check_median,
        reference="""
        import statistics
        print(statistics.median(int(line) for line in open("numbers.txt") if line.strip()))
        """,
        wrong="""
        values = sorted(open("numbers.txt").read().split())
        n = len(values)
        print((int(values[n // 2 - 1]) + int(values[n // 2])) / 2)
        """,
    ),
    Task(
        name="absent_counts_as_zero",
        category="care",
        prompt="""In grades.csv a missing score means the student was absent, and it counts as 0.
        What is the class average? Print it to 2 decimals.""",
        inputs=lambda: {"grades.csv": ds.grades_csv()},
        check=check_absent_zero,
        reference="""
        import pandas as pd
        df = pd.read_csv("grades.csv")
        print(f"{df['score'].fillna(0).mean():.2f}")
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("grades.csv")
        print(f"{df['score'].mean():.2f}")
        """,
    ),
    Task(
        name="quarter_growth",
        category="care",
        prompt="""By what percentage did the total revenue (units × unit_price) in sales.csv grow
        from the first quarter of 2023 to the second? Compute it as (Q2 − Q1) / Q1 and print it
        as a percentage with one decimal.""",
        inputs=lambda: {"sales.csv": ds.sales_csv()},
        check=check_growth,
        reference="""
        import pandas as pd
        df = pd.read_csv("sales.csv", parse_dates=["date"])
        q = (df["units"] * df["unit_price"]).groupby(df["date"].dt.quarter).sum()
        print(f"{(q[2] - q[1]) / q[1] * 100:.1f}%")
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("sales.csv", parse_dates=["date"])
        q = (df["units"] * df["unit_price"]).groupby(df["date"].dt.quarter).sum()
        print(f"{(q[2] - q[1]) / q[2] * 100:.1f}%")
        """,
    ),
]
