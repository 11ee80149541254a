"""Questions about a CSV or JSON file the user gives with `--file`."""

from __future__ import annotations

import calendar
import datetime as dt
import statistics
from collections import Counter, defaultdict

from . import datasets as ds
from .base import PASS, Answer, Task, Verdict, fail
from .check import (
    after,
    choice_and_number,
    final_choice,
    final_date,
    final_number,
    in_order,
    keyed_numbers,
    lines,
    mentions,
    names_month,
    names_other_month,
    numbers,
)


def sales_inputs() -> dict[str, bytes]:
    return {"sales.csv": ds.sales_csv()}


def revenue_by(key: str) -> dict[str, float]:
    totals: dict[str, int] = defaultdict(int)
    for row in ds.sales():
        totals[row[key]] += ds.revenue_cents(row)
    return {k: v / 100 for k, v in totals.items()}


def top(values: dict[str, float]) -> str:
    """The key of the largest value; the data are made so that it is unique."""
    ranked = sorted(values, key=values.__getitem__, reverse=True)
    assert values[ranked[0]] != values[ranked[1]], "the data must not tie"
    return ranked[0]


def check_region_revenue(answer: Answer) -> Verdict:
    return keyed_numbers(answer, revenue_by("region"), tol=0.011)


def check_mean_units(answer: Answer) -> Verdict:
    units: dict[str, list[int]] = defaultdict(list)
    for row in ds.sales():
        units[row["product"]].append(row["units"])
    return keyed_numbers(answer, {p: statistics.mean(u) for p, u in units.items()}, tol=0.006)


def country_revenue() -> dict[str, float]:
    country = {c["customer_id"]: c["country"] for c in ds.customers()}
    totals: dict[str, int] = defaultdict(int)
    for row in ds.sales():
        totals[country[row["customer_id"]]] += ds.revenue_cents(row)
    return {k: v / 100 for k, v in totals.items()}


def check_top_country(answer: Answer) -> Verdict:
    revenue = country_revenue()
    best = top(revenue)
    return choice_and_number(answer, best, ds.COUNTRIES, revenue[best], tol=0.011)


def check_busiest_month(answer: Answer) -> Verdict:
    counts = Counter(int(row["date"][5:7]) for row in ds.sales())
    (month, n), (_, second) = counts.most_common(2)
    assert n != second
    naming = [
        line
        for line in lines(answer.output)
        if any(names_month(line, 2023, m) for m in range(1, 13))
    ]
    if not naming:
        # A terse answer, `(9, 35)` or `2023 9 35`, names the month by its number alone.
        numeric = [line for line in lines(answer.output) if numbers(line)]
        if numeric and [v for v in numbers(numeric[-1]) if v != 2023] == [month, n]:
            return PASS
        return fail(f"no month is named; expected {calendar.month_name[month]} ({n} orders)")
    last = naming[-1]
    if not names_month(last, 2023, month) or names_other_month(last, 2023, month):
        return fail(f"the answer line {last!r} does not name {calendar.month_name[month]} alone")
    if n in numbers(last) or final_number(answer, n):
        return PASS
    return fail(f"{calendar.month_name[month]} is named but not its {n} orders")


def check_pivot(answer: Answer) -> Verdict:
    units: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in ds.sales():
        units[row["region"]][row["product"]] += row["units"]
    products = list(ds.PRODUCTS)
    header = [line for line in lines(answer.output) if all(mentions(line, p) for p in products)]
    if header:
        order = sorted(products, key=lambda p: header[-1].lower().index(p.lower()))
    else:
        return fail("no line names every product as a column")
    for region in ds.REGIONS:
        rows = [s for s in (after(line, region, ds.REGIONS) for line in lines(answer.output)) if s]
        if not rows:
            return fail(f"no row for {region}")
        found = numbers(rows[-1])
        want = [float(units[region][p]) for p in order]
        it = iter(found)
        if not all(any(v == w for v in it) for w in want):
            return fail(f"{region}: expected {want} in the columns {order}; found {found}")
    return PASS


