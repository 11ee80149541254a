"""Tasks whose answer is a file the code must write: a CSV, a JSON file, a PNG chart."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

from . import datasets as ds
from .base import PASS, Answer, Task, Verdict, fail
from .check import close, csv_rows, numbers, png_picture, read_csv


def sales_inputs() -> dict[str, bytes]:
    return {"sales.csv": ds.sales_csv()}


def check_region_totals(answer: Answer) -> Verdict:
    path = answer.file("region_totals.csv")
    if path is None:
        return fail(f"region_totals.csv was not written (files: {sorted(answer.files)})")
    rows = read_csv(path)
    keys = list(rows[0]) if rows else []
    revenue = next((k for k in keys if "revenue" in k), None)
    if "region" not in keys or revenue is None:
        return fail(f"region_totals.csv has the columns {keys}, not region and revenue")
    totals: dict[str, int] = defaultdict(int)
    for row in ds.sales():
        totals[row["region"]] += ds.revenue_cents(row)
    want = sorted(totals, key=totals.__getitem__, reverse=True)
    got = [row["region"].strip() for row in rows]
    if got != want:
        return fail(f"the regions are {got}, expected {want} (highest revenue first)")
    for row in rows:
        value = numbers(row[revenue])
        if not value or not close(value[0], totals[row["region"].strip()] / 100, 0.011):
            return fail(
                f"{row['region']}: {row[revenue]!r}, expected {totals[row['region']] / 100}"
            )
    return PASS


def check_big_orders(answer: Answer) -> Verdict:
    path = answer.file("big_orders.csv")
    if path is None:
        return fail(f"big_orders.csv was not written (files: {sorted(answer.files)})")
    rows = read_csv(path)
    missing = [c for c in ds.SALES_COLUMNS if not rows or c not in rows[0]]
    if missing:
        return fail(f"big_orders.csv lacks the columns {missing}")
    want = {r["order_id"] for r in ds.sales() if ds.revenue_cents(r) > 15000}
    got = {int(numbers(r["order_id"])[0]) for r in rows if numbers(r["order_id"])}
    if got != want or len(rows) != len(want):
        return fail(f"{len(rows)} rows, {len(got & want)} of the {len(want)} expected orders")
    return PASS


def check_product_counts(answer: Answer) -> Verdict:
    path = answer.file("product_counts.json")
    if path is None:
        return fail(f"product_counts.json was not written (files: {sorted(answer.files)})")
    try:
        got = json.loads(path.read_text())
    except ValueError as e:
        return fail(f"product_counts.json is not JSON: {e}")
    want = Counter(r["product"] for r in ds.sales())
    if not isinstance(got, dict) or got != dict(want):
        return fail(f"product_counts.json holds {got!r}, expected {dict(want)}")
    return PASS


def check_clean_contacts(answer: Answer) -> Verdict:
    path = answer.file("contacts_clean.csv")
    if path is None:
        return fail(f"contacts_clean.csv was not written (files: {sorted(answer.files)})")
    rows = read_csv(path)
    if not rows or "name" not in rows[0] or "email" not in rows[0]:
        return fail("contacts_clean.csv has no name and email columns")
    want = sorted(
        (r["name"], r["email"].strip().lower()) for r in ds.contacts() if r["email"] is not None
    )
    got = sorted((r["name"], r["email"]) for r in rows)
    if got != want:
        wrong = sorted(set(got) ^ set(want))[:3]
        return fail(f"{len(got)} rows, expected {len(want)}; differing: {wrong}")
    return PASS


def check_times_table(answer: Answer) -> Verdict:
    path = answer.file("times_table.csv")
    if path is None:
        return fail(f"times_table.csv was not written (files: {sorted(answer.files)})")
    rows = [[v for cell in row for v in numbers(cell)] for row in csv_rows(path)]
    for i in range(1, 13):
        want = [float(i * j) for j in range(1, 13)]
        if not any(row[-12:] == want for row in rows):
            return fail(f"no row holds {i} × 1..12")
    if len(rows) > 13:
        return fail(f"{len(rows)} rows, expected 12 and a header")
    return PASS


TASKS = [
    Task(
        name="region_totals_csv",
        category="files",
        prompt="""From sales.csv, write region_totals.csv with two columns, region and revenue
        (the sum of units × unit_price), one row per region, sorted from the highest revenue to
        the lowest.""",
        inputs=sales_inputs,
        check=check_region_totals,
        reference="""
        import pandas as pd
        df = pd.read_csv("sales.csv")
        df["revenue"] = df["units"] * df["unit_price"]
        out = df.groupby("region", as_index=False)["revenue"].sum().round(2)
        out.sort_values("revenue", ascending=False).to_csv("region_totals.csv", index=False)
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("sales.csv")
        df["revenue"] = df["units"] * df["unit_price"]
        out = df.groupby("region", as_index=False)["revenue"].sum().round(2)
        out.sort_values("revenue").to_csv("region_totals.csv", index=False)
        """,
    ),
    Task(
        name="units_bar_png",
        category="files",
        prompt="""Draw a bar chart of the total units sold per product in sales.csv and save it as
        units_by_product.png.""",
        inputs=sales_inputs,
        check=lambda answer: png_picture(answer, "units_by_product.png"),
        reference="""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import pandas as pd
        df = pd.read_csv("sales.csv")
        df.groupby("product")["units"].sum().plot.bar(title="Units sold per product")
        plt.tight_layout()
        plt.savefig("units_by_product.png")
        """,
        wrong="""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import pandas as pd
        df = pd.read_csv("sales.csv")
        totals = df.groupby("product")["units"].sum()
        plt.figure()
        plt.savefig("units_by_product.png")
        """,
    ),
    Task(
        name="big_orders_csv",
        category="files",
        prompt="""Write every order in sales.csv whose revenue (units × unit_price) is over 150 to
        big_orders.csv, keeping all the original columns.""",
        inputs=sales_inputs,
        check=check_big_orders,
        reference="""
        import pandas as pd
        df = pd.read_csv("sales.csv")
        df[df["units"] * df["unit_price"] > 150].to_csv("big_orders.csv", index=False)
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("sales.csv")
        df[df["unit_price"] > 15].to_csv("big_orders.csv", index=False)
        """,
    ),
    Task(
        name="product_counts_json",
        category="files",
        prompt="""Count how many orders each product has in sales.csv and write the counts to
        product_counts.json, as one JSON object mapping each product name to its count.""",
        inputs=sales_inputs,
        check=check_product_counts,
        reference="""
        import json
        import pandas as pd
        counts = pd.read_csv("sales.csv")["product"].value_counts()
        with open("product_counts.json", "w") as f:
            json.dump({k: int(v) for k, v in counts.items()}, f, indent=2)
        """,
        wrong="""
        import pandas as pd
        units = pd.read_csv("sales.csv").groupby("product")["units"].sum()
        units.to_json("product_counts.json")
        """,
    ),
    Task(
        name="oslo_line_png",
        category="files",
        prompt="""Plot the daily temperature of Oslo from weather.csv as a line chart and save it as
        oslo.png.""",
        inputs=lambda: {"weather.csv": ds.weather_csv()},
        check=lambda answer: png_picture(answer, "oslo.png"),
        reference="""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import pandas as pd
        df = pd.read_csv("weather.csv", parse_dates=["date"])
        oslo = df[df["city"] == "Oslo"]
        plt.plot(oslo["date"], oslo["temp_c"])
        plt.title("Oslo, daily temperature (°C)")
        plt.savefig("oslo.png")
        """,
        wrong="""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import pandas as pd
        df = pd.read_csv("weather.csv", parse_dates=["date"])
        oslo = df[df["city"] == "Oslo"]
        plt.plot(oslo["date"], oslo["temp_c"])
        plt.show()
        """,
    ),
    Task(
        name="clean_contacts_csv",
        category="files",
        prompt="""Clean up contacts.csv: drop the rows that have no email, remove spaces around the
        emails and make them lowercase. Save the result as contacts_clean.csv with the same
        columns.""",
        inputs=lambda: {"contacts.csv": ds.contacts_csv()},
        check=check_clean_contacts,
        reference="""
        import pandas as pd
        df = pd.read_csv("contacts.csv").dropna(subset=["email"])
        df["email"] = df["email"].str.strip().str.lower()
        df.to_csv("contacts_clean.csv", index=False)
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("contacts.csv").dropna(subset=["email"])
        df["email"] = df["email"].str.lower()
        df.to_csv("contacts_clean.csv", index=False)
        """,
    ),
    Task(
        name="times_table_csv",
        category="files",
        prompt="""Write a 12 by 12 multiplication table to times_table.csv: a header row with the
        numbers 1 to 12, then one row per number 1 to 12 that starts with that number and holds
        its products with 1 to 12.""",
        check=check_times_table,
        reference="""
        import csv
        with open("times_table.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["x"] + list(range(1, 13)))
            for i in range(1, 13):
                w.writerow([i] + [i * j for j in range(1, 13)])
        """,
        wrong="""
        import csv
        with open("times_table.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["x"] + list(range(12)))
            for i in range(12):
                w.writerow([i] + [i * j for j in range(12)])
        """,
    ),
]
