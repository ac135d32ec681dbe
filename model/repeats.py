"""Which words a caption may say twice: "a black dog and a white dog", never "a hat and a hat".

A caption names a thing once. It names it again only to tell two apart, and then a modifier comes
right before the second mention ("a white dog", "another man", "two men"). So a content word that
is already in the caption may come again only straight after a modifier, and after a describing
one ("white", "young") only if an earlier mention was described too: "a black dog and a white dog",
never "a dog and a black dog" or "a crowd of people in a large crowd". A counting modifier
("another", "two") needs no such first mention: "a dog chases another dog".

A thing worn is worn by someone: "a man in a blue shirt and a black shirt" dresses one man twice.
So clothing already named comes again only after a new person: "a man in a red jacket next to a
woman in a blue jacket". Function words repeat freely (trigram blocking in the beam search stops
their loops), and so do the modifiers themselves: "a black jacket and a black hat" is what people
write.
"""
from collections import Counter

import torch

FUNCTION_WORDS = frozenset("""
a an the and or but of in on at with without to into onto from by for as near next over under
through across along around behind beside between against up down out off while where who whom
whose which that this these those there here it its he she they them his her their him is are
was were be been being has have had do does
""".split())

# words that come before a noun to set one thing apart from another of its kind
MODIFIERS = frozenset("""
another other one two three four five six seven eight nine ten several many some each both
black white brown red blue green yellow orange pink purple gray grey tan golden dark light
striped spotted plaid colorful
little small large big tall short long young old older younger baby adult
first second third last same different front back left right
""".split())

# modifiers that count or contrast rather than describe: a first mention needs none of its own
COUNTING = frozenset("""
another other one two three four five six seven eight nine ten several many some each both
first second third last same different
""".split())

WORN = frozenset("""
hat hats cap caps helmet helmets shirt shirts top tops jacket jackets coat coats sweater sweaters
sweatshirt hoodie vest dress dresses skirt shorts pants jeans suit suits uniform uniforms outfit
outfits costume costumes bikini swimsuit wetsuit scarf gloves glasses sunglasses goggles shoes boots
sneakers backpack headband hood jersey jerseys apron robe mask
""".split())

# who can wear something: a new one of them lets clothing be named again
PEOPLE = frozenset("""
man men woman women boy boys girl girls child children kid kids person people lady ladies guy guys
baby babies toddler toddlers player players someone adult adults teenager teenagers teen teens couple
family skier skiers snowboarder biker bikers cyclist rider riders skateboarder surfer climber swimmer
runner runners dancer dancers worker workers friend friends gentleman female male he she they
""".split())


def content_words(words: list[str]) -> list[str]:
    return [w for w in words if w not in FUNCTION_WORDS and w not in MODIFIERS]


def repeats_content(words: list[str]) -> bool:
    """True if a content word (neither a function word nor a modifier) occurs twice."""
    return any(n > 1 for n in Counter(content_words(words)).values())


def rule(words: list[str], specials: int) -> dict[str, torch.Tensor]:
    """The beam search's options for a vocabulary (`words`, the first `specials` of them special
    tokens): which ids are content words, modifiers, counting modifiers, clothing and people, as
    (V,) masks."""
    def mask(test) -> torch.Tensor:
        return torch.tensor([i >= specials and test(w) for i, w in enumerate(words)])
    return {"content_words": mask(lambda w: w not in FUNCTION_WORDS and w not in MODIFIERS),
            "modifiers": mask(lambda w: w in MODIFIERS), "counting": mask(lambda w: w in COUNTING),
            "worn": mask(lambda w: w in WORN), "people": mask(lambda w: w in PEOPLE)}
