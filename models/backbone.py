"""Backbone factory: any timm model name, or ``torchvision:NAME``, as a frozen-able feature-map extractor.

The preprocessing contract (input size, resize, interpolation, mean, std) is read from the backbone's own pretrained
config, never hard-coded.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import math
import os
import re
import socket
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from headstart.service.errors import HeadstartError
from headstart.service.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

TORCHVISION_PREFIX = "torchvision:"


class BackboneError(HeadstartError, RuntimeError):
    """A backbone cannot be built as asked; the message says what to do instead."""


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def state_dict_sha256(module: nn.Module) -> str:
    """A content hash of a module's parameters and buffers, independent of how the weights were obtained."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(str(t.dtype).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load weights without unpickling code: safetensors, or ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"Weights file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # SafetensorError: a file of another kind, or cut short
            raise BackboneError(
                f"Cannot read weights from {path}: not a safetensors file, or a damaged one ({exc}). Give the "
                "backbone's weights as a .safetensors file or a state dict saved with torch.save."
            ) from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(
            f"Cannot read weights from {path}: {_unreadable(path, exc)} Give a state dict: "
            "torch.save(model.state_dict(), PATH), or a .safetensors file."
        ) from exc
    if _tensors(state):
        return state
    # a training checkpoint: the model's state dict under one of the keys the usual trainers write
    if isinstance(state, dict):
        for key in CHECKPOINT_KEYS:
            if _tensors(state.get(key)):
                log.info("weights: %s holds a checkpoint; its %r loaded", path, key)
                return state[key]
    keys = f" with keys {sorted(map(str, state))[:8]}" if isinstance(state, dict) else ""
    held = f" (it holds a {type(state).__name__}{keys})"
    raise BackboneError(
        f"{path} does not hold a state dict (a mapping of names to tensors){held}, nor a checkpoint with one under "
        f"{', '.join(CHECKPOINT_KEYS)}. Save model.state_dict() with torch.save."
    )


#: where training checkpoints keep the model's state dict (PyTorch Lightning, timm, the usual training scripts), in
#: the order looked at: the model's own weights before an EMA copy
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net", "state_dict_ema", "model_ema")


def _tensors(state) -> bool:
    return isinstance(state, dict) and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def _unreadable(path: Path, exc: Exception) -> str:
    """Why torch.load(weights_only=True) refused ``path``, in a sentence (torch's own message suggests
    ``weights_only=False``, which would run code from the file, and filing an issue with PyTorch)."""
    import zipfile

    with path.open("rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path) and head != b"\x80\x02":  # torch.save writes a zip, or before 1.6 a pickle
        return "it is not a file torch.save writes."
    pickled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if pickled:
        return (
            f"it holds a pickled Python object ({pickled.group(1)}: the whole model?), not only tensors, and "
            "headstart does not unpickle objects (that runs code from the file)."
        )
    return f"{type(exc).__name__}: {str(exc).splitlines()[0]}."


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], classifier_prefixes: tuple[str, ...], path) -> bool:
    """Load ``state`` strictly, except that the classifier may be absent or of another size. Returns whether the
    classifier's weights were loaded too (all of them)."""
    own = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    filtered = {
        k: v
        for k, v in state.items()
        if not (k.startswith(classifier_prefixes) and (k not in own or own[k].shape != v.shape))
    }
    result = model.load_state_dict(filtered, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(classifier_prefixes)]
    if missing or result.unexpected_keys:
        raise BackboneError(
            f"Weights in {path} do not fit this architecture: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(result.unexpected_keys)} unexpected keys "
            f"(e.g. {result.unexpected_keys[:3]}). Check --backbone matches the weights."
        )
    return not [k for k in own if k.startswith(classifier_prefixes) and k not in filtered]


class BatchNormFrozen(nn.Module):
    """A backbone whose BatchNorm layers stay in eval mode even when the module is put in train mode.

    A frozen (or partly unfrozen) pretrained backbone must keep its running statistics: small fine-tuning batches
    would otherwise move them, and weights with folded BatchNorm (identity running stats) would be wrecked.
    """

    def __init__(self, body: nn.Module, forward_fn: str | None = None) -> None:
        super().__init__()
        self.body = body
        self._forward_fn = forward_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = getattr(self.body, self._forward_fn) if self._forward_fn else self.body
        return fn(x)

    def train(self, mode: bool = True) -> BatchNormFrozen:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


