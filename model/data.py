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

# the image-decoding process starts fresh ("spawn"), not as a fork of a caller that may hold
# broker connections (a forked child of a process with a Celery event receiver hung in kombu's
# after-fork cleanup, reading a socket it shares with its parent)
LOADER_START = "spawn"
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
                  device: str = "cpu", mirror: bool = False) -> torch.Tensor:
    """Run the encoder's frozen trunk over every named image (mirrored left-right if `mirror`)
    once -> fp16 (N, ...)."""
    # decoding overlaps the CNN on a second process
    loader = DataLoader(_ImageFiles([Path(folder) / n for n in names]), batch_size=batch_size,
                        num_workers=1, multiprocessing_context=LOADER_START)
    encoder = encoder.to(device)
    desc = "encoding mirrored images" if mirror else "encoding images"
    out = [encoder.trunk((batch.flip(-1) if mirror else batch).to(device)).half().cpu()
           for batch in tqdm(loader, desc=desc, unit="batch")]
    return torch.cat(out)


def cached_features(encoder: Encoder, folder: Path, names: list[str], cache_dir: Path,
                    device: str = "cpu", mirror: bool = False) -> tuple[dict[str, int], torch.Tensor]:
    """Trunk outputs for `names`, computed once and kept in `cache_dir` for later runs.

    Returns (index {name: row}, fp16 tensor). A cache made for other images or another encoder
    is recomputed.
    """
    cfg = encoder.cfg
    key = {"backbone": cfg.backbone, "weights": str(cfg.weights), "grid": cfg.grid}
    suffix = f"-trunk{cfg.tuned_stages}" if cfg.tuned_stages else ""
    if cfg.tuned_stages:
        key["tuned_stages"] = cfg.tuned_stages
    if mirror:
        key["mirror"], suffix = True, suffix + "-mirror"
    cache = Path(cache_dir) / f"features-{cfg.backbone}{suffix}.pt"
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved["key"] == key and set(names) <= set(saved["names"]):
            return {n: i for i, n in enumerate(saved["names"])}, saved["features"]
    feats = encode_folder(encoder, folder, names, device=device, mirror=mirror)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "names": list(names), "features": feats}, cache)
    return {n: i for i, n in enumerate(names)}, feats


def official_splits(captions: Path) -> tuple[Path, Path] | None:
    """Flickr8k's own train and dev name lists beside its token file, when they are there."""
    train, dev = captions.parent / "Flickr_8k.trainImages.txt", captions.parent / "Flickr_8k.devImages.txt"
    return (train, dev) if train.exists() and dev.exists() else None
