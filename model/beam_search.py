"""Batched beam search: every image's beams advance together as one (B*K) tensor on the device."""
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

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


def _repeated_content(seq: torch.Tensor, content_words: torch.Tensor, modifiers: torch.Tensor,
                      counting: torch.Tensor, worn: torch.Tensor, people: torch.Tensor) -> torch.Tensor:
    """seq (N, t) -> (N, V) True where the next word would say something twice (model/repeats.py):
    - a content word already in the row, unless right after a modifier ("a black dog and a white
      dog"), and after a describing modifier only if an earlier mention followed a modifier too
      (clothing is told apart by whoever wears it instead);
    - a content word that made the same pair with the last word before ("a black hat and black hat");
    - the word before a function word again ("a white and white dog");
    - clothing already named, unless a person was named after it ("a man in a blue shirt and a
      black shirt").
    Each rule flags positions of the row, (N, t), and the flagged positions' words are banned: a
    row holds at most max_len words, the vocabulary thousands."""
    n, t = seq.shape
    ban = torch.zeros(n, len(content_words), dtype=torch.bool, device=seq.device)
    if t == 0:
        return ban
    last = seq[:, -1:]
    content = content_words[seq]
    flag = content & ~modifiers[last]
    if t >= 2:
        flag[:, 1:] |= content[:, 1:] & (seq[:, :-1] == last)
        flag[:, -2] |= ~(content_words[last[:, 0]] | modifiers[last[:, 0]])
        describing = modifiers[last] & ~counting[last]  # (N, 1)
        if bool(describing.any()):
            after_modifier = F.pad(modifiers[seq[:, :-1]], (1, 0))
            # a word is described if any of its mentions follows a modifier
            described = ((seq.unsqueeze(2) == seq.unsqueeze(1)) & after_modifier.unsqueeze(1)).any(2)
            flag |= content & ~worn[seq] & ~described & describing
    clothing = worn[seq]
    if bool(clothing.any()):
        at = torch.arange(t, device=seq.device)
        flag |= clothing & (at > torch.where(people[seq], at, -1).amax(1, keepdim=True))
    rows, cols = flag.nonzero(as_tuple=True)
    ban[rows, seq[rows, cols]] = True
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
    A caption that ended is kept even when longer beams push it out of the K: an image's n-best
    are the best of every caption that ended, not only of the K beams left at the end (which
    may be cut off at max_len in mid-phrase).
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
    rule = [content_words, modifiers, counting, worn, people]
    if all(m is None for m in rule):
        rule = None
    elif any(m is None for m in rule):
        raise ValueError("the repeat rule needs all five masks (content_words, modifiers, counting, worn, people): "
                         "pass **repeats.rule(words, specials)")
    else:
        rule = [m.to(device) for m in rule]
    results: list[list[Hypothesis]] = [[] for _ in range(B)]
    # each live image's n_best captions that ended so far, best first: scores, words (<end> and
    # after it: end) and their log-probabilities, as tensors so that keeping them takes a few operations
    ended_score = torch.full((B, n_best), float("-inf"), device=device)
    ended_seq = torch.full((B, n_best, max_len), end, dtype=torch.long, device=device)
    ended_logp = torch.zeros(B, n_best, max_len, device=device)

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
        ending = cand_score[:, end].masked_fill(done, float("-inf")).view(L, k)
        if t < max_len - 1 and bool((ending.amax(1) > ended_score[:, -1]).any()):
            # keep the captions ending here among the ended, whether or not they make the beam
            pad = max_len - t
            seqs = torch.cat([ended_seq, F.pad(seq, (0, pad), value=end).view(L, k, max_len)], 1)
            logps = torch.cat([ended_logp, torch.cat([seq_logp, logp[:, end:end + 1], seq_logp.new_zeros(L * k, pad - 1)],
                                                     1).view(L, k, max_len)], 1)
            ended_score, kept = torch.cat([ended_score, ending], 1).topk(n_best, dim=1)
            ended_seq = seqs.gather(1, kept.unsqueeze(2).expand(-1, -1, max_len))
            ended_logp = logps.gather(1, kept.unsqueeze(2).expand(-1, -1, max_len))
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
            score = logp_sum / length.clamp(min=1).pow(alpha)
            for i in finished.nonzero().flatten().tolist():
                image = int(live[i])
                beams = [_hypothesis(seq[r], seq_logp[r], float(score[r]), end) for r in range(i * K, (i + 1) * K)]
                beams += [_hypothesis(ended_seq[i, j], ended_logp[i, j], float(ended_score[i, j]), end)
                          for j in range(n_best) if ended_score[i, j] > float("-inf")]
                results[image] = _best(beams, n_best)
            keep = ~finished
            if not bool(keep.any()):
                break
            rows = keep.repeat_interleave(K)
            live = live[keep]
            ended_score, ended_seq, ended_logp = ended_score[keep], ended_seq[keep], ended_logp[keep]
            words, h, c, seq, seq_logp, logp_sum, length, done = (
                x[rows] for x in (words, h, c, seq, seq_logp, logp_sum, length, done))
    return results


def _hypothesis(seq: torch.Tensor, seq_logp: torch.Tensor, score: float, end: int) -> Hypothesis:
    """One beam's words (t,) up to its <end>, their log-probabilities and its score."""
    row = seq.tolist()
    n = row.index(end) if end in row else len(row)
    return Hypothesis(row[:n], score, tuple(seq_logp[: n + 1].tolist()))


def _best(hyps: list[Hypothesis], n_best: int) -> list[Hypothesis]:
    """One image's captions -> its n_best distinct ones, best first."""
    out, seen = [], set()
    for h in sorted(hyps, key=lambda h: -h.score):
        if tuple(h.tokens) not in seen:
            seen.add(tuple(h.tokens))
            out.append(h)
    return out[:n_best]