@dataclass
class Backbone:
    """A feature-map extractor and what travels with it."""

    name: str
    features: BatchNormFrozen  # normalised NCHW image -> NCHW feature map
    num_features: int
    stages: list[tuple[str, nn.Module]]  # ordered input -> output, for --unfreeze
    preprocess: PreprocessSpec
    weights: str  # "random", "pretrained:<source>", or a file path
    weights_sha256: str = ""
    extra: dict = field(default_factory=dict)
    #: the model's own pretrained classifier (ImageNet's classes), where it is one linear layer on the mean of the
    #: feature map and its weights were loaded; None otherwise (random weights, a classifier of another form)
    classifier: nn.Linear | None = None

    def freeze(self, unfreeze_last: int = 0) -> list[str]:
        """Freeze every parameter, then unfreeze the last ``unfreeze_last`` stages. Returns the unfrozen names."""
        if unfreeze_last < 0 or unfreeze_last > len(self.stages):
            raise BackboneError(
                f"--unfreeze {unfreeze_last} is out of range: {self.name} has {len(self.stages)} stages "
                f"({', '.join(n for n, _ in self.stages)})."
            )
        for p in self.features.parameters():
            p.requires_grad_(False)
        names = []
        for stage_name, stage in self.stages[len(self.stages) - unfreeze_last :]:
            for p in stage.parameters():
                p.requires_grad_(True)
            names.append(stage_name)
        self.features.eval()
        return names

    def stage_state_dict(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Parameters and buffers of the named stages, keyed as in ``features.state_dict()``."""
        modules = [m for n, m in self.stages if n in names]
        ids = {id(t) for m in modules for t in (*m.parameters(), *m.buffers())}
        named = (*self.features.named_parameters(), *self.features.named_buffers())
        return {n: t.detach().clone() for n, t in named if id(t) in ids}


def _offline_message(name: str, exc: Exception) -> str:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return (
        f"Could not download pretrained weights for {name!r} ({type(exc).__name__}: {reason[:200]}). "
        "If this machine is offline, pass --weights PATH with a local state dict for this architecture "
        "(e.g. --backbone torchvision:mobilenet_v2 --weights ../shared/weights/mobilenet_v2_imagenet.pth), "
        "set HF_HUB_OFFLINE=1 to use only weights already in the Hugging Face cache, "
        "or --no-pretrained to train from random weights (much lower accuracy)."
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) answers a TCP connection within ``timeout`` s, and offline mode is
    not set. Checked before a download: huggingface_hub retries an unreachable hub for about 50 s before failing."""
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def hub_offline():
    """huggingface_hub in offline mode for the block: weights come from its cache at once, or it fails at once."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _sidecar_preprocess(weights: Path | None) -> dict | None:
    """Preprocessing from a JSON file beside a local weights file (``weights.json``), if it has one."""
    if weights is None:
        return None
    sidecar = weights.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        pre = json.loads(sidecar.read_text()).get("preprocessing")
    except (json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(pre, dict) or not {"mean", "std", "center_crop", "resize"} <= pre.keys():
        return None
    return {
        "input_size": int(pre["center_crop"]),
        "resize": int(pre["resize"]),
        "interpolation": str(pre.get("interpolation", "bilinear")).lower(),
        "mean": tuple(pre["mean"]),
        "std": tuple(pre["std"]),
    }


def _torchvision_preprocess(weights_enum) -> dict:
    """A torchvision model's preprocessing, from its default weights' transforms (known without any download)."""
    transforms = weights_enum.transforms()
    return {
        "input_size": int(transforms.crop_size[0]),
        "resize": int(transforms.resize_size[0]),
        "interpolation": transforms.interpolation.value,
        "mean": tuple(transforms.mean),
        "std": tuple(transforms.std),
    }


def _timm_preprocess(data_cfg: dict) -> dict:
    """A timm model's preprocessing, from its resolved data config."""
    size = int(data_cfg["input_size"][-1])
    return {
        "input_size": size,
        "resize": math.floor(size / float(data_cfg.get("crop_pct", 0.875))),
        "interpolation": data_cfg.get("interpolation", "bilinear"),
        "mean": tuple(data_cfg["mean"]),
        "std": tuple(data_cfg["std"]),
    }


def _spec(pre: dict) -> PreprocessSpec:
    interpolation = (
        pre["interpolation"] if pre["interpolation"] in ("nearest", "bilinear", "bicubic", "lanczos") else "bilinear"
    )
    return PreprocessSpec(
        input_size=pre["input_size"],
        resize=max(pre["resize"], pre["input_size"]),
        interpolation=interpolation,
        mean=tuple(float(v) for v in pre["mean"]),
        std=tuple(float(v) for v in pre["std"]),
    )


def backbone_preprocess(name: str, weights: str | Path | None = None) -> PreprocessSpec | None:
    """The preprocessing :func:`build_backbone` will give ``name`` with ``weights``, read without building it or
    downloading anything: from the JSON beside the weights file, torchvision's weights table or timm's pretrained
    config. None where it cannot be read so (an unknown name: :func:`build_backbone` says what is wrong). What it
    serves is a head start only (the data check decoding at the model's scale before the backbone is built): the
    built backbone's own preprocessing is what counts."""
    weights_path = Path(weights) if weights else None
    try:
        pre = _sidecar_preprocess(weights_path)
        if pre is None and name.startswith(TORCHVISION_PREFIX):
            import torchvision

            short = name[len(TORCHVISION_PREFIX) :]
            if short not in torchvision.models.list_models(module=torchvision.models):
                return None
            pre = _torchvision_preprocess(torchvision.models.get_model_weights(short).DEFAULT)
        elif pre is None:
            import timm
            from timm.data import resolve_data_config

            pretrained_cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
            if pretrained_cfg is None:
                return None
            pre = _timm_preprocess(resolve_data_config({}, pretrained_cfg=pretrained_cfg.to_dict()))
        return _spec(pre)
    except Exception:  # a name or an installation this cannot read: the build reads it (or says why not)
        return None


def _build_torchvision(name: str, pretrained: bool, weights: Path | None):
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise BackboneError(
            f"Invalid torchvision backbone {name!r}.{_suggest(name, available)} "
            f"See torchvision.models.list_models() for the {len(available)} available."
        )
    model = torchvision.models.get_model(name, weights=None)
    default = torchvision.models.get_model_weights(name).DEFAULT
    source, trained_classifier = "random", False
    if weights is not None:
        prefixes = ("fc.", "classifier.", "head.", "heads.")
        trained_classifier = _load_weights(model, load_state_dict_file(weights), prefixes, weights)
        source = str(weights)
    elif pretrained:
        try:
            model.load_state_dict(default.get_state_dict(progress=True, check_hash=True))
        except Exception as exc:
            raise BackboneError(_offline_message(f"torchvision:{name}", exc)) from exc
        source, trained_classifier = f"pretrained:torchvision:{default}", True

    pre = _sidecar_preprocess(weights) or _torchvision_preprocess(default)

    if isinstance(getattr(model, "features", None), nn.Sequential):
        body = model.features
        stages = [(f"features.{i}", m) for i, m in enumerate(body)]
    elif hasattr(model, "layer4"):
        children = [(n, m) for n, m in model.named_children() if n not in ("avgpool", "fc")]
        body = nn.Sequential(OrderedDict(children))
        stem = nn.Sequential(*[m for n, m in children if not n.startswith("layer")])
        stages = [("stem", stem)] + [(n, m) for n, m in children if n.startswith("layer")]
    else:
        raise BackboneError(
            f"torchvision:{name} has no convolutional feature map that headstart knows how to take "
            "(it supports models with .features, such as mobilenet/efficientnet/convnext, and ResNet-style "
            "models). Use a timm model name instead."
        )
    head = getattr(model, "fc", None) if hasattr(model, "layer4") else getattr(model, "classifier", None)
    linear = _pooled_linear(head, model, body) if trained_classifier else None
    return BatchNormFrozen(body), stages, pre, source, linear


def _build_timm(name: str, pretrained: bool, weights: Path | None):
    import timm
    from timm.data import resolve_data_config

    if not timm.is_model(name):
        raise BackboneError(
            f"Invalid backbone {name!r}: not a timm model name nor torchvision:NAME."
            f"{_suggest(name, timm.list_models())} timm.list_models('*{name}*') lists similar names."
        )
    download = pretrained and weights is None
    source, trained_classifier = "random", download
    try:
        with contextlib.nullcontext() if not download or hub_reachable() else hub_offline():
            model = timm.create_model(name, pretrained=download)
    except Exception as exc:
        if download:
            raise BackboneError(_offline_message(name, exc)) from exc
        raise
    if pretrained and weights is None:
        source = f"pretrained:timm:{model.pretrained_cfg.get('hf_hub_id') or name}"
    if weights is not None:
        classifier = model.pretrained_cfg.get("classifier", "fc")
        prefixes = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier))
        trained_classifier = _load_weights(model, load_state_dict_file(weights), prefixes, weights)
        source = str(weights)
    linear = None
    if trained_classifier:
        linear = _pooled_linear(model.get_classifier(), model, model.forward_features)
    model.reset_classifier(0, "")
    pre = _sidecar_preprocess(weights) or _timm_preprocess(resolve_data_config({}, model=model))
    stage_names = [info["module"] for info in getattr(model, "feature_info", [])]
    stages = [(n, model.get_submodule(n)) for n in stage_names if n]
    if not stages:
        stages = [(n, m) for n, m in model.named_children()]
    return BatchNormFrozen(model, "forward_features"), stages, pre, source, linear


