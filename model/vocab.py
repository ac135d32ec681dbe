"""The decoder's vocabulary: words seen at least `min_count` times plus four special tokens."""
from collections import Counter
from collections.abc import Iterable

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # ids 0..3, in this order


class Vocab:
    def __init__(self, words: list[str]):
        assert tuple(words[:4]) == SPECIALS, "the first four words must be the special tokens"
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad, self.start, self.end, self.unk = range(4)

    @classmethod
    def build(cls, token_lists: Iterable[list[str]], min_count: int = 5) -> "Vocab":
        counts = Counter(w for tokens in token_lists for w in tokens)
        kept = sorted(w for w, n in counts.items() if n >= min_count and w not in SPECIALS)
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: list[str], max_len: int) -> list[int]:
        """<start> w1 .. wn <end>, cut to at most `max_len` words."""
        ids = [self.index.get(w, self.unk) for w in tokens[:max_len]]
        return [self.start, *ids, self.end]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first <end>, special tokens dropped."""
        out = []
        for i in ids:
            if i == self.end:
                break
            if i >= len(SPECIALS):
                out.append(self.words[i])
        return out
