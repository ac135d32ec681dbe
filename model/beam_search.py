"""Batched beam search: every image's beams advance together as one (B*K) tensor on the device."""
from dataclasses import dataclass

import torch

from .network import Decoder


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # word ids, without <start> and <end>
    score: float  # length-normalised log-probability (mean log-prob per token when alpha = 1)


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


@torch.no_grad()
def beam_search(decoder: Decoder, feats: torch.Tensor, start: int, end: int, banned_words: list[int],
                beam: int = 3, n_best: int = 3, max_len: int = 20, alpha: float = 1.0,
                block_repeats: bool = True) -> list[list[Hypothesis]]:
    """feats (B, P, F) -> for each image the `n_best` hypotheses, best first.

    Scores are log-probability / length**alpha, both while searching and for the final ranking,
    so short captions are not favoured just for being short. `beam=1` is greedy decoding.
    """
    assert n_best <= beam, f"n_best ({n_best}) cannot exceed the beam ({beam})"
    B, P, F = feats.shape
    K, V = beam, decoder.cfg.vocab_size
    device = feats.device
    feats = feats.repeat_interleave(K, 0)  # (B*K, P, F)
    keys, h, c = decoder.start(feats)
    words = torch.full((B * K,), start, dtype=torch.long, device=device)
    seq = torch.zeros(B * K, 0, dtype=torch.long, device=device)
    logp_sum = torch.zeros(B * K, device=device)
    # only the first beam of each image is live at step 0, so the K beams do not start as copies
    logp_sum.view(B, K)[:, 1:] = float("-inf")
    done = torch.zeros(B * K, dtype=torch.bool, device=device)
    length = torch.zeros(B * K, device=device)
    never = torch.tensor(banned_words, dtype=torch.long, device=device)

    for t in range(max_len):
        logits, h, c, _ = decoder.step(feats, keys, words, h, c)
        logp = logits.float().log_softmax(-1)  # (B*K, V)
        logp[:, never] = float("-inf")
        if block_repeats:
            logp = logp.masked_fill(_banned(seq, V), float("-inf"))
        if t == max_len - 1:  # out of room: every live beam must end here
            forced = torch.full_like(logp, float("-inf"))
            forced[:, end] = logp[:, end].clamp(min=-1e4)  # keep the beam even if <end> was unlikely
            logp = forced
        # a finished beam continues only as itself, with <end> repeated at no cost
        logp[done] = float("-inf")
        logp[done, end] = 0.0
        cand_sum = logp_sum.unsqueeze(1) + logp  # (B*K, V)
        cand_len = (length + (~done).float()).unsqueeze(1).clamp(min=1)  # (B*K, 1)
        cand_score = cand_sum / cand_len.pow(alpha)
        top_score, top_idx = cand_score.view(B, K * V).topk(K, dim=1)  # (B, K)
        origin = (top_idx // V + torch.arange(B, device=device).unsqueeze(1) * K).view(-1)  # (B*K,)
        words = (top_idx % V).view(-1)
        logp_sum = cand_sum.view(B, K * V).gather(1, top_idx).view(-1)
        length = (length + (~done).float())[origin]
        prev_done = done[origin]
        seq = torch.cat([seq[origin], words.unsqueeze(1)], dim=1)
        done = prev_done | (words == end)
        h, c = h[origin], c[origin]
        if bool(done.all()):
            break

    score = (logp_sum / length.clamp(min=1).pow(alpha)).view(B, K)
    order = score.argsort(dim=1, descending=True)
    results = []
    for b in range(B):
        hyps = []
        for k in order[b, :n_best].tolist():
            row = seq[b * K + k].tolist()
            tokens = row[: row.index(end)] if end in row else row
            hyps.append(Hypothesis(tokens, float(score[b, k])))
        results.append(hyps)
    return results
