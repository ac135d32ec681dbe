"""The retrieval baseline the model must beat (Devlin et al. 2015, "Exploring nearest neighbor
approaches for image captioning"): borrow the captions of the k nearest training photos (pooled
encoder features, cosine) and return the one that agrees most with the others (consensus
re-ranking with tf-idf n-gram cosine, CIDEr's similarity without its length penalty).
"""
import math
from collections import Counter
from pathlib import Path

import torch

from .data import tokenize


def _ngrams(words: list[str], n_max: int = 4) -> Counter:
    return Counter(tuple(words[i : i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1))


def consensus(captions: list[str], idf: dict[tuple, float]) -> str:
    """The caption with the highest mean tf-idf n-gram cosine similarity to all the others."""
    grams = [_ngrams(tokenize(c)) for c in captions]
    index = {g: i for i, g in enumerate({g for c in grams for g in c})}
    order = torch.zeros(len(index), dtype=torch.long)
    vecs = torch.zeros(len(captions), len(index))
    for row, counts in enumerate(grams):
        for g, tf in counts.items():
            vecs[row, index[g]] = tf * idf.get(g, idf[()])
            order[index[g]] = len(g) - 1
    sim = torch.zeros(len(captions), len(captions))
    for n in range(4):  # cosine per n-gram order, averaged, as in CIDEr
        v = vecs[:, order == n]
        v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-9)
        sim += v @ v.T / 4
    sim.fill_diagonal_(0)
    return captions[int(sim.sum(1).argmax())]


def corpus_idf(captions: dict[str, list[str]]) -> dict[tuple, float]:
    """log(N / df) per n-gram over photos; the key () holds the value for unseen n-grams."""
    df: Counter = Counter()
    for caps in captions.values():
        df.update({g for c in caps for g in _ngrams(tokenize(c))})
    n = len(captions)
    idf = {g: math.log(n / c) for g, c in df.items()}
    idf[()] = math.log(n)
    return idf


def retrieve(db_feats: torch.Tensor, db_captions: list[list[str]], query_feats: torch.Tensor,
             idf: dict[tuple, float], k: int = 40) -> list[str]:
    """db_feats (N, P, F), query_feats (Q, P, F) -> one borrowed caption per query photo."""
    db = torch.nn.functional.normalize(db_feats.float().mean(1), dim=1)  # (N, F)
    q = torch.nn.functional.normalize(query_feats.float().mean(1), dim=1)  # (Q, F)
    nearest = (q @ db.T).topk(k, dim=1).indices  # (Q, k)
    return [consensus([c for i in row for c in db_captions[i]], idf) for row in nearest.tolist()]


def dev_baseline(captions: dict[str, list[str]], train_names: list[str], dev_names: list[str],
                 index: dict[str, int], feats: torch.Tensor, k: int = 40) -> dict[str, str]:
    """Retrieval captions for the dev photos, with the training photos as the database."""
    train_caps = {n: captions[n] for n in train_names}
    idf = corpus_idf(train_caps)
    db = feats[[index[n] for n in train_names]]
    out = retrieve(db, [captions[n] for n in train_names], feats[[index[n] for n in dev_names]], idf, k)
    return dict(zip(dev_names, out))


def score_baseline(cfg, k: int, output: Path) -> dict[str, float]:
    """Score the retrieval baseline on the dev photos of a training config (`train.TrainConfig`);
    its captions and metrics go to `output` (the `evaluate` command's format)."""
    from .data import cached_features, read_captions
    from .encoder import Encoder, EncoderConfig
    from .evaluate import rounded, score, write_results
    from .train import split_names

    captions = read_captions(Path(cfg.captions))
    captions = {n: c for n, c in captions.items() if (Path(cfg.images) / n).exists()}
    train_names, dev_names = split_names(cfg, captions)
    encoder = Encoder(EncoderConfig(cfg.backbone, cfg.encoder_weights))
    index, feats = cached_features(encoder, Path(cfg.images), sorted(captions), Path(cfg.cache_dir))
    predictions = dev_baseline(captions, train_names, dev_names, index, feats, k)
    metrics = score({n: captions[n] for n in dev_names}, predictions)
    metrics["images"] = len(dev_names)
    metrics = rounded(metrics)
    write_results(output, predictions, metrics)
    return metrics
