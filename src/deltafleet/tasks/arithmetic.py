"""Arithmetic tenants: multi-digit addition with carries, two-digit times one-digit multiplication, and unit
conversion word problems. Each `draw_*` is a pure function of the rng; answers are integers in decimal.
"""

from __future__ import annotations

import random

from deltafleet.tasks.base import Example, GeneratedTask, SplitSizes, register_task

NUMBER_ONLY = "Reply with the number only."


def has_carry(a: int, b: int) -> bool:
    """True when adding a and b column by column carries at least once."""
    while a or b:
        if a % 10 + b % 10 >= 10:
            return True
        a, b = a // 10, b // 10
    return False


def draw_addition(rng: random.Random) -> Example:
    """a + b with 3 to 5 digits each, at least one carry."""
    while True:
        da, db = rng.randint(3, 5), rng.randint(3, 5)
        a, b = rng.randrange(10 ** (da - 1), 10**da), rng.randrange(10 ** (db - 1), 10**db)
        if has_carry(a, b):
            break
    prompt = f"What is {a} + {b}? {NUMBER_ONLY}"
    return Example(prompt=prompt, answer=str(a + b), key=prompt)


def draw_multiplication(rng: random.Random) -> Example:
    """a * b with a in 10..99 and b in 2..9 (720 problems in all)."""
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    prompt = f"What is {a} * {b}? {NUMBER_ONLY}"
    return Example(prompt=prompt, answer=str(a * b), key=prompt)


# (from unit, to unit, factor, contexts); a context is a sentence with {name} and {v} slots.
CONVERSIONS = (
    ("kilometers", "meters", 1000, ("{name} walks {v} kilometers.", "A road is {v} kilometers long.")),
    ("meters", "centimeters", 100, ("A rope is {v} meters long.", "{name} swims {v} meters.")),
    ("kilograms", "grams", 1000, ("A bag of flour weighs {v} kilograms.", "{name} carries {v} kilograms of apples.")),
    ("hours", "minutes", 60, ("A train ride takes {v} hours.", "{name} studies for {v} hours.")),
    ("minutes", "seconds", 60, ("A song lasts {v} minutes.", "{name} waits {v} minutes for the bus.")),
    ("days", "hours", 24, ("A trip lasts {v} days.", "{name} stays at the farm for {v} days.")),
    ("weeks", "days", 7, ("A course runs for {v} weeks.", "{name} travels for {v} weeks.")),
    ("feet", "inches", 12, ("A fence is {v} feet long.", "{name} climbs {v} feet.")),
    ("yards", "feet", 3, ("A garden is {v} yards wide.", "{name} throws a ball {v} yards.")),
    ("liters", "milliliters", 1000, ("A tank holds {v} liters.", "{name} drinks {v} liters of water.")),
    ("dollars", "cents", 100, ("{name} has {v} dollars.", "A book costs {v} dollars.")),
)
NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jonas", "Kemi", "Liam",
         "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yusuf", "Zoe")


def draw_unit_conversion(rng: random.Random) -> Example:
    """'{context} How many {to} is that?' with v in 2..250; the key is (v, from, to), so names and
    contexts do not separate a problem from its rephrasings."""
    src, dst, factor, contexts = rng.choice(CONVERSIONS)
    v = rng.randint(2, 250)
    context = rng.choice(contexts).format(name=rng.choice(NAMES), v=v)
    prompt = f"{context} How many {dst} is that? {NUMBER_ONLY}"
    return Example(prompt=prompt, answer=str(v * factor), key=f"{v} {src} -> {dst}")


register_task(GeneratedTask(
    name="addition", description="multi-digit addition with at least one carry (3-5 digit operands)",
    draw=draw_addition, sizes=SplitSizes(train=2000, val=100, test=200)))
register_task(GeneratedTask(
    name="multiplication", description="two-digit times one-digit multiplication (10..99 x 2..9)",
    draw=draw_multiplication, sizes=SplitSizes(train=450, val=40, test=50)))
register_task(GeneratedTask(
    name="unit-conversion", description="unit conversion word problem (length, mass, time, volume, money)",
    draw=draw_unit_conversion, sizes=SplitSizes(train=1500, val=100, test=200)))
