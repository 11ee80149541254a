"""The input files, made by seeded code with the standard library only: the same bytes on
every machine and every run, nothing downloaded.

Each generator returns rows (cached); `csv_bytes` and `json_bytes` turn them into the file a
user would hand over. The checkers compute their expected answers from these same rows in
plain Python, independently of the pandas code of the reference solutions.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import io
import json
import random
from collections.abc import Iterable, Sequence
from typing import Any

Row = dict[str, Any]

REGIONS = ("North", "South", "East", "West")
PRODUCTS = {"Widget": 4.99, "Gadget": 12.50, "Gizmo": 7.25, "Doohickey": 19.99}
COUNTRIES = ("Canada", "Mexico", "Brazil", "Japan", "Kenya", "Norway")
FIRST = [
    "Ana",
    "Ben",
    "Chloe",
    "Dev",
    "Ema",
    "Femi",
    "Gus",
    "Hana",
    "Ivo",
    "Jun",
    "Kai",
    "Lea",
    "Milo",
    "Nia",
    "Omar",
    "Pia",
    "Raj",
    "Sol",
    "Tara",
    "Uma",
]
LAST = [
    "Alves",
    "Berg",
    "Costa",
    "Diaz",
    "Eze",
    "Fong",
    "Gupta",
    "Haas",
    "Ito",
    "Jansen",
    "Kim",
    "Lund",
    "Mora",
    "Ncube",
    "Ortiz",
    "Park",
]


def csv_bytes(rows: Iterable[Row], columns: Sequence[str], *, delimiter: str = ",") -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row[c] is None else row[c] for c in columns])
    return out.getvalue().encode()


def json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


def cents(value: float) -> int:
    return round(value * 100)


@functools.cache
def sales() -> list[Row]:
    """300 orders of 2023, in the order they were keyed in (not by date)."""
    rng = random.Random(2027)
    rows = []
    for i in range(300):
        product = rng.choice(list(PRODUCTS))
        rows.append(
            {
                "order_id": 1001 + i,
                "date": (dt.date(2023, 1, 1) + dt.timedelta(days=rng.randrange(365))).isoformat(),
                "region": rng.choice(REGIONS),
                "product": product,
                "customer_id": f"C{rng.randint(1, 60):03d}",
                "units": rng.randint(1, 12),
                "unit_price": round(PRODUCTS[product] * rng.choice([1.0, 1.0, 0.9, 0.8]), 2),
            }
        )
    return rows


SALES_COLUMNS = ("order_id", "date", "region", "product", "customer_id", "units", "unit_price")


def revenue_cents(row: Row) -> int:
    return int(row["units"]) * cents(row["unit_price"])


def sales_csv() -> bytes:
    return csv_bytes(sales(), SALES_COLUMNS)


@functools.cache
def customers() -> list[Row]:
    rng = random.Random(60)
    return [
        {
            "customer_id": f"C{i:03d}",
            "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
            "country": rng.choice(COUNTRIES),
            "signup_date": (
                dt.date(2021, 1, 1) + dt.timedelta(days=rng.randrange(730))
            ).isoformat(),
        }
        for i in range(1, 61)
    ]


def customers_csv() -> bytes:
    return csv_bytes(customers(), ("customer_id", "name", "country", "signup_date"))


WEATHER_CITIES = {"Oslo": (-3.0, 0.30), "Madrid": (9.0, 0.05), "Cairo": (19.0, 0.10)}


@functools.cache
def weather() -> list[Row]:
    """Daily temperatures of three cities, Q1 2024; some days missing, most of them in Oslo."""
    rng = random.Random(91)
    rows = []
    for d in range(91):
        day = (dt.date(2024, 1, 1) + dt.timedelta(days=d)).isoformat()
        for city, (mean, missing) in WEATHER_CITIES.items():
            temp = None if rng.random() < missing else round(rng.gauss(mean, 3.0), 1)
            rows.append({"date": day, "city": city, "temp_c": temp})
    return rows


def weather_csv() -> bytes:
    return csv_bytes(weather(), ("date", "city", "temp_c"))


PLANS = ("free", "pro", "team")


@functools.cache
def signups() -> list[Row]:
    """300 distinct sign-ups, 17 of them entered twice (exact copies) and 6 entered again with
    another plan (same email, not a copy)."""
    rng = random.Random(17)
    base = []
    for i in range(300):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        base.append(
            {
                "name": f"{first} {last}",
                "email": f"{first}.{last}{i}@example.com".lower(),
                "plan": rng.choice(PLANS),
                "signed_up": (
                    dt.date(2024, 1, 1) + dt.timedelta(days=rng.randrange(120))
                ).isoformat(),
            }
        )
    rows = list(base)
    for row in rng.sample(base, 17):
        rows.insert(rng.randrange(rows.index(row) + 1, len(rows) + 1), dict(row))
    for row in rng.sample(base, 6):
        other = dict(row, plan=next(p for p in PLANS if p != row["plan"]))
        rows.insert(rng.randrange(rows.index(row) + 1, len(rows) + 1), other)
    return rows


def signups_csv() -> bytes:
    return csv_bytes(signups(), ("name", "email", "plan", "signed_up"))


SURVEY_MISSING = {"age": 12, "income": 31, "city": 7, "satisfaction": 19}


@functools.cache
def survey() -> list[Row]:
    rng = random.Random(200)
    rows: list[Row] = [
        {
            "respondent_id": i + 1,
            "age": rng.randint(18, 80),
            "income": rng.randrange(18000, 140000, 500),
            "city": rng.choice(("Leeds", "Lyon", "Porto", "Graz", "Turku")),
            "satisfaction": rng.randint(1, 5),
        }
        for i in range(200)
    ]
    for col, n in SURVEY_MISSING.items():
        for i in rng.sample(range(200), n):
            rows[i][col] = None
    return rows


def survey_csv() -> bytes:
    return csv_bytes(survey(), ("respondent_id", "age", "income", "city", "satisfaction"))


# SKU: (how often it is in an order, its quantity range). The ones in many orders sell one or
# two at a time; C-400 is in fewer orders but in bulk.
SKUS = {
    "A-100": (5, (1, 2)),
    "A-200": (3, (1, 3)),
    "B-300": (6, (1, 2)),
    "B-310": (2, (1, 4)),
    "C-400": (3, (3, 9)),
    "D-500": (2, (1, 5)),
}


@functools.cache
def orders() -> list[Row]:
    rng = random.Random(120)
    names = list(SKUS)
    weights = [SKUS[s][0] for s in names]
    out = []
    for i in range(120):
        chosen: list[str] = []
        while len(chosen) < rng.randint(1, 4):
            sku = rng.choices(names, weights)[0]
            if sku not in chosen:
                chosen.append(sku)
        out.append(
            {
                "order_id": f"SO-{5000 + i}",
                "customer": rng.choice(FIRST),
                "items": [
                    {
                        "sku": sku,
                        "qty": rng.randint(*SKUS[sku][1]),
                        "price": round(rng.uniform(2, 40), 2),
                    }
                    for sku in chosen
                ],
            }
        )
    return out


def orders_json() -> bytes:
    return json_bytes(orders())


@functools.cache
def users() -> list[Row]:
    rng = random.Random(150)
    return [
        {
            "id": i + 1,
            "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
            "age": rng.randint(18, 70),
            "signup": (dt.date(2021, 1, 1) + dt.timedelta(days=rng.randrange(3 * 365))).isoformat(),
            "active": rng.random() < 0.7,
        }
        for i in range(150)
    ]


def users_json() -> bytes:
    return json_bytes({"users": users()})


@functools.cache
def tickets() -> list[Row]:
    """Support tickets of March 2024; resolution times are skewed (a few take days); some are
    still open."""
    rng = random.Random(180)
    rows = []
    for i in range(180):
        opened = dt.datetime(2024, 3, 1, 8) + dt.timedelta(minutes=rng.randrange(30 * 24 * 60))
        closed = None
        if rng.random() > 0.15:
            closed = opened + dt.timedelta(minutes=round(rng.lognormvariate(5.5, 1.1)))
        rows.append(
            {
                "ticket_id": 7000 + i,
                "opened_at": opened.strftime("%Y-%m-%d %H:%M"),
                "closed_at": closed.strftime("%Y-%m-%d %H:%M") if closed else None,
            }
        )
    return rows


def tickets_csv() -> bytes:
    return csv_bytes(tickets(), ("ticket_id", "opened_at", "closed_at"))


@functools.cache
def ads() -> list[Row]:
    rng = random.Random(52)
    rows = []
    for week in range(1, 53):
        spend = rng.randrange(500, 5000, 50)
        rows.append(
            {
                "week": week,
                "ad_spend": spend,
                "visitors": round(800 + 0.9 * spend + rng.gauss(0, 600)),
                "sales": round(2000 + 1.8 * spend + rng.gauss(0, 1500), 2),
            }
        )
    return rows


def ads_csv() -> bytes:
    return csv_bytes(ads(), ("week", "ad_spend", "visitors", "sales"))


# Service: (share of the log lines, chance that a line is an error).
SERVICES = {"auth": (3, 0.08), "billing": (1, 0.30), "search": (5, 0.06), "email": (2, 0.10)}


@functools.cache
def app_log() -> list[Row]:
    rng = random.Random(600)
    names = list(SERVICES)
    start = dt.datetime(2024, 5, 1)
    rows = []
    for i in range(600):
        service = rng.choices(names, [SERVICES[s][0] for s in names])[0]
        r = rng.random()
        level = "ERROR" if r < SERVICES[service][1] else "WARNING" if r < 0.35 else "INFO"
        rows.append(
            {
                "ts": (start + dt.timedelta(seconds=37 * i)).isoformat(),
                "level": level,
                "service": service,
                "msg": f"request {i} handled" if level == "INFO" else f"request {i}: check it",
            }
        )
    return rows


def app_log_jsonl() -> bytes:
    return "".join(json.dumps(row) + "\n" for row in app_log()).encode()


@functools.cache
def contacts() -> list[Row]:
    """Names and emails as typed by people: mixed case, stray spaces, some left empty."""
    rng = random.Random(80)
    rows = []
    for i in range(80):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        email = f"{first}.{last}{i}@{rng.choice(('mail.com', 'corp.example', 'uni.edu'))}"
        email = "".join(c.upper() if rng.random() < 0.2 else c.lower() for c in email)
        if rng.random() < 0.25:
            email = " " * rng.randint(1, 2) + email + " " * rng.randint(0, 2)
        rows.append({"name": f"{first} {last}", "email": None if rng.random() < 0.12 else email})
    return rows


def contacts_csv() -> bytes:
    return csv_bytes(contacts(), ("name", "email"))


@functools.cache
def orders_2024() -> list[Row]:
    """Orders of January to April 2024 with their time of day."""
    rng = random.Random(400)
    start = dt.datetime(2024, 1, 1)
    rows = [
        {
            "order_id": 20000 + i,
            "ordered_at": (start + dt.timedelta(minutes=rng.randrange(121 * 24 * 60))).strftime(
                "%Y-%m-%d %H:%M:%S"
            ),
            "amount": round(rng.uniform(5, 300), 2),
        }
        for i in range(400)
    ]
    rows.sort(key=lambda r: str(r["ordered_at"]))
    return rows


def orders_2024_csv() -> bytes:
    return csv_bytes(orders_2024(), ("order_id", "ordered_at", "amount"))


@functools.cache
def deliveries() -> list[Row]:
    """Dates written day/month/year; the first rows have a day of 12 or less, so nothing in
    them says which part is the month."""
    rng = random.Random(250)
    rows = []
    for i in range(250):
        day = dt.date(2024, 1, 1) + dt.timedelta(days=rng.randrange(366))
        if i < 5:
            day = day.replace(day=rng.randint(1, 12))
        rows.append(
            {
                "delivery_id": f"D{i + 1:04d}",
                "date": day.strftime("%d/%m/%Y"),
                "weight_kg": round(rng.uniform(0.2, 30), 1),
            }
        )
    return rows


def deliveries_csv() -> bytes:
    return csv_bytes(deliveries(), ("delivery_id", "date", "weight_kg"))


CENTS = ("50", "50", "50", "25", "75", "49", "99", "00")


@functools.cache
def prices() -> list[Row]:
    rng = random.Random(61)
    return [
        {"item": f"item-{i + 1:02d}", "price": f"{rng.randint(1, 40)}.{rng.choice(CENTS)}"}
        for i in range(60)
    ]


def prices_csv() -> bytes:
    return csv_bytes(prices(), ("item", "price"))


@functools.cache
def addresses() -> list[Row]:
    rng = random.Random(120)
    places = [
        ("Boston", "MA", "02"),
        ("Hartford", "CT", "06"),
        ("Newark", "NJ", "07"),
        ("Austin", "TX", "78"),
        ("Denver", "CO", "80"),
        ("Seattle", "WA", "98"),
    ]
    rows = []
    for _ in range(120):
        city, state, prefix = rng.choice(places)
        rows.append(
            {
                "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
                "street": f"{rng.randint(1, 999)} {rng.choice(('Oak', 'Elm', 'Main', 'Pine'))} St",
                "city": city,
                "state": state,
                "zip": f"{prefix}{rng.randint(0, 999):03d}",
            }
        )
    return rows


def addresses_csv() -> bytes:
    return csv_bytes(addresses(), ("name", "street", "city", "state", "zip"))


@functools.cache
def clients() -> list[Row]:
    rng = random.Random(140)
    return [
        {
            "client_id": 300 + i,
            "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
            "region": None if rng.random() < 0.12 else rng.choice(REGIONS),
        }
        for i in range(140)
    ]


def clients_csv() -> bytes:
    return csv_bytes(clients(), ("client_id", "name", "region"))


@functools.cache
def readings() -> list[Row]:
    """Sensor readings; the file has no header, and its first row is one of S2's."""
    rng = random.Random(150)
    start = dt.datetime(2024, 6, 1)
    rows = []
    for i in range(150):
        sensor = "S2" if i == 0 else rng.choice(("S1", "S2", "S3"))
        value = 87.25 if i == 0 else round(rng.uniform(10, 60), 2)
        rows.append(
            {
                "sensor": sensor,
                "timestamp": (start + dt.timedelta(minutes=10 * i)).isoformat(sep=" "),
                "value": value,
            }
        )
    return rows