def check_duplicates(answer: Answer) -> Verdict:
    seen: set[tuple[object, ...]] = set()
    copies = 0
    for row in ds.signups():
        key = tuple(row.values())
        copies += key in seen
        seen.add(key)
    return final_number(answer, copies)


def check_most_missing(answer: Answer) -> Verdict:
    columns = ["respondent_id", "age", "income", "city", "satisfaction"]
    missing = {c: sum(row[c] is None for row in ds.survey()) for c in columns}
    worst = top({c: float(v) for c, v in missing.items()})
    return choice_and_number(answer, worst, columns, missing[worst])


def check_city_fill(answer: Answer) -> Verdict:
    by_city: dict[str, list[float]] = defaultdict(list)
    for row in ds.weather():
        if row["temp_c"] is not None:
            by_city[row["city"]].append(row["temp_c"])
    means = {c: statistics.fmean(v) for c, v in by_city.items()}
    filled = [
        row["temp_c"] if row["temp_c"] is not None else means[row["city"]] for row in ds.weather()
    ]
    return final_number(answer, statistics.fmean(filled), tol=0.006)


def check_top_sku(answer: Answer) -> Verdict:
    qty: Counter[str] = Counter()
    for order in ds.orders():
        for item in order["items"]:
            qty[item["sku"]] += item["qty"]
    best = top({k: float(v) for k, v in qty.items()})
    return choice_and_number(answer, best, list(ds.SKUS), qty[best])


def check_active_age(answer: Answer) -> Verdict:
    ages = [u["age"] for u in ds.users() if u["active"] and u["signup"].startswith("2022")]
    return final_number(answer, statistics.fmean(ages), tol=0.051)


def check_median_hours(answer: Answer) -> Verdict:
    hours = []
    for t in ds.tickets():
        if t["closed_at"]:
            opened = dt.datetime.fromisoformat(t["opened_at"])
            closed = dt.datetime.fromisoformat(t["closed_at"])
            hours.append((closed - opened).total_seconds() / 3600)
    return final_number(answer, statistics.median(hours), tol=0.006)


WEEKDAY_NAMES = [d.capitalize() for d in calendar.day_name]
WEEKDAY_ALIASES = {d: [d[:3]] for d in WEEKDAY_NAMES}


def check_best_weekday(answer: Answer) -> Verdict:
    totals: dict[str, int] = defaultdict(int)
    for row in ds.sales():
        day = calendar.day_name[dt.date.fromisoformat(row["date"]).weekday()]
        totals[day] += ds.revenue_cents(row)
    best = top({k: float(v) for k, v in totals.items()})
    return final_choice(answer, best, WEEKDAY_NAMES, WEEKDAY_ALIASES)


def check_top_customers(answer: Answer) -> Verdict:
    revenue = revenue_by("customer_id")
    ranked = sorted(revenue, key=revenue.__getitem__, reverse=True)
    assert revenue[ranked[2]] != revenue[ranked[3]]
    return in_order(answer, ranked[:3], r"\bC\d{3}\b")


def check_distinct_customers(answer: Answer) -> Verdict:
    seen: dict[str, set[str]] = defaultdict(set)
    for row in ds.sales():
        seen[row["region"]].add(row["customer_id"])
    return keyed_numbers(answer, {r: len(c) for r, c in seen.items()})


def check_correlation(answer: Answer) -> Verdict:
    rows = ds.ads()
    r = statistics.correlation([x["ad_spend"] for x in rows], [x["sales"] for x in rows])
    return final_number(answer, r, tol=0.0006)


def check_errors_by_service(answer: Answer) -> Verdict:
    errors = Counter(row["service"] for row in ds.app_log() if row["level"] == "ERROR")
    best = top({k: float(v) for k, v in errors.items()})
    return choice_and_number(answer, best, list(ds.SERVICES), errors[best])


