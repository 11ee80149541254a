"""Everyday programming: primes, dates, regular expressions, unit tables, seeded simulations."""

from __future__ import annotations

import calendar
import datetime as dt
import math
import re
from collections import Counter

from . import datasets as ds
from .base import PASS, Answer, Task, Verdict, fail
from .check import (
    final_choice,
    final_number,
    final_numbers,
    keyed_numbers,
    lines,
    mentions,
    numbers,
    row_with,
)


def primes_below(n: int) -> list[int]:
    sieve = bytearray([1]) * n
    sieve[:2] = b"\x00\x00"
    for i in range(2, math.isqrt(n) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(range(i * i, n, i)))
    return [i for i in range(n) if sieve[i]]


WEEKDAY_NAMES = [d.capitalize() for d in calendar.day_name]


def check_weekday(answer: Answer) -> Verdict:
    day = calendar.day_name[dt.date(2000, 2, 29).weekday()]
    return final_choice(answer, day, WEEKDAY_NAMES, {d: [d[:3]] for d in WEEKDAY_NAMES})


EMAIL = r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"


def check_emails(answer: Answer) -> Verdict:
    found = []
    for m in re.finditer(EMAIL, answer.output):
        if m.group(0) not in found:
            found.append(m.group(0))
    want = sorted(set(ds.EMAILS))
    if sorted(found) != want:
        return fail(f"found {sorted(found)}, expected {want}")
    if found != want:
        return fail(f"not in alphabetical order: {found}")
    return PASS


def check_phones(answer: Answer) -> Verdict:
    return final_number(answer, ds.phone_numbers()[1])


def check_celsius(answer: Answer) -> Verdict:
    for c in range(-40, 101, 10):
        if not row_with(answer, c, c * 9 / 5 + 32, 0.051):
            return fail(f"no row gives {c} °C as {c * 9 / 5 + 32:g} °F")
    return PASS


def check_miles(answer: Answer) -> Verdict:
    for m in range(1, 11):
        if not row_with(answer, m, m * 1.609344, 0.006):
            return fail(f"no row gives {m} miles as {m * 1.609344:.2f} km")
    return PASS


