"""Batched beam search: every image's beams advance together as one (B*K) tensor on the device."""
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .network import Decoder


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # word ids, without <start> and <end>
    score: float  # length-normalised log-probability (mean log-prob per token when alpha = 1)
    word_logps: tuple[float, ...] = ()  # log-probability of each word chosen, <end> included


def _banned(seq: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """seq (N, t) generated ids -> (N, V) True where the next word would stutter.

    Bans repeating the previous word and any word that would repeat a trigram already in the
    sequence (which also rules out every repeated n-gram with n >= 3).
    """
    n, t = seq.shape
    ban = torch.zeros(n, vocab_size, dtype=torch.int32, device=seq.device)
    if t == 0:
        return ban.bool()
    ban.scatter_(1, seq[:, -1:], 1)
    if t >= 3:
        # positions i where (seq[i], seq[i+1]) equals the last two words: seq[i+2] is banned
        hit = (seq[:, :-2] == seq[:, -2:-1]) & (seq[:, 1:-1] == seq[:, -1:])  # (N, t-2)
        ban.scatter_add_(1, seq[:, 2:], hit.int())
    return ban > 0


# One decoding step. live: indices (L,) of the images still searching, into the B images the
# search started with; words (L*K,), h, c (L*K, D), K rows per live image, in the order of `live`
# -> log-probabilities (L*K, V), h, c. `live` only shrinks, and is a new tensor when it does.
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class Encoded(NamedTuple):
    """A batch of B images through the encoder, in any runtime: what the search starts from."""
    step: Step  # the decoder over these images
    h: torch.Tensor  # (B, D) its initial state
    c: torch.Tensor
    logits: torch.Tensor  # (B, 1000) ImageNet classes
    pooled: torch.Tensor  # (B, F) the features averaged over positions: what retrieval compares


def decoder_step(decoder: Decoder, feats: torch.Tensor) -> tuple[Step, torch.Tensor, torch.Tensor]:
    """The torch decoder over feats (B, P, F) as a Step, with its initial state h, c (B, D)."""
    keys, h, c = decoder.start(feats)
    rows = {"live": None, "feats": feats, "keys": keys}

    def step(live, words, h, c):
        if rows["live"] is not live:  # some images finished: drop their features once
            rows.update(live=live, feats=feats[live], keys=keys[live])
        logits, h, c, _ = decoder.step(rows["feats"], rows["keys"], words, h, c)
        return logits.float().log_softmax(-1), h, c
    return step, h, c


@torch.no_grad()
def beam_search(decoder: Decoder, feats: torch.Tensor, start: int, end: int, banned_words: list[int],
                **options) -> list[list[Hypothesis]]:
    """feats (B, P, F) -> for each image the `n_best` hypotheses of the torch decoder, best first."""
    step, h, c = decoder_step(decoder, feats)
    return search(step, h, c, start, end, banned_words, **options)


def _marked(words: torch.Tensor, flags: torch.Tensor, vocab: int) -> torch.Tensor:
    """(N, t) word ids and flags -> (N, V) True for a word flagged at any of its positions (a
    scatter of the flags would keep an arbitrary one of a repeated word's)."""
    out = torch.zeros(words.shape[0], vocab, dtype=torch.bool, device=words.device)
    rows, cols = flags.nonzero(as_tuple=True)
    out[rows, words[rows, cols]] = True
    return out


def _repeated_content(seq: torch.Tensor, content_words: torch.Tensor, modifiers: torch.Tensor,
                      counting: torch.Tensor, worn: torch.Tensor, people: torch.Tensor) -> torch.Tensor:
    """seq (N, t) -> (N, V) True where the next word would say something twice (model/repeats.py):
    - a content word already in the row, unless right after a modifier ("a black dog and a white
      dog"), and after a describing modifier only if an earlier mention followed a modifier too
      (clothing is told apart by whoever wears it instead);
    - a content word that made the same pair with the last word before ("a black hat and black hat");
    - the word before a function word again ("a white and white dog");
    - clothing already named, unless a person was named after it ("a man in a blue shirt and a
      black shirt")."""
    n, t = seq.shape
    V = len(content_words)
    if t == 0:
        return torch.zeros(n, V, dtype=torch.bool, device=seq.device)
    last = seq[:, -1]
    said = torch.zeros(n, V, dtype=torch.bool, device=seq.device).scatter_(1, seq, True)
    ban = said & content_words & ~modifiers[last].unsqueeze(1)
    at = torch.arange(t, device=seq.device)
    person_at = torch.where(people[seq], at, -1).amax(1, keepdim=True)
    ban |= _marked(seq, worn[seq] & (at > person_at), V)
    if t >= 2:
        ban |= _marked(seq[:, 1:], seq[:, :-1] == last.unsqueeze(1), V) & content_words
        function = ~(content_words[last] | modifiers[last])
        ban[function, seq[function, -2]] = True
        describing = modifiers[last] & ~counting[last]
        if bool(describing.any()):
            described = _marked(seq[:, 1:], modifiers[seq[:, :-1]], V)
            ban |= said & content_words & ~worn & ~described & describing.unsqueeze(1)
    return ban


@torch.no_grad()
def search(step: Step, h: torch.Tensor, c: torch.Tensor, start: int, end: int, banned_words: list[int],
           beam: int = 3, n_best: int = 3, max_len: int = 20, alpha: float = 1.0,
           block_repeats: bool = True, content_words: torch.Tensor | None = None,
           modifiers: torch.Tensor | None = None, counting: torch.Tensor | None = None,
           worn: torch.Tensor | None = None, people: torch.Tensor | None = None) -> list[list[Hypothesis]]:
    """From the initial state h, c (B, D) of B images -> for each image the `n_best` hypotheses, best
    first. `step` may run in any runtime: the search itself is a few small tensor operations.

    Scores are log-probability / length**alpha, both while searching and for the final ranking,
    so short captions are not favoured just for being short. `beam=1` is greedy decoding.
    With the masks of model/repeats.py (`content_words`, `modifiers`, `counting`, `worn`, `people`,
    each (V,)), the caption says nothing twice: a content word comes again only to tell two apart.
    An image whose K beams have all ended leaves the batch: the step, most of the time, then runs
    on the images still searching only (a batch ran all max_len steps for its longest caption,
    while the average image needed two thirds of them).
    """
    assert n_best <= beam, f"n_best ({n_best}) cannot exceed the beam ({beam})"
    B, K = h.shape[0], beam
    device = h.device
    live = torch.arange(B, device=device)
    # the first step has one row per image (K copies would only compute the same words K times);
    # its K best words start the K beams
    k = 1
    words = torch.full((B,), start, dtype=torch.long, device=device)
    seq = torch.zeros(B, 0, dtype=torch.long, device=device)
    seq_logp = torch.zeros(B, 0, device=device)
    logp_sum = torch.zeros(B, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    length = torch.zeros(B, device=device)
    never = torch.tensor(banned_words, dtype=torch.long, device=device)
    rule = None
    if content_words is not None:
        rule = [m.to(device) for m in (content_words, modifiers, counting, worn, people)]
    results: list[list[Hypothesis]] = [[] for _ in range(B)]

    for t in range(max_len):
        L = len(live)
        logp, h, c = step(live, words, h, c)  # (L*k, V)
        V = logp.shape[1]
        logp[:, never] = float("-inf")
        if block_repeats:
            logp = logp.masked_fill(_banned(seq, V), float("-inf"))
        if rule is not None:
            logp = logp.masked_fill(_repeated_content(seq, *rule), float("-inf"))
        if t == max_len - 1:  # out of room: every live beam must end here
            forced = torch.full_like(logp, float("-inf"))
            forced[:, end] = logp[:, end].clamp(min=-1e4)  # keep the beam even if <end> was unlikely
            logp = forced
        # a finished beam continues only as itself, with <end> repeated at no cost
        logp[done] = float("-inf")
        logp[done, end] = 0.0
        cand_sum = logp_sum.unsqueeze(1) + logp  # (L*k, V)
        cand_len = (length + (~done).float()).unsqueeze(1).clamp(min=1)  # (L*k, 1)
        cand_score = cand_sum / cand_len.pow(alpha)
        top_score, top_idx = cand_score.view(L, k * V).topk(K, dim=1)  # (L, K)
        origin = (top_idx // V + torch.arange(L, device=device).unsqueeze(1) * k).view(-1)  # (L*K,)
        words = (top_idx % V).view(-1)
        word_logp = logp.view(L, k * V).gather(1, top_idx).view(-1)
        logp_sum = cand_sum.view(L, k * V).gather(1, top_idx).view(-1)
        k = K
        length = (length + (~done).float())[origin]
        prev_done = done[origin]
        seq = torch.cat([seq[origin], words.unsqueeze(1)], dim=1)
        seq_logp = torch.cat([seq_logp[origin], word_logp.unsqueeze(1)], dim=1)
        done = prev_done | (words == end)
        h, c = h[origin], c[origin]
        finished = done.view(L, K).all(1)  # (L,)
        if bool(finished.any()):
            score = (logp_sum / length.clamp(min=1).pow(alpha)).view(L, K)
            for i in finished.nonzero().flatten().tolist():
                beams = slice(i * K, (i + 1) * K)
                results[int(live[i])] = _best(seq[beams], seq_logp[beams], score[i], end, n_best)
            keep = ~finished
            if not bool(keep.any()):
                break
            rows = keep.repeat_interleave(K)
            live = live[keep]
            words, h, c, seq, seq_logp, logp_sum, length, done = (
                x[rows] for x in (words, h, c, seq, seq_logp, logp_sum, length, done))
    return results


def _best(seq: torch.Tensor, seq_logp: torch.Tensor, score: torch.Tensor, end: int,
          n_best: int) -> list[Hypothesis]:
    """One image's K finished beams, seq and seq_logp (K, t) and score (K,) -> its n_best
    hypotheses, best first."""
    hyps = []
    for k in score.argsort(descending=True)[:n_best].tolist():
        row = seq[k].tolist()
        n = row.index(end) if end in row else len(row)
        hyps.append(Hypothesis(row[:n], float(score[k]), tuple(seq_logp[k, : n + 1].tolist())))
    return hyps
