"""Train the attention decoder on cached encoder features (`captioner train`).

The encoder's trunk is frozen, so every image (and its mirror image) is encoded once into a
feature cache and each epoch only runs the decoder and the encoder's fine-tuned top: that is what
makes a full run fit an hour on two CPU cores.
"""
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import repeats
from .beam_search import beam_search
from .data import cached_features, read_captions, read_split, tokenize
from .encoder import Encoder, EncoderConfig
from .evaluate import score_tokenized
from .network import Decoder, DecoderConfig
from .scst import CiderD, references_by_row, scst_epoch
from .vocab import SPECIALS, Vocab


@dataclass(frozen=True)
class TrainConfig:
    captions: str  # Flickr8k token file or COCO caption JSON
    images: str  # folder holding the images the captions name
    run_dir: str = "runs/default"
    train_split: str | None = None  # file of image names; None = a seeded split by image
    dev_split: str | None = None
    dev_fraction: float = 0.1  # used only without split files
    cache_dir: str = ".cache"
    backbone: str = "tf_efficientnet_lite0"
    encoder_weights: str | None = None
    min_count: int = 5  # words seen fewer times become <unk>
    max_len: int = 20  # words per caption, longer ones are cut
    embed_dim: int = 256
    decoder_dim: int = 512
    attention_dim: int = 256
    dropout: float = 0.5
    tuned_stages: int = 1  # fine-tune the encoder's last N stages (the trunk below them is cached); 0 = frozen
    encoder_lr_ratio: float = 0.1  # their learning rate relative to the decoder's
    batch_size: int = 64
    lr: float = 1e-3
    lr_min_ratio: float = 0.05  # cosine decay from lr to lr * ratio over `epochs`
    epochs: int = 6
    scst_epochs: int = 0  # self-critical epochs after cross-entropy (see the model card: it did not help yet)
    scst_lr: float = 5e-5
    scst_images_per_batch: int = 16
    scst_samples: int = 5  # captions sampled per photo; each one's baseline is the others' mean
    max_minutes: float = 55.0  # stop after the epoch that crosses this
    patience: int = 3  # epochs without a better dev CIDEr before stopping
    attention_reg: float = 1.0  # doubly stochastic attention: each position attended ~once overall
    label_smoothing: float = 0.1
    mirror: float = 0.5  # chance that a training caption sees its photo mirrored left-right
    clip: float = 5.0
    beam: int = 3
    dev_images: int = 1000  # dev photos scored after each epoch
    seed: int = 0
    device: str = "cpu"


