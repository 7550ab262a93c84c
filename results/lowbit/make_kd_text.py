"""Write the chat-formatted distillation text of the continued OneBit run (README "OneBit"): the train examples of
the tasks that are *not* measured on the OneBit base (addition, multiplication, unit-conversion, reverse-words,
caesar, pig-latin; never json-field or sort), each rendered with SmolLM2's chat template (prompt and reference
answer), five at a time between passages of the Shakespeare train plays.

Usage: .venv/bin/python results/lowbit/make_kd_text.py OUT.txt
"""

import sys

from deltafleet.models.loading import load_tokenizer, resolve_base
from deltafleet.tasks import TASKS
from deltafleet.tasks.text import shakespeare_text

tokenizer = load_tokenizer(resolve_base("smollm2-135m"))
names = ["addition", "multiplication", "unit-conversion", "reverse-words", "caesar", "pig-latin"]
examples = [TASKS[n].examples("train", seed=0) for n in names]
chats = [tokenizer.apply_chat_template([{"role": "user", "content": e.prompt},
                                        {"role": "assistant", "content": e.answer}], tokenize=False)
         for group in zip(*examples, strict=False) for e in group]
plays = shakespeare_text("train")
parts, pos = [], 0
for i in range(0, len(chats), 5):
    parts.extend(chats[i:i + 5])
    parts.append(plays[pos:pos + 600] + "\n")
    pos = (pos + 600) % len(plays)
open(sys.argv[1], "w", encoding="utf-8").write("".join(parts))
print(f"{len(chats)} conversations, {len(parts) - len(chats)} passages, {sum(map(len, parts)):,} characters")
