"""Build a model from a ModelConfig and load its weights (always with weights_only=True)."""
from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wf_pipeline.errors import WFError
from wf_pipeline.models.cifar_resnet import resnet20, resnet32, resnet56
from wf_pipeline.models.mobilenet_v1 import mobilenetv1
from wf_pipeline.recipe.schema import ModelConfig

_PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
BUILTIN_CHECKPOINTS = {
    "resnet20-fmnist": _PRETRAINED_DIR / "resnet20_fmnist.pt",
    # model: {name: mobilenetv1, kwargs: {width_mult: 0.25, small_input: true}} (recipes/train_mobilenetv1_fmnist.yaml)
    "mobilenetv1-fmnist": _PRETRAINED_DIR / "mobilenetv1_fmnist.pt",
}
DEFAULT_CHECKPOINT = "builtin:resnet20-fmnist"

_BUILTIN_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "mobilenetv1": mobilenetv1,
}


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _call_factory(factory: Callable[..., nn.Module], cfg: ModelConfig) -> nn.Module:
    params = inspect.signature(factory).parameters
    kwargs: dict[str, Any] = dict(cfg.kwargs)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in (("num_classes", cfg.num_classes), ("in_channels", cfg.in_channels)):
        if key in params or accepts_any:
            kwargs.setdefault(key, value)
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise WFError(f"model.kwargs do not fit {cfg.name}: {exc}", "check the factory's arguments") from exc
    if not isinstance(model, nn.Module):
        raise WFError(f"model factory {cfg.name} returned {type(model).__name__}, not an nn.Module")
    return model


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    return None


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _pair(values: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's stored size (typed tuple[int, ...] by torch) as the pair it holds."""
    first, second = values
    return first, second


def _adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    """torchvision models take RGB; swap the stem for one with `in_channels` inputs."""
    found = _first_conv(model)
    if found is None or found[1].in_channels == in_channels:
        return
    name, conv = found
    padding = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
    new = nn.Conv2d(
        in_channels, conv.out_channels, _pair(conv.kernel_size), _pair(conv.stride), padding,
        _pair(conv.dilation), conv.groups, conv.bias is not None, conv.padding_mode,
    )
    _set_submodule(model, name, new)


def _build_torchvision(cfg: ModelConfig) -> nn.Module:
    import torchvision

    name = cfg.name.removeprefix("torchvision:")
    if name not in _torchvision_names():
        raise WFError(
            f"model.name: unknown model {cfg.name!r}",
            "use resnet20, resnet32, resnet56, mobilenetv1, a torchvision classification model "
            "(e.g. resnet18, resnet50, mobilenet_v2) or 'module.path:factory'",
        )
    kwargs = dict(cfg.kwargs)
    kwargs.setdefault("num_classes", cfg.num_classes)
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    _adapt_input_channels(model, cfg.in_channels)
    return model


# Whether a recipe's `model.name: module:factory` may be imported and called. Off unless the command
# line says so (--trust-recipe-code), like trust_remote_code: a recipe from elsewhere must not run code.
_trust_recipe_code = False


def set_trust_recipe_code(allowed: bool) -> None:
    global _trust_recipe_code
    _trust_recipe_code = bool(allowed)


def is_user_code(name: str) -> bool:
    """A 'module.path:factory' model name (code from the recipe), as opposed to a built-in or torchvision name."""
    return ":" in name and not name.startswith("torchvision:") and name not in _BUILTIN_FACTORIES


def _build_from_factory_path(cfg: ModelConfig, trust_code: bool) -> nn.Module:
    if not trust_code:
        raise WFError(f"model.name: {cfg.name!r} names code to import and run from the recipe; not run",
                      "pass --trust-recipe-code if you trust this recipe and the module it names")
    module_name, _, attr = cfg.name.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # so a user's local model file imports like a script would
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WFError(f"model.name: cannot import module {module_name!r}: {exc}",
                      "use 'package.module:factory' importable from the current folder") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise WFError(f"model.name: {module_name!r} has no callable {attr!r}",
                      "name a function or class that builds the model")
    return _call_factory(factory, cfg)


def build_model(cfg: ModelConfig, *, load: bool = True, trust_code: bool | None = None) -> nn.Module:
    """Build the model the recipe names and, if `load`, load `cfg.weights` into it.

    A 'module.path:factory' name is imported and called only with `trust_code=True` (None: whatever
    the command line allowed through `set_trust_recipe_code`).
    """
    if cfg.name in _BUILTIN_FACTORIES:
        model = _call_factory(_BUILTIN_FACTORIES[cfg.name], cfg)
    elif is_user_code(cfg.name):
        model = _build_from_factory_path(cfg, _trust_recipe_code if trust_code is None else trust_code)
    else:
        model = _build_torchvision(cfg)
    if load and cfg.weights:
        load_weights(model, cfg)
    return model


def resolve_builtin(weights: str) -> Path:
    key = weights.removeprefix("builtin:")
    if key not in BUILTIN_CHECKPOINTS:
        raise WFError(f"model.weights: unknown built-in checkpoint {weights!r}",
                      f"available: {', '.join('builtin:' + k for k in BUILTIN_CHECKPOINTS)}")
    path = BUILTIN_CHECKPOINTS[key]
    if not path.exists():
        raise WFError(f"model.weights: built-in checkpoint {path} is missing",
                      "reinstall wf-pipeline or run `wf-pipeline train recipes/train_resnet20_fmnist.yaml`")
    return path


def is_torchvision_weights_name(weights: str) -> bool:
    return "_Weights." in weights and Path(weights).suffix not in {".pt", ".pth", ".bin"}


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or pickled-code files land here
        raise WFError(f"model.weights: cannot load {path}: {exc}".splitlines()[0],
                      "give a state_dict saved with torch.save(model.state_dict(), path)") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WFError(f"model.weights: {path} does not hold a state_dict of tensors",
                      "save it with torch.save(model.state_dict(), path)")
    # DataParallel / DDP checkpoints prefix every key with 'module.'
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def _torchvision_state_dict(weights: str) -> dict[str, torch.Tensor]:
    import torchvision

    try:
        enum_value = torchvision.models.get_weight(weights)
    except (ValueError, KeyError, AttributeError) as exc:
        raise WFError(f"model.weights: unknown torchvision weights {weights!r}",
                      "use e.g. 'ResNet18_Weights.IMAGENET1K_V1' or a local file path") from exc
    try:
        return enum_value.get_state_dict(progress=False, weights_only=True)
    except Exception as exc:  # no network: explain how to do it offline
        hint = "no network here: download the file once elsewhere and set model.weights to its local path"
        raise WFError(f"model.weights: cannot fetch {weights} ({type(exc).__name__})", hint) from exc


def _adapt_state_dict(model: nn.Module, state: dict[str, torch.Tensor],
                      cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fit pretrained tensors to an adapted stem (channel count) and head (class count)."""
    own = model.state_dict()
    adapted: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    stem = _first_conv(model)
    stem_key = f"{stem[0]}.weight" if stem else None
    for key, tensor in state.items():
        target = own.get(key)
        if target is None or target.shape == tensor.shape:
            adapted[key] = tensor
        elif key == stem_key and tensor.dim() == 4 and tensor.shape[0] == target.shape[0]:
            # Summing RGB filters is exact for a grey image replicated to 3 channels.
            summed = tensor.sum(dim=1, keepdim=True)
            adapted[key] = summed.repeat(1, target.shape[1], 1, 1) / target.shape[1]
        elif (tensor.dim() >= 1 and target.dim() == tensor.dim()
              and tensor.shape[0] != cfg.num_classes == target.shape[0]):
            dropped.append(key)  # classifier head for another class count: keep our fresh head
        else:
            raise WFError(f"model.weights: tensor {key} has shape {tuple(tensor.shape)}, "
                          f"model expects {tuple(target.shape)}",
                          "the checkpoint was made for a different model.name / num_classes / in_channels")
    return adapted, dropped


def load_weights(model: nn.Module, cfg: ModelConfig) -> list[str]:
    """Load cfg.weights into model; returns the keys left at their fresh initialisation."""
    assert cfg.weights is not None
    if cfg.weights.startswith("builtin:"):
        state = _load_state_dict_file(resolve_builtin(cfg.weights))
    elif is_torchvision_weights_name(cfg.weights):
        state = _torchvision_state_dict(cfg.weights)
    else:
        path = Path(cfg.weights).expanduser()
        if not path.is_file():
            raise WFError(f"model.weights: file not found: {path}",
                          "give an existing checkpoint path (relative to the current folder)")
        state = _load_state_dict_file(path)
    state, dropped = _adapt_state_dict(model, state, cfg)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in dropped]
    if cfg.strict_load and (missing or result.unexpected_keys):
        raise WFError(
            f"model.weights: checkpoint does not fit {cfg.name}: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}",
            "check model.name, or set model.strict_load: false",
        )
    return dropped + missing


def load_default_model() -> nn.Module:
    """The bundled pretrained ResNet-20 for Fashion-MNIST (1x28x28 inputs, 10 classes)."""
    cfg = ModelConfig(name="resnet20", num_classes=10, in_channels=1, weights=DEFAULT_CHECKPOINT)
    return build_model(cfg).eval()