def split_names(cfg: TrainConfig, captions: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """(training photos, dev photos): the split files' lists, or a seeded split by photo.

    Photos listed in no split file beside the training list (Flickr8k has 91 of them, and its
    held-back test list is not there) are fair game for training.
    """
    names = sorted(captions)
    if cfg.train_split and cfg.dev_split:
        folder = Path(cfg.train_split).parent
        lists = {Path(cfg.train_split), Path(cfg.dev_split), *folder.glob("*testImages.txt")}
        listed = {n for p in lists for n in read_split(p)}
        train_listed = set(read_split(Path(cfg.train_split)))
        dev = [n for n in read_split(Path(cfg.dev_split)) if n in captions]
        train = [n for n in names if n in train_listed or n not in listed]
        return train, dev
    rng = random.Random(cfg.seed)
    rng.shuffle(names)
    n_dev = max(1, int(len(names) * cfg.dev_fraction))
    return sorted(names[n_dev:]), sorted(names[:n_dev])


def _batches(pairs: list[tuple[int, list[int]]], batch_size: int, rng: random.Random, pad: int):
    order = list(range(len(pairs)))
    rng.shuffle(order)
    for i in range(0, len(order), batch_size):
        chunk = [pairs[j] for j in order[i : i + batch_size]]
        rows = torch.tensor([r for r, _ in chunk])
        width = max(len(ids) for _, ids in chunk)
        caps = torch.full((len(chunk), width), pad, dtype=torch.long)
        for k, (_, ids) in enumerate(chunk):
            caps[k, : len(ids)] = torch.tensor(ids)
        yield rows, caps


def loss_fn(decoder: Decoder, feats: torch.Tensor, caps: torch.Tensor, cfg: TrainConfig, pad: int):
    """Cross-entropy on the next word + the doubly stochastic attention penalty."""
    logits, alphas = decoder(feats, caps)  # (B, T-1, V), (B, T-1, P)
    target = caps[:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=pad, label_smoothing=cfg.label_smoothing)
    mask = (target != pad).unsqueeze(2).float()  # (B, T-1, 1)
    reg = ((1.0 - (alphas * mask).sum(1)) ** 2).mean()
    return ce + cfg.attention_reg * reg, ce


@torch.no_grad()
def dev_scores(decoder: Decoder, feats: torch.Tensor, refs: dict[str, list[str]], vocab: Vocab,
               beam: int, max_len: int, batch_size: int = 250) -> tuple[dict[str, float], dict[str, str]]:
    """Beam-search captions for the dev rows of `feats` and their BLEU/ROUGE/CIDEr (no METEOR)."""
    decoder.eval()
    names = list(refs)
    banned = [vocab.pad, vocab.start, vocab.unk]
    preds: dict[str, str] = {}
    for i in range(0, len(names), batch_size):
        hyps = beam_search(decoder, feats[i : i + batch_size].float(), vocab.start, vocab.end, banned,
                           beam=beam, n_best=1, max_len=max_len, **repeats.rule(vocab.words, len(SPECIALS)))
        for name, h in zip(names[i : i + batch_size], hyps):
            preds[name] = " ".join(vocab.decode(h[0].tokens))
    gts = {n: [" ".join(tokenize(c)) for c in refs[n]] for n in names}
    res = {n: [preds[n] or "a"] for n in names}
    return score_tokenized(gts, res, meteor=False), preds


def export_checkpoint(state: dict, path: Path) -> None:
    """The shipped form: decoder weights in fp16 plus everything needed to rebuild the model."""
    model = {k: (v.half() if v.is_floating_point() else v) for k, v in state["model"].items()}
    out = {k: state[k] for k in ("config", "encoder", "vocab", "max_len", "recipe", "metrics")}
    out["model"] = model
    if state.get("encoder_top"):
        out["encoder_top"] = {k: (v.half() if v.is_floating_point() else v) for k, v in state["encoder_top"].items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)


def export_tiny_checkpoint(folder: Path) -> Path:
    """A real checkpoint of a tiny random-weight model (timm's test_efficientnet encoder, 0.36 M
    parameters, and a 32-unit decoder over a 12-word vocabulary) that loads and captions like the
    shipped one, much faster and with nonsense words: for tests and benchmarks of everything but
    the model. Returns the checkpoint's path in `folder`."""
    import timm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    weights = folder / "tiny-encoder.pt"
    torch.save(timm.create_model("test_efficientnet", pretrained=False).state_dict(), weights)
    encoder = EncoderConfig(backbone="test_efficientnet", weights=str(weights))
    vocab = Vocab([*SPECIALS, "a", "dog", "cat", "runs", "sits", "on", "the", "grass"])
    config = DecoderConfig(len(vocab), feature_dim=256, embed_dim=16, decoder_dim=32, attention_dim=16, dropout=0.0)
    path = folder / "tiny.pt"
    export_checkpoint({"config": asdict(config), "encoder": asdict(encoder), "vocab": vocab.words, "max_len": 8,
                       "recipe": {}, "metrics": {}, "model": Decoder(config).state_dict()}, path)
    return path


def plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    xe = [h for h in history if h.get("phase", "cross-entropy") == "cross-entropy"]
    sc = [h for h in history if h.get("phase") == "self-critical"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([h["epoch"] for h in xe], [h["train_loss"] for h in xe], marker="o", label="train cross-entropy")
    a.set_xlabel("epoch"), a.legend(loc="upper left")
    if sc:  # the self-critical phase logs minus its mean sampled reward: a different scale
        r = a.twinx()
        r.plot([h["epoch"] for h in sc], [-h["train_loss"] for h in sc], "s-", color="tab:red", label="self-critical reward")
        r.legend(loc="upper right")
    for key in ("CIDEr", "BLEU-4"):
        b.plot([h["epoch"] for h in history], [h["dev"][key] for h in history], marker="o", label=f"dev {key}")
    b.set_xlabel("epoch"), b.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train(cfg: TrainConfig, resume: bool = True, log=print) -> Path:
    """Train, keeping the best epoch by dev CIDEr; returns the path of the exported checkpoint."""
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)

    captions = read_captions(Path(cfg.captions))
    missing = [n for n in captions if not (Path(cfg.images) / n).exists()]
    if missing:
        log(f"{len(missing)} captioned images are not in {cfg.images}; skipping them")
        captions = {n: c for n, c in captions.items() if n not in set(missing)}
    train_names, dev_names = split_names(cfg, captions)
    tokens = {n: [tokenize(c) for c in captions[n]] for n in train_names}
    vocab = Vocab.build([t for ts in tokens.values() for t in ts], cfg.min_count)
    log(f"{len(train_names)} training photos, {len(dev_names)} dev photos, vocabulary {len(vocab)} words")

    enc_cfg = EncoderConfig(cfg.backbone, cfg.encoder_weights, tuned_stages=cfg.tuned_stages)
    encoder = Encoder(enc_cfg).to(device)
    index, cached = cached_features(encoder, Path(cfg.images), sorted(captions), Path(cfg.cache_dir), device=cfg.device)
    mirrored = cached_features(encoder, Path(cfg.images), sorted(captions), Path(cfg.cache_dir), device=cfg.device,
                               mirror=True)[1] if cfg.mirror else None
    train_rows = torch.tensor([index[n] for n in train_names])
    dev_names = dev_names[: cfg.dev_images]
    dev_rows = torch.tensor([index[n] for n in dev_names])
    dev_refs = {n: captions[n] for n in dev_names}
    pairs = [(i, vocab.encode(t, cfg.max_len)) for i, n in enumerate(train_names) for t in tokens[n]]
    tuned = [p for p in encoder.parameters() if p.requires_grad]

    def features(rows: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """Attention features (B, P, C) of cached rows (mirrored where `flip`), through the
        fine-tuned stages if any."""
        x = cached[rows]
        if flip is not None:
            x = torch.where(flip.view(-1, 1, 1, 1), mirrored[rows], x)
        with torch.set_grad_enabled(bool(tuned) and torch.is_grad_enabled()):
            return encoder.top(x.to(device, non_blocking=True).float())

    def augmented(rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        flip = torch.rand(len(rows), generator=gen) < cfg.mirror if cfg.mirror else None
        return features(train_rows[rows], flip=flip)

    dec_cfg = DecoderConfig(len(vocab), encoder.cnn.num_features, cfg.embed_dim, cfg.decoder_dim,
                            cfg.attention_dim, cfg.dropout)
    torch.manual_seed(cfg.seed)  # here, not earlier: computing the feature cache draws random numbers
    decoder = Decoder(dec_cfg).to(device)
    steps_per_epoch = math.ceil(len(pairs) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs

    def optimizer(self_critical: bool):
        lr = cfg.scst_lr if self_critical else cfg.lr
        groups = [{"params": list(decoder.parameters()), "lr": lr}]
        if tuned:
            groups.append({"params": tuned, "lr": lr * cfg.encoder_lr_ratio})
        opt = torch.optim.Adam(groups)
        cosine = lambda s: cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, (lambda s: 1.0) if self_critical else cosine)

    def tuned_state() -> dict[str, torch.Tensor]:
        names = encoder.tuned_names()
        return {k: v.detach().cpu() for k, v in encoder.cnn.state_dict().items() if k in names}

    state_path = run / "last.pt"
    history: list[dict] = []
    epoch, best, stale, elapsed, self_critical = 0, -1.0, 0, 0.0, False
    opt, sched = optimizer(self_critical=False)
    if resume and state_path.exists():
        saved = torch.load(state_path, weights_only=False)  # our own file, holds RNG states
        epoch, best, stale, elapsed, history = (saved[k] for k in ("epoch", "best", "stale", "elapsed", "history"))
        self_critical = saved.get("self_critical", False)
        opt, sched = optimizer(self_critical)
        decoder.load_state_dict(saved["model"])
        encoder.cnn.load_state_dict(saved.get("encoder_top", {}), strict=False)
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        log(f"resuming after epoch {epoch} (best dev CIDEr {best:.4f})")
    reward = None
    recipe = {k: v for k, v in asdict(cfg).items() if k not in ("run_dir", "cache_dir", "device")}

    while epoch < cfg.epochs + cfg.scst_epochs and elapsed / 60 < cfg.max_minutes:
        if epoch < cfg.epochs and stale >= cfg.patience:
            epoch = cfg.epochs  # cross-entropy has stopped improving: go on to the self-critical phase
            continue
        if epoch >= cfg.epochs and not self_critical:
            # self-critical training starts from the best cross-entropy epoch, with its own optimizer
            best_state = torch.load(run / "best.pt", weights_only=True)
            decoder.load_state_dict({k: v.float() for k, v in best_state["model"].items()})
            encoder.cnn.load_state_dict({k: v.float() for k, v in best_state.get("encoder_top", {}).items()}, strict=False)
            self_critical, stale = True, 0
            opt, sched = optimizer(self_critical)
        t0 = time.time()
        rng = random.Random(cfg.seed * 1000 + epoch)
        if self_critical:
            if reward is None:
                reward = CiderD(references_by_row(tokens, train_names))
            train_loss = -scst_epoch(decoder, lambda rows: features(train_rows[rows]), len(train_names), reward, vocab,
                                     opt, rng, cfg.scst_images_per_batch, cfg.scst_samples, cfg.max_len, cfg.clip)
        else:
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
            train_loss = xe_epoch(decoder, lambda rows: augmented(rows, gen), pairs, opt, sched, rng, cfg,
                                  vocab, steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
        with torch.no_grad():
            dev_feats = features(dev_rows)
        dev, preds = dev_scores(decoder, dev_feats, dev_refs, vocab, cfg.beam, cfg.max_len)
        elapsed += time.time() - t0
        epoch += 1
        history.append({"epoch": epoch, "phase": "self-critical" if self_critical else "cross-entropy",
                        "train_loss": train_loss, "dev": dev, "lr": sched.get_last_lr()[0],
                        "minutes": round(elapsed / 60, 2)})
        with open(run / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(history[-1]) + "\n")
        log(f"epoch {epoch} ({history[-1]['phase']}): train {train_loss:.3f}, dev CIDEr {dev['CIDEr']:.4f} "
            f"BLEU-4 {dev['BLEU-4']:.4f}, {elapsed / 60:.1f} min")
        plot(history, run / "training.png")
        if dev["CIDEr"] > best:
            best, stale = dev["CIDEr"], 0
            export_checkpoint({"config": asdict(dec_cfg), "encoder": asdict(enc_cfg), "vocab": vocab.words,
                               "max_len": cfg.max_len, "recipe": recipe, "metrics": {"epoch": epoch, "dev": dev},
                               "model": {k: v.detach().cpu() for k, v in decoder.state_dict().items()},
                               "encoder_top": tuned_state()}, run / "best.pt")
            (run / "dev_captions.json").write_text(json.dumps(preds, indent=1))
        else:
            stale += 1
        torch.save({"model": decoder.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "encoder_top": tuned_state(), "self_critical": self_critical, "epoch": epoch, "best": best, "stale": stale,
                    "elapsed": elapsed, "history": history, "torch_rng": torch.get_rng_state()}, state_path)
    log(f"best dev CIDEr {best:.4f}; checkpoint {run / 'best.pt'}")
    return run / "best.pt"


def xe_epoch(decoder, features, pairs, opt, sched, rng, cfg, vocab, steps, desc) -> float:
    """One teacher-forced pass over every (photo, caption) pair; returns the mean cross-entropy."""
    decoder.train()
    total_ce, n = 0.0, 0
    bar = tqdm(_batches(pairs, cfg.batch_size, rng, vocab.pad), total=steps, desc=desc, unit="batch")
    for rows, caps in bar:
        loss, ce = loss_fn(decoder, features(rows), caps.to(cfg.device), cfg, vocab.pad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.clip)
        opt.step()
        sched.step()
        total_ce, n = total_ce + ce.item(), n + 1
        bar.set_postfix(ce=f"{total_ce / n:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
    return total_ce / max(n, 1)