def readings_csv() -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in readings():
        writer.writerow([row["sensor"], row["timestamp"], row["value"]])
    return out.getvalue().encode()


@functools.cache
def invoices() -> list[Row]:
    """Amounts as a European system writes them: 1.234,56 (the cents are kept as integers)."""
    rng = random.Random(70)
    return [
        {
            "invoice": f"INV-{900 + i}",
            "client": rng.choice(LAST),
            "amount_cents": rng.choice((rng.randint(500, 99999), rng.randint(100000, 900000))),
        }
        for i in range(70)
    ]


def european(amount_cents: int) -> str:
    euros, rest = divmod(amount_cents, 100)
    return f"{euros:,}".replace(",", ".") + f",{rest:02d}"


def invoices_csv() -> bytes:
    rows = [
        {"invoice": r["invoice"], "client": r["client"], "amount": european(r["amount_cents"])}
        for r in invoices()
    ]
    return csv_bytes(rows, ("invoice", "client", "amount"), delimiter=";")


@functools.cache
def number_list() -> list[int]:
    """100 whole numbers of very different widths, so that sorting them as text is wrong."""
    rng = random.Random(100)
    widths = ((1, 99), (100, 999), (1000, 20000))
    return [rng.randint(*rng.choice(widths)) for _ in range(100)]


