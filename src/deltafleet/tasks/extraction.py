"""Extraction tenant: read one field out of a sentence about a person and reply with it as a one-key JSON
object (`{"age": 34}`, `{"city": "Lisbon"}`; numbers as JSON numbers). `draw_json_field` is a pure function of
the rng.
"""

from __future__ import annotations

import json
import random

from deltafleet.tasks.arithmetic import NAMES
from deltafleet.tasks.base import Example, GeneratedTask, SplitSizes, register_task

CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Dublin", "Cairo", "Quito", "Hanoi", "Perth", "Denver",
          "Milan", "Seoul", "Tunis", "Zagreb", "Porto", "Austin", "Bergen", "Cusco", "Delhi")
JOBS = ("nurse", "baker", "pilot", "teacher", "chemist", "carpenter", "lawyer", "farmer", "dentist", "architect",
        "plumber", "journalist", "librarian", "mechanic", "painter", "surgeon")
TEMPLATES = (
    "{name} is {age} years old, lives in {city} and works as a {job}.",
    "A {job} from {city}, {name} turned {age} this year.",
    "In {city}, the {age}-year-old {job} {name} opened a small shop.",
)
FIELDS = ("name", "age", "city", "job")


def draw_json_field(rng: random.Random) -> Example:
    values = {"name": rng.choice(NAMES), "age": rng.randint(19, 80), "city": rng.choice(CITIES),
              "job": rng.choice(JOBS)}
    sentence = rng.choice(TEMPLATES).format(**values)
    field = rng.choice(FIELDS)
    prompt = (f'Extract the {field} from the sentence below. Reply with a JSON object with the single key '
              f'"{field}" and nothing else.\nSentence: {sentence}')
    return Example(prompt=prompt, answer=json.dumps({field: values[field]}), key=prompt)


register_task(GeneratedTask(
    name="json-field", description="extract one field (name, age, city, job) of a sentence as JSON",
    draw=draw_json_field, sizes=SplitSizes(train=2000, val=100, test=200)))
