"""COCO caption metrics (pycocoevalcap) and the `evaluate` command's work, free of any CLI."""
import json
import math
from pathlib import Path

import torch
from PIL import Image
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .data import LOADER_START, read_captions, read_split, tokenize
from .quality import WRONG_BELOW, auroc
from .repeats import repeats_content

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def score(references: dict[str, list[str]], predictions: dict[str, str], meteor: bool = True) -> dict[str, float]:
    """COCO metrics of `predictions` {id: caption} against `references` {id: [captions]}.

    Both sides go through the PTB tokenizer (Java), exactly as the COCO evaluation server does.
    """
    missing = set(predictions) - set(references)
    assert not missing, f"{len(missing)} predictions have no references, e.g. {sorted(missing)[:3]}"
    ids = sorted(predictions)
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = tok.tokenize({i: [{"caption": predictions[i]}] for i in ids})
    return score_tokenized(gts, res, meteor=meteor)


def per_image_cider(references: dict[str, list[str]], predictions: dict[str, str]) -> dict[str, float]:
    """Each prediction's CIDEr-D against its own references (document frequencies over all of them,
    as in `score`)."""
    ids = sorted(predictions)
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = tok.tokenize({i: [{"caption": predictions[i]}] for i in ids})
    _, per_image = Cider().compute_score(gts, res)
    return {i: float(s) for i, s in zip(gts, per_image)}


def score_tokenized(gts: dict, res: dict, meteor: bool = True) -> dict[str, float]:
    """Like `score` on already tokenised, space-joined captions ({id: [str]} both sides)."""
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, 1):
        out[f"BLEU-{n}"] = float(b)
    if meteor:
        m = Meteor()
        try:
            out["METEOR"] = float(m.compute_score(gts, res)[0])
        finally:
            with m.lock:
                m.meteor_p.stdin.close()
                m.meteor_p.kill()
                m.meteor_p.wait()
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


def review_figures(cider: dict[str, float], results: dict) -> dict[str, float]:
    """How well `quality` (or, without an estimator, `confidence`) tells right captions (per-image
    CIDEr-D >= quality.WRONG_BELOW) from wrong ones, and how wrong the unreviewed ones are."""
    names = sorted(results)
    right = torch.tensor([cider[n] >= WRONG_BELOW for n in names])
    confidence = torch.tensor([results[n].confidence for n in names])
    estimate = confidence if results[names[0]].quality is None else torch.tensor([results[n].quality for n in names])
    unreviewed = torch.tensor([not results[n].needs_review for n in names])
    best_half = estimate.argsort(descending=True)[: len(names) // 2]
    return {"wrong": float((~right).float().mean()), "auroc_quality": auroc(estimate, right),
            "auroc_confidence": auroc(confidence, right), "wrong_in_best_half": float((~right[best_half]).float().mean()),
            "unreviewed": float(unreviewed.float().mean()),
            "wrong_unreviewed": float((~right[unreviewed]).float().mean()) if bool(unreviewed.any()) else 0.0}


def stutters(caption_words: list[str]) -> bool:
    """True if a word repeats back to back or a 3-word n-gram occurs twice."""
    if any(a == b for a, b in zip(caption_words, caption_words[1:])):
        return True
    trigrams = list(zip(caption_words, caption_words[1:], caption_words[2:]))
    return len(trigrams) != len(set(trigrams))


def write_results(path: Path, predictions: dict[str, str], metrics: dict) -> None:
    Path(path).write_text(json.dumps({"metrics": metrics, "captions": [
        {"image": k, "caption": v} for k, v in sorted(predictions.items())]}, indent=1))


def rounded(metrics: dict[str, float], digits: int = 4) -> dict[str, float]:
    return {k: (round(v, digits) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()}


class Photos(Dataset):
    def __init__(self, folder: Path, names: list[str], preprocess):
        self.folder, self.names, self.preprocess = folder, names, preprocess

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.folder / self.names[i]) as im:
            return self.preprocess(im)


def evaluate_folder(captioner, images: Path, captions: Path, output: Path, split: Path | None = None,
                    beam: int = 3, batch_size: int = 32) -> dict:
    """Caption every image `captions` lists (optionally only those in `split`), score, write JSON.

    Returns the COCO metrics plus `review_figures`, `images` (how many were scored), `stutter` (the fraction of
    captions that repeat a word back to back or a trigram), `content_repeat` (that say a content
    word twice, model/repeats.py) and `content_repeat_human` (the same among the references).
    """
    references = read_captions(captions)
    names = sorted(references)
    if split is not None:
        wanted = set(read_split(split))
        names = [n for n in names if n in wanted]
    missing = [n for n in names if not (images / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} listed images are not in {images}, e.g. {missing[0]}")
    if not names:
        raise ValueError(f"{captions} lists no images to evaluate")
    loader = DataLoader(Photos(images, names, captioner.preprocess), batch_size=batch_size, num_workers=1,
                        multiprocessing_context=LOADER_START)
    predictions: dict[str, str] = {}
    results = {}
    done = 0
    for batch in tqdm(loader, desc="captioning", unit="batch"):
        # every candidate, as production keeps them: the estimator re-ranks them
        for name, result in zip(names[done : done + len(batch)], captioner.caption(batch, beam=beam, n_best=beam)):
            predictions[name] = result.text
            results[name] = result
        done += len(batch)
    metrics = score({n: references[n] for n in names}, predictions)
    metrics.update(review_figures(per_image_cider(references, predictions), results))
    metrics["images"] = len(names)
    metrics["stutter"] = sum(stutters(tokenize(c)) for c in predictions.values()) / len(names)
    # a content word said twice ("a hat and a hat"), in ours and, for scale, in the people's captions
    metrics["content_repeat"] = sum(repeats_content(tokenize(c)) for c in predictions.values()) / len(names)
    human = [repeats_content(tokenize(c)) for n in names for c in references[n]]
    metrics["content_repeat_human"] = sum(human) / len(human)
    metrics["model_version"] = captioner.version
    metrics = rounded(metrics)
    write_results(output, predictions, metrics)
    return metrics