def numbers_txt() -> bytes:
    return "".join(f"{v}\n" for v in number_list()).encode()


@functools.cache
def grades() -> list[Row]:
    rng = random.Random(33)
    return [
        {
            "student": f"{FIRST[i % len(FIRST)]} {LAST[i % len(LAST)]}",
            "score": None if rng.random() < 0.15 else rng.randint(40, 100),
        }
        for i in range(40)
    ]


def grades_csv() -> bytes:
    return csv_bytes(grades(), ("student", "score"))


def payments_csv() -> bytes:
    return b"payment_id,customer,amount\n"


EMAILS = (
    "ana.alves@example.com",
    "ben+invoices@shop.example.org",
    "chloe_diaz@mail.uni.edu",
    "dev-ops@infra.example.co.uk",
    "ema.eze99@example.com",
    "femi@f.example.net",
    "gus.haas@example.com",
)


def notes_txt() -> bytes:
    """Meeting notes with email addresses in the ways people write them."""
    text = f"""\
Notes from the planning meeting, 12 March.

Ana asked that invoices go to {EMAILS[1]} from now on; questions to {EMAILS[0]}.
The infra team ({EMAILS[3]}) will move the servers. Contact: <{EMAILS[2]}>.
Reminder: Ema's new address is {EMAILS[4]}. Her old one, {EMAILS[0]}, still works.
Femi ({EMAILS[5]}) and Gus ({EMAILS[6]}) will review the budget; cc {EMAILS[3]}.
Not addresses: the @infra channel, "admin at example dot com", and the price 3@4.50.
Last: send slides to {EMAILS[6]}.
"""
    return text.encode()