def _pooled_linear(head: nn.Module | None, model: nn.Module, features) -> nn.Linear | None:
    """A copy of ``head``'s linear layer where the whole ``model`` is exactly that layer on the mean of its
    ``features`` map (dropout aside): checked on random images, so that a head with a norm, a hidden layer or
    another pooling is never mistaken for one. None otherwise."""
    import copy

    parts = [m for m in (head.modules() if head is not None else ()) if not isinstance(m, (nn.Sequential, nn.Dropout))]
    if len(parts) != 1 or not isinstance(parts[0], nn.Linear):
        return None
    linear = copy.deepcopy(parts[0]).eval().requires_grad_(False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
            whole, fmap = model(x), features(x)
            ours = linear(fmap.mean(dim=(2, 3))) if fmap.ndim == 4 else None
    except Exception:  # a model that cannot take the probe's size: no prior
        return None
    finally:
        model.train(was_training)
    if ours is None or whole.shape != ours.shape or not torch.allclose(whole, ours, rtol=1e-4, atol=1e-4):
        return None
    return linear


def build_backbone(name: str = "resnet50", *, pretrained: bool = True, weights: str | Path | None = None) -> Backbone:
    """Build a backbone that maps normalised images to a feature map.

    ``name`` is a timm model name or ``torchvision:NAME``. ``weights`` is a local state dict (safetensors or a
    torch.save'd dict of tensors) that replaces the download; ``pretrained=False`` leaves random weights.
    """
    weights_path = Path(weights) if weights else None
    if name.startswith(TORCHVISION_PREFIX):
        built = _build_torchvision(name[len(TORCHVISION_PREFIX) :], pretrained, weights_path)
    else:
        built = _build_timm(name, pretrained, weights_path)
    features, stages, pre, source, classifier = built
    spec = _spec(pre)
    features.eval()
    with torch.no_grad():
        probe = features(torch.zeros(1, 3, spec.input_size, spec.input_size))
    if probe.ndim != 4:
        raise BackboneError(
            f"Backbone {name!r} gives features of shape {tuple(probe.shape)}, not a spatial feature map "
            "(N, C, H, W). headstart needs a convolutional backbone (ResNet, MobileNet, EfficientNet, ConvNeXt...)."
        )
    for p in features.parameters():
        p.requires_grad_(False)
    return Backbone(
        name=name,
        features=features,
        num_features=int(probe.shape[1]),
        stages=stages,
        preprocess=spec,
        weights=source,
        weights_sha256=state_dict_sha256(features),
        extra={"feature_map": list(probe.shape[2:])},
        classifier=classifier,  # checked against the whole model: it reads this map's channels
    )
