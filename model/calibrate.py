"""Fit a checkpoint's caption-quality estimator (model/quality.py) and write it into the checkpoint.

The training photos become the nearest-photo bank and fit the word regression; the dev photos, captioned exactly as in
production, are the estimator's examples. Its figures are cross-validated (each dev caption judged
by an estimator that never saw it) and drawn in a reliability diagram beside the risk-coverage curve.
"""
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import quality
from .data import LOADER_START, read_captions
from .evaluate import Photos, per_image_cider, rounded, score
from .inference import REVIEW_RISK, Captioner
from .train import TrainConfig, split_names

RERANK_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)


def _photos(captioner: Captioner, folder: Path, names: list[str], batch_size: int, desc: str):
    loader = DataLoader(Photos(folder, names, captioner.preprocess), batch_size=batch_size, num_workers=1,
                        multiprocessing_context=LOADER_START)
    yield from tqdm(loader, desc=desc, unit="batch")


def calibrate(captioner: Captioner, checkpoint: Path, cfg: TrainConfig, output: Path, plot: Path | None,
              beam: int = 3, batch_size: int = 32, risk: float = REVIEW_RISK) -> dict:
    """Fit the estimator of `checkpoint` (loaded as `captioner`) on the photos of `cfg`'s split,
    save the checkpoint with it as `output`, draw `plot`; returns the cross-validated figures."""
    references = read_captions(Path(cfg.captions))
    references = {n: c for n, c in references.items() if (Path(cfg.images) / n).is_file()}
    train_names, dev_names = split_names(cfg, references)
    if len(dev_names) < 100:
        raise ValueError(f"{len(dev_names)} dev photos: too few to fit a quality estimator (100 or more)")
    pooled = torch.cat([captioner.encode(batch).pooled.cpu() for batch in
                        _photos(captioner, Path(cfg.images), train_names, batch_size, "training photos")])
    train_captions = [references[n] for n in train_names]
    neighbours = quality.Neighbours.build(pooled, train_captions)  # on the CPU, where production reads them
    words = quality.Words.fit(pooled, train_captions)

    candidates, scores, logps, agreements = [], [], [], []
    for batch in _photos(captioner, Path(cfg.images), dev_names, batch_size, "dev photos"):
        encoded, hyps = captioner.hypotheses(batch, beam=beam, n_best=beam)
        width = min(len(h) for h in hyps)
        texts = [[captioner.sentence(x) for x in h[:width]] for h in hyps]
        candidates += texts
        scores.append(torch.tensor([[x.score for x in h[:width]] for h in hyps]))
        logps += [[x.word_logps for x in h[:width]] for h in hyps]
        agreements.append(quality.agreement(texts, encoded.pooled, neighbours, words))
    width = min(s.shape[1] for s in scores)
    scores_t = torch.cat([s[:, :width] for s in scores])
    agreed = quality.Agreement(torch.cat([a.similarity for a in agreements]),
                               torch.cat([a.consensus[:, :width] for a in agreements]),
                               torch.cat([a.match[:, :width] for a in agreements]))
    gold = {n: references[n] for n in dev_names}
    ciders, choices = {}, {}
    for weight in RERANK_WEIGHTS:  # the re-ranking weight that gives the best dev CIDEr
        choices[weight] = quality.rerank(scores_t, agreed, weight)
        picked = {n: candidates[i][int(c)] for i, (n, c) in enumerate(zip(dev_names, choices[weight]))}
        ciders[weight] = score(gold, picked, meteor=False)["CIDEr"]
    weight = max(RERANK_WEIGHTS, key=lambda w: (round(ciders[w], 4), -w))
    chosen = choices[weight]
    texts = [candidates[i][int(c)] for i, c in enumerate(chosen)]
    features_t = quality.signals([logps[i][int(c)] for i, c in enumerate(chosen)], agreed, chosen)
    confidence = torch.tensor([float(scores_t[i, int(c)]) for i, c in enumerate(chosen)])
    cider = per_image_cider(gold, dict(zip(dev_names, texts)))
    right = torch.tensor([cider[n] >= quality.WRONG_BELOW for n in dev_names])
    estimator, held_out = quality.fitted(features_t, right, weight)

    threshold = estimator.threshold(risk)
    published = held_out >= threshold
    half = held_out.argsort(descending=True)[: len(dev_names) // 2]
    figures = rounded({
        "photos": len(dev_names), "wrong": float((~right).float().mean()),
        "auroc_quality": quality.auroc(held_out, right),
        "auroc_confidence": quality.auroc(confidence, right),
        "wrong_in_best_half": float((~right[half]).float().mean()),
        "review_risk": risk, "review_threshold": threshold,
        "unreviewed": float(published.float().mean()),
        "wrong_unreviewed": float((~right[published]).float().mean()) if bool(published.any()) else 0.0,
        "calibration_error": calibration_error(held_out, right),
        "rerank_weight": weight, "cider_by_rerank_weight": {str(w): round(c, 4) for w, c in ciders.items()},
    })
    figures["signals_auroc"] = {name: round(quality.auroc(features_t[:, i], right), 4)
                                for i, name in enumerate(quality.FEATURES)}
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["quality"] = estimator.to_state()
    state["neighbours"] = neighbours.to_state()
    state["words"] = words.to_state()
    state.setdefault("metrics", {})["quality"] = figures
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, output)
    if plot is not None:
        draw(held_out, right, estimator, risk, plot)
    return figures


def calibration_error(estimate: torch.Tensor, right: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error: |estimated - observed| share right per decile bin, weighted by size."""
    which = (estimate * bins).long().clamp(max=bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if bool(inside.any()):
            total += float(inside.float().mean() * (estimate[inside].mean() - right[inside].float().mean()).abs())
    return total


def draw(estimate: torch.Tensor, right: torch.Tensor, estimator: quality.Estimator, risk: float, path: Path) -> None:
    """Reliability diagram (estimate against the share right, per decile) and the risk-coverage curve."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, (left, middle) = plt.subplots(1, 2, figsize=(10, 4.2))
    bins = 10
    which = (estimate * bins).long().clamp(max=bins - 1)
    xs, ys, ns = [], [], []
    for b in range(bins):
        inside = which == b
        if bool(inside.any()):
            xs.append(float(estimate[inside].mean()))
            ys.append(float(right[inside].float().mean()))
            ns.append(int(inside.sum()))
    left.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    left.plot(xs, ys, marker="o")
    for x, y, n in zip(xs, ys, ns):
        left.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    left.set(xlabel="estimated quality (cross-validated)", ylabel="share of captions right",
             title="reliability, dev split", xlim=(0, 1), ylim=(0, 1))
    q, r = quality.risk_coverage(estimate, right)
    coverage = torch.arange(1, len(q) + 1) / len(q)
    middle.plot(coverage, r)
    middle.axhline(risk, color="grey", linestyle="--", linewidth=1)
    published = float((estimate >= estimator.threshold(risk)).float().mean())
    middle.axvline(published, color="tab:red", linewidth=1)
    middle.set(xlabel="coverage (share published without review)", ylabel="share of published captions wrong",
               title=f"risk-coverage: {published:.0%} published at risk {risk:.0%}", xlim=(0, 1), ylim=(0, None))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