def check_running_total(answer: Answer) -> Verdict:
    total = 0
    for row in sorted(ds.sales(), key=lambda r: r["date"]):
        total += ds.revenue_cents(row)
        if total >= 1_000_000:
            return final_date(answer, dt.date.fromisoformat(row["date"]))
    raise AssertionError("the sales never reach 10,000")


REVENUE = 'df["revenue"] = df["units"] * df["unit_price"]'

TASKS = [
    Task(
        name="region_revenue",
        category="data",
        prompt="""sales.csv has one row per order. What is the total revenue (units × unit_price)
        of each region? Print each region with its total, to the cent.""",
        inputs=sales_inputs,
        check=check_region_revenue,
        reference=f"""
        import pandas as pd
        df = pd.read_csv("sales.csv")
        {REVENUE}
        for region, total in df.groupby("region")["revenue"].sum().items():
            print(f"{{region}}: ${{total:,.2f}}")
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("sales.csv")
        print(df.groupby("region")["unit_price"].sum())
        """,
    ),
    Task(
        name="mean_units_by_product",
        category="data",
        prompt="""What is the average number of units per order for each product in sales.csv?
        Print them rounded to 2 decimals.""",
        inputs=sales_inputs,
        check=check_mean_units,
        reference="""
        import pandas as pd
        df = pd.read_csv("sales.csv")
        print(df.groupby("product")["units"].mean().round(2))
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("sales.csv")
        print(df.groupby("product")["units"].median())
        """,
    ),
    Task(
        name="top_country",
        category="data",
        prompt="""sales.csv lists orders and customers.csv lists customers with their country.
        Which country's customers brought in the most revenue (units × unit_price)? Print the
        country and its revenue.""",
        inputs=lambda: {"sales.csv": ds.sales_csv(), "customers.csv": ds.customers_csv()},
        check=check_top_country,
        reference=f"""
        import pandas as pd
        df = pd.read_csv("sales.csv").merge(pd.read_csv("customers.csv"), on="customer_id")
        {REVENUE}
        by_country = df.groupby("country")["revenue"].sum()
        print(by_country.idxmax(), round(by_country.max(), 2))
        """,
        wrong=f"""
        import pandas as pd
        df = pd.read_csv("sales.csv").merge(pd.read_csv("customers.csv"), on="customer_id")
        {REVENUE}
        by_country = df.groupby("country")["revenue"].mean()
        print(by_country.idxmax(), round(by_country.max(), 2))
        """,
    ),
    Task(
        name="busiest_month",
        category="data",
        prompt="""Which month of 2023 had the most orders in sales.csv, and how many orders was
        that?""",
        inputs=sales_inputs,
        check=check_busiest_month,
        reference="""
        import pandas as pd
        df = pd.read_csv("sales.csv", parse_dates=["date"])
        counts = df.groupby(df["date"].dt.month_name()).size()
        print(f"{counts.idxmax()} 2023 had the most orders: {counts.max()}")
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("sales.csv", parse_dates=["date"])
        units = df.groupby(df["date"].dt.month)["units"].sum()
        print(f"Month {units.idxmax()}: {units.max()} orders")
        """,
    ),
    Task(
        name="pivot_units",
        category="data",
        prompt="""Make a pivot table from sales.csv of the total units sold, with regions as rows
        and products as columns, and print it.""",
        inputs=sales_inputs,
        check=check_pivot,
        reference="""
        import pandas as pd
        df = pd.read_csv("sales.csv")
        print(df.pivot_table(index="region", columns="product", values="units", aggfunc="sum"))
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("sales.csv")
        print(df.pivot_table(index="region", columns="product", values="units"))
        """,
    ),
    Task(
        name="duplicate_rows",
        category="data",
        prompt="""Some rows of signups.csv were entered twice. How many rows are exact copies of
        an earlier row? Print the number.""",
        inputs=lambda: {"signups.csv": ds.signups_csv()},
        check=check_duplicates,
        reference="""
        import pandas as pd
        df = pd.read_csv("signups.csv")
        print("exact duplicate rows:", df.duplicated().sum())
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("signups.csv")
        print("duplicates:", df.duplicated(subset="email").sum())
        """,
    ),
    Task(
        name="most_missing_column",
        category="data",
        prompt="""Which column of survey.csv has the most missing values, and how many values are
        missing in it?""",
        inputs=lambda: {"survey.csv": ds.survey_csv()},
        check=check_most_missing,
        reference="""
        import pandas as pd
        missing = pd.read_csv("survey.csv").isna().sum()
        print(f"{missing.idxmax()}: {missing.max()} missing")
        """,
        wrong="""
        import pandas as pd
        missing = pd.read_csv("survey.csv").isna().sum()
        print(f"{missing.index[1]}: {missing.iloc[1]} missing")
        """,
    ),
    Task(
        name="fill_by_city_mean",
        category="data",
        prompt="""Fill each missing temperature in weather.csv with the average temperature of the
        same city, then print the average temperature over all rows, to 2 decimals.""",
        inputs=lambda: {"weather.csv": ds.weather_csv()},
        check=check_city_fill,
        reference="""
        import pandas as pd
        df = pd.read_csv("weather.csv")
        df["temp_c"] = df["temp_c"].fillna(df.groupby("city")["temp_c"].transform("mean"))
        print(round(df["temp_c"].mean(), 2))
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("weather.csv")
        print(round(df["temp_c"].fillna(df["temp_c"].mean()).mean(), 2))
        """,
    ),
    Task(
        name="top_sku",
        category="data",
        prompt="""orders.json holds a list of orders, each with its items. Which SKU sold the most
        units in total (sum of qty)? Print the SKU and its number of units.""",
        inputs=lambda: {"orders.json": ds.orders_json()},
        check=check_top_sku,
        reference="""
        import json
        from collections import Counter
        units = Counter()
        for order in json.load(open("orders.json")):
            for item in order["items"]:
                units[item["sku"]] += item["qty"]
        sku, n = units.most_common(1)[0]
        print(sku, n)
        """,
        wrong="""
        import json
        from collections import Counter
        lines = Counter(i["sku"] for o in json.load(open("orders.json")) for i in o["items"])
        print(*lines.most_common(1)[0])
        """,
    ),
    Task(
        name="active_users_age",
        category="data",
        prompt="""What is the average age of the active users in users.json who signed up in 2022?
        Print it to one decimal place.""",
        inputs=lambda: {"users.json": ds.users_json()},
        check=check_active_age,
        reference="""
        import json
        import pandas as pd
        users = pd.DataFrame(json.load(open("users.json"))["users"])
        chosen = users[users["active"] & users["signup"].str.startswith("2022")]
        print(f"{chosen['age'].mean():.1f}")
        """,
        wrong="""
        import json
        import pandas as pd
        users = pd.DataFrame(json.load(open("users.json"))["users"])
        print(f"{users[users['signup'].str.startswith('2022')]['age'].mean():.1f}")
        """,
    ),
    Task(
        name="median_resolution_hours",
        category="data",
        prompt="""For the tickets in tickets.csv that have been closed, what is the median time from
        opened_at to closed_at, in hours? Print it to 2 decimals.""",
        inputs=lambda: {"tickets.csv": ds.tickets_csv()},
        check=check_median_hours,
        reference="""
        import pandas as pd
        df = pd.read_csv("tickets.csv", parse_dates=["opened_at", "closed_at"]).dropna()
        hours = (df["closed_at"] - df["opened_at"]).dt.total_seconds() / 3600
        print(f"median: {hours.median():.2f} hours")
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("tickets.csv", parse_dates=["opened_at", "closed_at"]).dropna()
        hours = (df["closed_at"] - df["opened_at"]).dt.total_seconds() / 3600
        print(f"median: {hours.mean():.2f} hours")
        """,
    ),
    Task(
        name="best_weekday",
        category="data",
        prompt="""On which day of the week does sales.csv have the highest total revenue
        (units × unit_price)?""",
        inputs=sales_inputs,
        check=check_best_weekday,
        reference=f"""
        import pandas as pd
        df = pd.read_csv("sales.csv", parse_dates=["date"])
        {REVENUE}
        print(df.groupby(df["date"].dt.day_name())["revenue"].sum().idxmax())
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("sales.csv", parse_dates=["date"])
        print(df.groupby(df["date"].dt.day_name()).size().idxmax())
        """,
    ),
    Task(
        name="top3_customers",
        category="data",
        prompt="""Who are the top 3 customers in sales.csv by total revenue (units × unit_price)?
        Print their customer_id, best first.""",
        inputs=sales_inputs,
        check=check_top_customers,
        reference=f"""
        import pandas as pd
        df = pd.read_csv("sales.csv")
        {REVENUE}
        print(df.groupby("customer_id")["revenue"].sum().nlargest(3))
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("sales.csv")
        print(df.groupby("customer_id")["units"].sum().nlargest(3))
        """,
    ),
    Task(
        name="customers_per_region",
        category="data",
        prompt="""How many different customers bought something in each region of sales.csv?""",
        inputs=sales_inputs,
        check=check_distinct_customers,
        reference="""
        import pandas as pd
        df = pd.read_csv("sales.csv")
        print(df.groupby("region")["customer_id"].nunique().to_dict())
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("sales.csv")
        print(df.groupby("region")["customer_id"].count())
        """,
    ),
    Task(
        name="ad_correlation",
        category="data",
        prompt="""What is the Pearson correlation between ad_spend and sales in ads.csv? Print it
        rounded to 3 decimals.""",
        inputs=lambda: {"ads.csv": ds.ads_csv()},
        check=check_correlation,
        reference="""
        import pandas as pd
        df = pd.read_csv("ads.csv")
        print(round(df["ad_spend"].corr(df["sales"]), 3))
        """,
        wrong="""
        import pandas as pd
        df = pd.read_csv("ads.csv")
        print(round(df["ad_spend"].corr(df["sales"], method="spearman"), 3))
        """,
    ),
    Task(
        name="errors_by_service",
        category="data",
        prompt="""app.jsonl has one JSON log entry per line. Which service logged the most ERROR
        entries, and how many?""",
        inputs=lambda: {"app.jsonl": ds.app_log_jsonl()},
        check=check_errors_by_service,
        reference="""
        import pandas as pd
        df = pd.read_json("app.jsonl", lines=True)
        errors = df[df["level"] == "ERROR"].groupby("service").size()
        print(f"{errors.idxmax()} ({errors.max()} errors)")
        """,
        wrong="""
        import pandas as pd
        df = pd.read_json("app.jsonl", lines=True)
        entries = df.groupby("service").size()
        print(f"{entries.idxmax()} ({entries.max()} errors)")
        """,
    ),
    Task(
        name="running_total_date",
        category="data",
        prompt="""Going through sales.csv in date order, on which date does the running total of
        revenue (units × unit_price) first reach 10,000? Print the date.""",
        inputs=sales_inputs,
        check=check_running_total,
        reference=f"""
        import pandas as pd
        df = pd.read_csv("sales.csv").sort_values("date", kind="stable")
        {REVENUE}
        print(df.loc[df["revenue"].cumsum() >= 10000, "date"].iloc[0])
        """,
        wrong=f"""
        import pandas as pd
        df = pd.read_csv("sales.csv")
        {REVENUE}
        print(df.loc[df["revenue"].cumsum() >= 10000, "date"].iloc[0])
        """,
    ),
]
