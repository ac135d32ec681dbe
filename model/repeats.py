"""Which words a caption may say twice: "a black dog and a white dog", never "a hat and a hat".

A caption names a thing once. It names it again only to tell two apart, and then a modifier comes
right before the second mention ("a white dog", "another man", "two men"). So a content word that
is already in the caption may come again only straight after a modifier. Function words repeat
freely (trigram blocking in the beam search stops their loops), and so do the modifiers
themselves: "a black jacket and a black hat" is what people write.
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


def content_words(words: list[str]) -> list[str]:
    return [w for w in words if w not in FUNCTION_WORDS and w not in MODIFIERS]


def repeats_content(words: list[str]) -> bool:
    """True if a content word (neither a function word nor a modifier) occurs twice."""
    return any(n > 1 for n in Counter(content_words(words)).values())


def rule(words: list[str], specials: int) -> dict[str, torch.Tensor]:
    """The beam search's options for a vocabulary (`words`, the first `specials` of them special
    tokens): which ids are content words and which are modifiers, as (V,) masks."""
    return {"content_words": torch.tensor([i >= specials and w not in FUNCTION_WORDS and w not in MODIFIERS
                                           for i, w in enumerate(words)]),
            "modifiers": torch.tensor([i >= specials and w in MODIFIERS for i, w in enumerate(words)])}
