"""Caption data sets (Flickr8k token files, COCO caption JSON) and the encoder-feature cache."""
import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .encoder import Encoder, preprocess

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?|[0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-case words without punctuation, the way the references are scored."""
    return _WORD.findall(text.lower())


def read_flickr8k_tokens(path: Path) -> dict[str, list[str]]:
    """`NAME#N<TAB>caption` lines -> {image file name: [captions]}."""
    captions: dict[str, list[str]] = defaultdict(list)
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key, sep, text = line.partition("\t")
        if not sep or "#" not in key:
            raise ValueError(f"{path}:{line_no}: expected NAME#N<TAB>caption")
        captions[key.rsplit("#", 1)[0]].append(text.strip())
    return dict(captions)


def read_coco_captions(path: Path) -> dict[str, list[str]]:
    """A COCO-format caption file -> {image file name: [captions]}."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    names = {img["id"]: img["file_name"] for img in doc["images"]}
    captions: dict[str, list[str]] = defaultdict(list)
    for ann in doc["annotations"]:
        captions[names[ann["image_id"]]].append(ann["caption"].strip())
    return dict(captions)


def read_captions(path: Path) -> dict[str, list[str]]:
    """Either format, told apart by the file's first character."""
    head = Path(path).read_text(encoding="utf-8")[:1]
    return read_coco_captions(path) if head == "{" else read_flickr8k_tokens(path)


def read_split(path: Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


class _ImageFiles(Dataset):
    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as im:
            return preprocess(im)


@torch.no_grad()
def encode_folder(encoder: Encoder, folder: Path, names: list[str], batch_size: int = 64,
                  device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every named image once -> (features (N, P, C) fp16, logits (N, 1000) fp16)."""
    loader = DataLoader(_ImageFiles([Path(folder) / n for n in names]), batch_size=batch_size,
                        num_workers=1)  # decoding overlaps the CNN on a second process
    encoder = encoder.to(device).eval()
    feats, logits = [], []
    for batch in tqdm(loader, desc="encoding images", unit="batch"):
        f, lg = encoder(batch.to(device))
        feats.append(f.half().cpu())
        logits.append(lg.half().cpu())
    return torch.cat(feats), torch.cat(logits)


def cached_features(encoder: Encoder, folder: Path, names: list[str], cache: Path,
                    device: str = "cpu") -> dict[str, int] | tuple:
    """Features for `names`, computed once and kept in `cache` (a .pt file) for later runs.

    Returns (index {name: row}, features (N, P, C) fp16). A cache made for other images or
    another backbone is recomputed.
    """
    cache = Path(cache)
    key = {"backbone": encoder.cfg.backbone, "weights": str(encoder.cfg.weights), "grid": encoder.cfg.grid}
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved["key"] == key and set(names) <= set(saved["names"]):
            return {n: i for i, n in enumerate(saved["names"])}, saved["features"]
    feats, _ = encode_folder(encoder, folder, names, device=device)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "names": list(names), "features": feats}, cache)
    return {n: i for i, n in enumerate(names)}, feats
