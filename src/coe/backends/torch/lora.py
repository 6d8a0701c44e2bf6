"""PEFT LoRA adapters for torch experts: checked from the headers, read into host memory, applied
per batch row by the model's linear layers (``model.LoraRows``).

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``, whose
tensors are named ``base_model.model.<module>.lora_A.weight`` [r, in] and ``...lora_B.weight``
[out, r]; the update is ``scale * B A`` with ``scale = lora_alpha / r`` (``/ sqrt(r)`` with
rsLoRA) times the profile's ``adapter_scale``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from coe.backends.base import Adapter
from coe.backends.torch.model import ModelArgs, linear_shapes
from coe.backends.torch.weights import tensors_in
from coe.errors import ConfigError
from coe.types import Profile

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
LoraWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], B [out, r])


def _fail(message: str) -> ConfigError:
    return ConfigError(f"adapter: {message}", param="adapter")


def _folder(profile: Profile) -> Path:
    assert profile.adapter is not None
    folder = Path(profile.adapter).expanduser()
    if not (folder / CONFIG_FILE).is_file():
        raise _fail(f"{folder} is not a PEFT adapter folder (no {CONFIG_FILE})")
    if not (folder / WEIGHTS_FILE).is_file():
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        raise _fail(
            f"{folder} has no {WEIGHTS_FILE}"
            + (
                f" (only {', '.join(pickled)}: pickle files are not loaded; save the adapter "
                f"with safe_serialization=True)"
                if pickled
                else ""
            )
        )
    return folder


def _scale(folder: Path, profile: Profile) -> float:
    """PEFT's scaling (lora_alpha / r, or / sqrt(r) with rsLoRA) times ``adapter_scale``."""
    file = folder / CONFIG_FILE
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise _fail(f"{file}: not readable JSON ({exc})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _fail(f"{file}: peft_type {cfg.get('peft_type')!r}; only LORA adapters apply")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out") if cfg.get(k)]
    if unsupported or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        names = unsupported or ["rank_pattern/alpha_pattern"]
        raise _fail(f"{file}: {', '.join(names)} is not supported")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, int | float):
        raise _fail(f"{file}: needs r (an integer > 0) and lora_alpha, got r={r!r}")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return scale * profile.adapter_scale


def _pairs(shapes: dict[str, tuple[int, ...]], file: Path) -> dict[str, tuple[str, str]]:
    """module -> (name of A, name of B) from the tensor names."""
    pairs: dict[str, dict[str, str]] = {}
    for name in shapes:
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if name.startswith(_PREFIX) and name.endswith(suffix):
                module = name[len(_PREFIX) : -len(suffix)]
                pairs.setdefault(module, {})[part] = name
                break
        else:
            raise _fail(f"{file}: tensor {name} is not a LoRA A/B weight of a linear layer")
    out = {}
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise _fail(f"{file}: {module} has {', '.join(pair)} but not both lora_A and lora_B")
        out[module] = (pair["lora_A"], pair["lora_B"])
    return out


def _header(file: Path) -> dict[str, tuple[int, ...]]:
    try:
        with file.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise _fail(f"{file}: not a readable safetensors file ({exc})") from None
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def check_adapter(args: ModelArgs, profile: Profile) -> int:
    """The adapter fits the base (every A/B pair shaped for a linear layer the base has):
    ConfigError naming the file and tensor; returns its parameter count."""
    folder = _folder(profile)
    _scale(folder, profile)
    file = folder / WEIGHTS_FILE
    shapes = _header(file)
    base = linear_shapes(args)
    for module, (a_name, b_name) in _pairs(shapes, file).items():
        target = base.get(module)
        a, b = shapes[a_name], shapes[b_name]
        fits = (
            target is not None
            and len(a) == 2
            and len(b) == 2
            and a[1] == target[1]
            and b[0] == target[0]
            and a[0] == b[1]
        )
        if not fits:
            raise _fail(
                f"{file}: {module} A {list(a)} / B {list(b)} does not fit the base "
                f"({'no such linear layer' if target is None else f'weight {list(target)}'})"
            )
    return sum(math.prod(shape) for shape in shapes.values())


def read_adapter(profile: Profile, dtype: torch.dtype) -> Adapter:
    """The adapter's A/B tensors in host memory (in the base's dtype)."""
    folder = _folder(profile)
    scale = _scale(folder, profile)
    file = folder / WEIGHTS_FILE
    buffer = torch.frombuffer(bytearray(file.read_bytes()), dtype=torch.uint8)
    tensors = tensors_in(buffer, file)
    weights: LoraWeights = {
        module: (tensors[a].to(dtype), tensors[b].to(dtype))
        for module, (a, b) in _pairs({k: tuple(t.shape) for k, t in tensors.items()}, file).items()
    }
    num_params = sum(a.numel() + b.numel() for a, b in weights.values())
    num_bytes = sum(a.nbytes + b.nbytes for a, b in weights.values())
    return Adapter(profile.name, folder, scale, num_params, num_bytes, weights)
