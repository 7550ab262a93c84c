"""List tenant: sort a list of numbers ascending. `draw_sort` is a pure function of the rng."""

from __future__ import annotations

import random

from deltafleet.tasks.base import Example, GeneratedTask, SplitSizes, register_task


def draw_sort(rng: random.Random) -> Example:
    """5 to 7 distinct numbers in 0..99; the answer is comma-separated ascending."""
    numbers = rng.sample(range(100), rng.randint(5, 7))
    shown = ", ".join(map(str, numbers))
    prompt = f"Sort these numbers in ascending order: {shown}. Reply with the sorted numbers only, comma-separated."
    return Example(prompt=prompt, answer=", ".join(map(str, sorted(numbers))), key=prompt)


register_task(GeneratedTask(
    name="sort", description="sort 5-7 numbers (0..99) ascending",
    draw=draw_sort, sizes=SplitSizes(train=2000, val=100, test=200)))