def phone_numbers() -> tuple[list[str], int]:
    """Call notes, and how many numbers in them are written exactly like (555) 123-4567."""
    rng = random.Random(555)
    lines = []
    count = 0
    for i in range(60):
        a, b, c = rng.randint(200, 999), rng.randint(200, 999), rng.randint(0, 9999)
        form = rng.choice(("paren", "paren", "dash", "nospace", "long", "dots"))
        number = {
            "paren": f"({a}) {b}-{c:04d}",
            "dash": f"{a}-{b}-{c:04d}",
            "nospace": f"({a}){b}-{c:04d}",
            "long": f"({a}) {b}-{c:04d}{rng.randint(0, 9)}",
            "dots": f"{a}.{b}.{c:04d}",
        }[form]
        count += form == "paren"
        lines.append(
            f"{i + 1:02d}. Called {rng.choice(FIRST)} at {number}, {rng.randint(1, 59)} min."
        )
    return lines, count


def calls_txt() -> bytes:
    return ("\n".join(phone_numbers()[0]) + "\n").encode()


STORY_WORDS = [
    "river",
    "lantern",
    "harbor",
    "meadow",
    "copper",
    "falcon",
    "thunder",
    "garden",
    "ember",
    "orchard",
    "willow",
    "canyon",
    "beacon",
    "marble",
    "glacier",
    "pepper",
    "velvet",
    "saddle",
    "compass",
    "anchor",
]


@functools.cache
def story_words() -> list[str]:
    """The story's words in order (lower case), drawn with steeply falling weights."""
    rng = random.Random(7)
    weights = [1 / (i + 1) ** 1.1 for i in range(len(STORY_WORDS))]
    return rng.choices(STORY_WORDS, weights, k=1500)


def story_txt() -> bytes:
    rng = random.Random(8)
    words = story_words()
    sentences = []
    i = 0
    while i < len(words):
        n = rng.randint(5, 12)
        chunk = words[i : i + n]
        i += n
        chunk[0] = chunk[0].capitalize()
        if len(chunk) > 3:
            chunk[2] += ","
        sentences.append(" ".join(chunk) + rng.choice((".", ".", "!", "?")))
    return (" ".join(sentences) + "\n").encode()