def random_walk_mean_abs(steps: int) -> float:
    """E|S_n| of a simple symmetric random walk of n (even) steps: n * C(n, n/2) / 2^n."""
    return steps * math.comb(steps, steps // 2) / 2**steps


def fibonacci_index(digits: int) -> int:
    a, b, i = 1, 1, 2
    while len(str(b)) < digits:
        a, b, i = b, a + b, i + 1
    return i


def collatz_length(n: int, cache: dict[int, int]) -> int:
    path = []
    while n not in cache:
        path.append(n)
        n = n // 2 if n % 2 == 0 else 3 * n + 1
    length = cache[n]
    for m in reversed(path):
        length += 1
        cache[m] = length
    return length


def check_collatz(answer: Answer) -> Verdict:
    cache = {1: 1}
    best = max(range(1, 100_000), key=lambda n: collatz_length(n, cache))
    return final_numbers(answer, [best, cache[best]])


def check_words(answer: Answer) -> Verdict:
    counts = Counter(ds.story_words()).most_common(6)
    assert len({n for _, n in counts}) == 6, "the top words must not tie"
    top5 = dict(counts[:5])
    verdict = keyed_numbers(answer, top5)
    if not verdict:
        return verdict
    vocabulary = "|".join(ds.STORY_WORDS)
    named = re.findall(rf"(?<!\w)(?:{vocabulary})(?!\w)", answer.output.lower())
    order = list(dict.fromkeys(named))
    if order[:5] != list(top5):
        return fail(f"the words come in the order {order[:5]}, expected {list(top5)}")
    return PASS


ROMAN = {1994: "MCMXCIV", 2024: "MMXXIV", 3999: "MMMCMXCIX"}


def check_roman(answer: Answer) -> Verdict:
    """Each year beside its numeral, or the numerals alone in the order the years were asked."""
    alone = re.findall(r"(?<![\w])[MDCLXVI]+(?![\w])", answer.output)
    if alone == list(ROMAN.values()):
        return PASS
    for year, numeral in ROMAN.items():
        if not any(
            year in numbers(line) and mentions(line, numeral) for line in lines(answer.output)
        ):
            return fail(f"no line gives {year} as {numeral}")
    return PASS


def monthly_payment(principal: float, annual_rate: float, years: int) -> float:
    r, n = annual_rate / 12, years * 12
    return principal * r / (1 - (1 + r) ** -n)


TASKS = [
    Task(
        name="sum_of_primes",
        category="programming",
        prompt="What is the sum of all prime numbers below 100,000? Print it.",
        check=lambda a: final_number(a, sum(primes_below(100_000))),
        reference="""
        def is_prime(n):
            if n < 2:
                return False
            d = 2
            while d * d <= n:
                if n % d == 0:
                    return False
                d += 1
            return True
        print(sum(n for n in range(100000) if is_prime(n)))
        """,
        wrong="""
        def is_prime(n):
            return n > 1 and all(n % d for d in range(2, int(n ** 0.5)))
        print(sum(n for n in range(100000) if is_prime(n)))
        """,
    ),
    Task(
        name="nth_prime",
        category="programming",
        prompt="Print the 10,001st prime number.",
        check=lambda a: final_number(a, primes_below(200_000)[10_000]),
        reference="""
        primes = []
        n = 2
        while len(primes) < 10001:
            if all(n % p for p in primes if p * p <= n):
                primes.append(n)
            n += 1
        print(primes[-1])
        """,
        wrong="""
        primes = []
        n = 2
        while len(primes) < 10001:
            if all(n % p for p in primes if p * p <= n):
                primes.append(n)
            n += 1
        print(primes[10000 - 1])
        """,
    ),
    Task(
        name="days_between",
        category="programming",
        prompt="""How many days are there from 14 March 2021 to 2 November 2024 (the end date minus
        the start date)? Print the number.""",
        check=lambda a: final_number(a, (dt.date(2024, 11, 2) - dt.date(2021, 3, 14)).days),
        reference="""
        from datetime import date
        print((date(2024, 11, 2) - date(2021, 3, 14)).days)
        """,
        wrong="""
        from datetime import date
        print((date(2024, 11, 2) - date(2021, 3, 14)).days + 1)
        """,
    ),
    Task(
        name="weekday_of_date",
        category="programming",
        prompt="What day of the week was 29 February 2000?",
        check=check_weekday,
        reference="""
        import datetime
        print(datetime.date(2000, 2, 29).strftime("%A"))
        """,
        wrong="""
        import calendar, datetime
        print(calendar.day_name[datetime.date(2000, 2, 29).isoweekday()])
        """,
    ),
    Task(
        name="weekdays_in_year",
        category="programming",
        prompt="How many weekdays (Monday to Friday) are there in 2024? Print the number.",
        check=lambda a: final_number(
            a,
            sum(
                (dt.date(2024, 1, 1) + dt.timedelta(days=i)).weekday() < 5
                for i in range((dt.date(2025, 1, 1) - dt.date(2024, 1, 1)).days)
            ),
        ),
        reference="""
        import numpy as np
        print(np.busday_count("2024-01-01", "2025-01-01"))
        """,
        wrong="""
        print(52 * 5)
        """,
    ),
    Task(
        name="leap_years",
        category="programming",
        prompt="How many leap years are there from 1900 to 2100, both included?",
        check=lambda a: final_number(a, sum(calendar.isleap(y) for y in range(1900, 2101))),
        reference="""
        import calendar
        print(sum(calendar.isleap(y) for y in range(1900, 2101)))
        """,
        wrong="""
        print(sum(1 for y in range(1900, 2101) if y % 4 == 0))
        """,
    ),
    Task(
        name="extract_emails",
        category="programming",
        prompt="""Find every email address in notes.txt and print the distinct ones in alphabetical
        order, one per line.""",
        inputs=lambda: {"notes.txt": ds.notes_txt()},
        check=check_emails,
        reference="""
        import re
        text = open("notes.txt").read()
        found = re.findall(r"[\\w.+-]+@[\\w-]+(?:\\.[\\w-]+)*\\.[a-z]{2,}", text)
        for email in sorted(set(found)):
            print(email)
        """,
        wrong="""
        import re
        text = open("notes.txt").read()
        for email in sorted(set(re.findall(r"\\w+@\\w+\\.\\w+", text))):
            print(email)
        """,
    ),
    Task(
        name="count_phone_numbers",
        category="programming",
        prompt="""How many phone numbers in calls.txt are written exactly in the form
        (555) 123-4567, that is: three digits in parentheses, a space, three digits, a hyphen and
        four digits? Print the count.""",
        inputs=lambda: {"calls.txt": ds.calls_txt()},
        check=check_phones,
        reference="""
        import re
        text = open("calls.txt").read()
        print(len(re.findall(r"(?<!\\d)\\(\\d{3}\\) \\d{3}-\\d{4}(?!\\d)", text)))
        """,
        wrong="""
        import re
        text = open("calls.txt").read()
        print(len(re.findall(r"\\(\\d{3}\\) \\d{3}-\\d{4}", text)))
        """,
    ),
    Task(
        name="celsius_table",
        category="programming",
        prompt="""Print a table converting Celsius to Fahrenheit for -40 °C to 100 °C in steps of
        10 degrees.""",
        check=check_celsius,
        reference="""
        for c in range(-40, 101, 10):
            print(f"{c:>5} °C = {c * 9 / 5 + 32:6.1f} °F")
        """,
        wrong="""
        for c in range(-40, 101, 10):
            print(f"{c:>5} °C = {c * 9 / 5:6.1f} °F")
        """,
    ),
    Task(
        name="miles_table",
        category="programming",
        prompt="Print a table of 1 to 10 miles in kilometres, to 2 decimal places.",
        check=check_miles,
        reference="""
        import pandas as pd
        miles = pd.Series(range(1, 11))
        print(pd.DataFrame({"miles": miles, "km": (miles * 1.609344).round(2)}))
        """,
        wrong="""
        for m in range(1, 11):
            print(m, "miles =", f"{m * 1.6:.2f}", "km")
        """,
    ),
    Task(
        name="dice_sevens",
        category="programming",
        prompt="""Simulate 200,000 rolls of two fair six-sided dice with numpy, seed 42, and print
        the fraction of rolls where the two dice add up to 7.""",
        check=lambda a: final_number(a, 1 / 6, tol=0.004, percent=True),
        reference="""
        import numpy as np
        rng = np.random.default_rng(42)
        dice = rng.integers(1, 7, size=(200000, 2))
        print((dice.sum(axis=1) == 7).mean())
        """,
        wrong="""
        import numpy as np
        np.random.seed(42)
        dice = np.random.randint(1, 6, size=(200000, 2))
        print((dice.sum(axis=1) == 7).mean())
        """,
    ),
    Task(
        name="random_walk",
        category="programming",
        prompt="""With random seed 0, simulate 5,000 random walks of 100 steps each, every step +1
        or -1 with equal probability. Print the average of the absolute values of the final
        positions.""",
        check=lambda a: final_number(a, random_walk_mean_abs(100), tol=0.4),
        reference="""
        import numpy as np
        rng = np.random.default_rng(0)
        steps = rng.choice([-1, 1], size=(5000, 100))
        print(np.abs(steps.sum(axis=1)).mean())
        """,
        wrong="""
        import numpy as np
        rng = np.random.default_rng(0)
        steps = rng.choice([-1, 1], size=(5000, 100))
        print(steps.sum(axis=1).mean())
        """,
    ),
    Task(
        name="monte_carlo_pi",
        category="programming",
        prompt="""Estimate pi by Monte Carlo with 1,000,000 random points (seed 1) and print the
        estimate.""",
        check=lambda a: final_number(a, math.pi, tol=0.01),
        reference="""
        import numpy as np
        rng = np.random.default_rng(1)
        x, y = rng.random((2, 1000000))
        print(4 * np.mean(x * x + y * y <= 1))
        """,
        wrong="""
        import numpy as np
        rng = np.random.default_rng(1)
        x, y = rng.random((2, 1000000))
        print(np.mean(x * x + y * y <= 1))
        """,
    ),
    Task(
        name="fibonacci_digits",
        category="programming",
        prompt="""With F(1) = F(2) = 1, what is the index of the first Fibonacci number that has
        1000 digits? Print the index.""",
        check=lambda a: final_number(a, fibonacci_index(1000)),
        reference="""
        a, b, i = 1, 1, 2
        while len(str(b)) < 1000:
            a, b, i = b, a + b, i + 1
        print(i)
        """,
        wrong="""
        a, b, i = 0, 1, 0
        while len(str(b)) < 1000:
            a, b, i = b, a + b, i + 1
        print(i)
        """,
    ),
    Task(
        name="longest_collatz",
        category="programming",
        prompt="""Which starting number below 100,000 has the longest Collatz sequence? Print the
        number and the length of its sequence (counting the starting number and the final 1).""",
        check=check_collatz,
        reference="""
        from functools import lru_cache
        import sys
        sys.setrecursionlimit(10000)
        @lru_cache(maxsize=None)
        def length(n):
            if n == 1:
                return 1
            return 1 + length(n // 2 if n % 2 == 0 else 3 * n + 1)
        best = max(range(1, 100000), key=length)
        print(best, length(best))
        """,
        wrong="""
        def length(n):
            k = 1
            while n != 1:
                n = n // 2 if n % 2 == 0 else 3 * n + 1
                k += 1
            return k
        best = max(range(1, 10000), key=length)
        print(best, length(best))
        """,
    ),
    Task(
        name="word_frequency",
        category="programming",
        prompt="""List the 5 most frequent words in story.txt, ignoring upper/lower case and
        punctuation, with how many times each occurs, most frequent first.""",
        inputs=lambda: {"story.txt": ds.story_txt()},
        check=check_words,
        reference="""
        import re
        from collections import Counter
        words = re.findall(r"[a-z]+", open("story.txt").read().lower())
        for word, n in Counter(words).most_common(5):
            print(word, n)
        """,
        wrong="""
        from collections import Counter
        words = open("story.txt").read().split()
        for word, n in Counter(words).most_common(5):
            print(word, n)
        """,
    ),
    Task(
        name="roman_numerals",
        category="programming",
        prompt="Convert 1994, 2024 and 3999 to Roman numerals and print each.",
        check=check_roman,
        reference="""
        def roman(n):
            out = ""
            for value, s in [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"),
                             (90, "XC"), (50, "L"), (40, "XL"), (10, "X"), (9, "IX"),
                             (5, "V"), (4, "IV"), (1, "I")]:
                while n >= value:
                    out += s
                    n -= value
            return out
        for n in (1994, 2024, 3999):
            print(n, "->", roman(n))
        """,
        wrong="""
        def roman(n):
            out = ""
            for value, s in [(1000, "M"), (500, "D"), (100, "C"), (50, "L"), (10, "X"),
                             (5, "V"), (1, "I")]:
                while n >= value:
                    out += s
                    n -= value
            return out
        for n in (1994, 2024, 3999):
            print(n, "->", roman(n))
        """,
    ),
    Task(
        name="compound_interest",
        category="programming",
        prompt="""I put $10,000 in an account that pays 5% a year, compounded monthly. How much is in
        it after 10 years? Print the amount to the cent.""",
        check=lambda a: final_number(a, round(10_000 * (1 + 0.05 / 12) ** 120, 2), tol=0.006),
        reference="""
        print(f"${10000 * (1 + 0.05 / 12) ** 120:,.2f}")
        """,
        wrong="""
        print(f"${10000 * 1.05 ** 10:,.2f}")
        """,
    ),
    Task(
        name="loan_payment",
        category="programming",
        prompt="""What is the monthly payment on a $250,000 loan over 30 years at 6.5% annual
        interest, with monthly payments (a standard amortizing loan)? Print it to the cent.""",
        check=lambda a: final_number(a, round(monthly_payment(250_000, 0.065, 30), 2), tol=0.006),
        reference="""
        r, n = 0.065 / 12, 360
        print(round(250000 * r / (1 - (1 + r) ** -n), 2))
        """,
        wrong="""
        print(round(250000 * (1 + 0.065 * 30) / 360, 2))
        """,
    ),
    Task(
        name="smallest_multiple",
        category="programming",
        prompt="""What is the smallest positive number that is evenly divisible by every number from
        1 to 20?""",
        check=lambda a: final_number(a, math.lcm(*range(1, 21))),
        reference="""
        import math
        print(math.lcm(*range(1, 21)))
        """,
        wrong="""
        print(2 * 3 * 5 * 7 * 11 * 13 * 17 * 19)
        """,
    ),
]
