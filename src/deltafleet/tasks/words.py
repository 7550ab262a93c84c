"""Word tenants: reversing a list of words, Caesar shift of a word, Pig Latin, all over a fixed vocabulary of
common lowercase English words (3 to 8 letters). Each `draw_*` is a pure function of the rng.
"""

from __future__ import annotations

import random

from deltafleet.tasks.base import Example, GeneratedTask, SplitSizes, register_task

_WORD_TEXT = """
able acid actor adult after agent alarm album alert alive angle angry apple april arena argue armor arrow
artist aspect audio aunt autumn award badge baker balance bamboo banana banner basket battle beach beard
beauty berry bicycle bird blanket blossom board boat bottle branch brave bread breeze brick bridge bright
bronze brother brush bucket budget butter button cabin cable camera camp candle canvas canyon captain carbon
carpet carrot castle cattle cellar center chair chalk chance change chapter cheese cherry chicken circle city
clever cliff climate clock cloud coast coffee collar color comet copper corner cotton country courage cousin
crater cream crowd crystal culture curtain dance danger daughter desert design detail diamond dinner doctor
dolphin donkey dragon drawer dream driver eagle early earth echo editor eleven empire energy engine evening
fabric falcon family farmer father feather fence festival field finger flame flower forest fossil fountain
frame friend frost fruit galaxy garden garlic gentle giant ginger glass globe golden gravity guitar hammer
harbor harvest hazel helmet hero honey horizon horse hunter island jacket jelly jewel journey jungle kettle
kingdom kitchen knight ladder lake lantern laser lemon letter library light lily lion liquid lizard lobster
magnet maple marble market meadow melody metal mirror monkey morning mountain museum music needle nephew
nickel night noble north number ocean office olive onion orange orbit orchard oyster paddle palace panda paper
parrot pencil pepper piano picnic pillow pilot planet plastic pocket poem potato powder prince puzzle quartz
rabbit radio rain ribbon river rocket salmon sand school season shadow shelter signal silver sister sketch
smile spider spring square statue stone storm street sugar summer sunset table teacher temple thunder ticket
tiger timber tomato tower travel tulip tunnel turtle umbrella uncle unicorn valley velvet village violin
volcano wagon walnut water whale window winter wizard wolf wonder yellow yogurt zebra
"""
WORDS = tuple(_WORD_TEXT.split())
VOWELS = "aeiou"


def pig_latin_word(word: str) -> str:
    """Move the leading consonants (a 'qu' travels together; 'y' after the first letter counts as a vowel) to
    the end and add 'ay'; a word that starts with a vowel gets 'way'."""
    if word[0] in VOWELS:
        return word + "way"
    i = 0
    while i < len(word) and word[i] not in VOWELS and not (i > 0 and word[i] == "y"):
        i += 2 if word[i : i + 2] == "qu" else 1
    return word[i:] + word[:i] + "ay"


def caesar(word: str, shift: int) -> str:
    """Shift each lowercase letter forward by `shift` places, z wrapping to a."""
    return "".join(chr((ord(c) - ord("a") + shift) % 26 + ord("a")) for c in word)


def draw_reverse_words(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(4, 6))
    prompt = f"Reverse the order of these words: {' '.join(words)}. Reply with the words only, separated by spaces."
    return Example(prompt=prompt, answer=" ".join(reversed(words)), key=prompt)


def draw_caesar(rng: random.Random) -> Example:
    word, shift = rng.choice(WORDS), rng.randint(1, 5)
    prompt = (f"Apply a Caesar shift of {shift} to the word '{word}': move each letter {shift} places forward in "
              f"the alphabet, z wraps to a. Reply with the shifted word only.")
    return Example(prompt=prompt, answer=caesar(word, shift), key=prompt)


def draw_pig_latin(rng: random.Random) -> Example:
    words = rng.sample(WORDS, 2)
    prompt = (f"Translate '{' '.join(words)}' into Pig Latin: move each word's leading consonants to its end and "
              f"add 'ay'; a word starting with a vowel gets 'way'. Reply with the translation only.")
    return Example(prompt=prompt, answer=" ".join(pig_latin_word(w) for w in words), key=prompt)


register_task(GeneratedTask(
    name="reverse-words", description="reverse a list of 4-6 words",
    draw=draw_reverse_words, sizes=SplitSizes(train=2000, val=100, test=200)))
register_task(GeneratedTask(
    name="caesar", description="Caesar shift (1-5) of one word",
    draw=draw_caesar, sizes=SplitSizes(train=800, val=60, test=100)))
register_task(GeneratedTask(
    name="pig-latin", description="translate two words into Pig Latin",
    draw=draw_pig_latin, sizes=SplitSizes(train=2000, val=100, test=200)))
