"""Self-critical sequence training (Rennie et al. 2017): fine-tune the decoder on CIDEr-D itself.

The baseline is the mean reward of the other samples of the same image (Luo 2020, "A Better
Variant of Self-Critical Sequence Training"), so no extra greedy pass is needed, and <end> is
scored as a word so that captions ending in "a" or "the" lose reward.
"""
import math
import random
from collections import Counter, defaultdict

import torch
from tqdm import tqdm

from .network import Decoder
from .vocab import Vocab

N = 4  # n-gram orders in CIDEr
SIGMA = 6.0  # CIDEr-D's length penalty width


def _ngrams(words: list[str]) -> Counter:
    return Counter(tuple(words[i : i + n]) for n in range(1, N + 1) for i in range(len(words) - n + 1))


class CiderD:
    """CIDEr-D with document frequencies fixed over the training references.

    pycocoevalcap's scorer recomputes the frequencies from whatever batch it is given (and the
    reference vectors for every candidate), which is wrong for a reward and too slow per step;
    this is the same formula with the corpus statistics computed once.
    """

    def __init__(self, references: dict[int, list[list[str]]]):
        df: Counter = Counter()
        for refs in references.values():
            df.update({g for r in refs for g in _ngrams(r)})
        self.log_n = math.log(len(references))
        self.df = {g: math.log(max(1.0, c)) for g, c in df.items()}
        self.refs = {k: [self._vector(r) for r in refs] for k, refs in references.items()}

    def _vector(self, words: list[str]):
        vec = [dict() for _ in range(N)]
        for g, tf in _ngrams(words).items():
            vec[len(g) - 1][g] = tf * (self.log_n - self.df.get(g, 0.0))
        norms = [math.sqrt(sum(v * v for v in d.values())) for d in vec]
        return vec, norms, len(words)

    def __call__(self, image: int, words: list[str]) -> float:
        vec, norms, length = self._vector(words)
        total = 0.0
        for rvec, rnorms, rlen in self.refs[image]:
            penalty = math.exp(-((length - rlen) ** 2) / (2 * SIGMA**2))
            for n in range(N):
                if norms[n] and rnorms[n]:
                    dot = sum(min(v, rvec[n].get(g, 0.0)) * rvec[n].get(g, 0.0) for g, v in vec[n].items())
                    total += penalty * dot / (norms[n] * rnorms[n])
        return 10.0 * total / (N * len(self.refs[image]))


def sample(decoder: Decoder, feats: torch.Tensor, vocab: Vocab, max_len: int):
    """Sample one caption per row of feats (B, P, F) -> (tokens (B, T), summed log-prob (B,) with grad)."""
    keys, h, c = decoder.start(feats)
    words = torch.full((feats.size(0),), vocab.start, dtype=torch.long, device=feats.device)
    alive = torch.ones_like(words, dtype=torch.bool)
    logp_sum = feats.new_zeros(feats.size(0))
    out = []
    for _ in range(max_len):
        logits, h, c, _ = decoder.step(feats, keys, words, h, c)
        logits[:, [vocab.pad, vocab.start, vocab.unk]] = float("-inf")
        logp = logits.log_softmax(-1)  # (B, V)
        words = torch.multinomial(logp.detach().exp(), 1).squeeze(1)
        words = torch.where(alive, words, torch.full_like(words, vocab.pad))
        logp_sum = logp_sum + logp.gather(1, words.unsqueeze(1)).squeeze(1) * alive
        out.append(words)
        alive = alive & (words != vocab.end)
        if not bool(alive.any()):
            break
    return torch.stack(out, 1), logp_sum


def scst_epoch(decoder: Decoder, features, n_images: int, reward: CiderD, vocab: Vocab,
               opt: torch.optim.Optimizer, rng: random.Random, images_per_batch: int = 16, samples: int = 5,
               max_len: int = 16, clip: float = 5.0) -> float:
    """One pass over the training images; returns the mean sampled reward.

    `features(rows)` gives the attention features (B, P, F) of training images `rows`, and
    `reward(row, words)` scores a sampled caption of image `row`.
    """
    decoder.train()
    order = list(range(n_images))
    rng.shuffle(order)
    total, n = 0.0, 0
    bar = tqdm(range(0, len(order), images_per_batch), desc="self-critical", unit="batch")
    for i in bar:
        rows = order[i : i + images_per_batch]
        f = features(torch.tensor(rows)).repeat_interleave(samples, 0)  # (B*S, P, F)
        tokens, logp = sample(decoder, f, vocab, max_len)
        words = [vocab.decode(t) + (["<end>"] if vocab.end in t else []) for t in tokens.tolist()]
        r = torch.tensor([reward(rows[j // samples], w) for j, w in enumerate(words)], device=f.device)
        r = r.view(-1, samples)  # (B, S)
        baseline = (r.sum(1, keepdim=True) - r) / (samples - 1)
        advantage = (r - baseline).view(-1)
        loss = -(advantage * logp).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
        opt.step()
        total, n = total + r.mean().item(), n + 1
        bar.set_postfix(reward=f"{total / n:.3f}")
    return total / max(n, 1)


def references_by_row(tokens_by_name: dict[str, list[list[str]]], names: list[str]) -> dict[int, list[list[str]]]:
    """{row in the training feature tensor: reference token lists, each ending with <end>}."""
    refs: dict[int, list[list[str]]] = defaultdict(list)
    for row, name in enumerate(names):
        refs[row] = [t + ["<end>"] for t in tokens_by_name[name]]
    return dict(refs)
