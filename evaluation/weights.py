"""Encoders from any checkpoint we meet, and export to timm-loadable safetensors.

Accepted: our training checkpoints (`last.pt`, `checkpoint-*.pt`), an exported encoder
(`.safetensors`), and the checkpoints released with the paper (a `state_dict`, possibly under
"state_dict"/"model", whose keys start with `module.momentum_encoder.`, `momentum_encoder.` or
`base_encoder.`). The momentum encoder is used whenever present (docs/method.md §7). The architecture
is read from the tensor shapes, so no config is needed.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from atomic_write import write_atomic
from model.vit import ARCHS, ViT, create_vit

# Prefixes of the key encoder, most preferred first (ours, then the published releases').
ENCODER_PREFIXES = ("momentum.", "module.momentum_encoder.", "momentum_encoder.", "base.", "module.base_encoder.",
                    "base_encoder.")


@dataclass(frozen=True)
class EncoderSpec:
    """What the tensors say about the encoder."""

    arch: str
    img_size: int
    patch_size: int

    def timm_args(self) -> tuple[str, dict]:
        """`timm.create_model(name, **kwargs)` arguments of a timm ViT that loads this encoder strictly."""
        shape = ARCHS[self.arch]
        name = f"{self.arch}_patch16_224" if self.arch in ("vit_tiny", "vit_small", "vit_base") else "vit_tiny_patch16_224"
        return name, {"img_size": self.img_size, "patch_size": self.patch_size, "embed_dim": shape["embed_dim"],
                      "depth": shape["depth"], "num_heads": shape["num_heads"], "num_classes": 0}


class WeightsError(ValueError):
    """`--weights` (or `--out`) names something we cannot use; the message says what to pass instead."""


ACCEPTED = "our last.pt / checkpoint-*.pt, a released .pth(.tar) or an encoder exported to .safetensors"


def _raw_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The file's tensors and extra entries. Read with safetensors or `torch.load(weights_only=True)`
    only: a pickle is never run, whatever the file holds."""
    if not path.is_file():
        raise WeightsError(f"{path} {'is a directory' if path.is_dir() else 'does not exist'}: pass {ACCEPTED}")
    if path.suffix == ".safetensors":
        try:
            return load_file(path), {}
        except SafetensorError as error:
            raise WeightsError(f"{path} is not a valid safetensors file ({error}): pass {ACCEPTED}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:  # an I/O failure, not a wrong file: eval.py reports it as it is
        raise
    except Exception as error:  # torch raises UnpicklingError, KeyError, RuntimeError... for a non-checkpoint
        reason = ("it holds objects other than tensors and plain containers, which are never unpickled here"
                  if "Unsupported global" in str(error) else "not a torch checkpoint of tensors")
        raise WeightsError(f"{path} cannot be read as weights ({reason}): pass {ACCEPTED}") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict: pass {ACCEPTED}")
    for key in ("model", "state_dict"):
        if key in state and isinstance(state[key], dict):
            return state[key], state
    return state, {}


def encoder_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key encoder's backbone tensors (projector `head.*` dropped), prefixes stripped."""
    for prefix in ENCODER_PREFIXES:
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if found:
            return {k: v for k, v in found.items() if not k.startswith("head.")}
    if "cls_token" in state:  # an exported encoder: already bare
        return {k: v for k, v in state.items() if not k.startswith("head.")}
    raise WeightsError("no ViT encoder found: expected keys starting with one of "
                       f"{', '.join(ENCODER_PREFIXES)} or a bare encoder (cls_token, blocks.*)")


def infer_spec(encoder: dict[str, torch.Tensor]) -> EncoderSpec:
    """Architecture, input size and patch size from the tensor shapes."""
    dim = encoder["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in encoder if k.startswith("blocks.")})
    arch = next((a for a, c in ARCHS.items() if c["embed_dim"] == dim and c["depth"] == depth), None)
    if arch is None:
        raise WeightsError(f"no known architecture has embed dim {dim} and depth {depth} (known: {sorted(ARCHS)})")
    patch_size = encoder["patch_embed.proj.weight"].shape[-1]
    grid = int(round((encoder["pos_embed"].shape[1] - 1) ** 0.5))
    return EncoderSpec(arch, grid * patch_size, patch_size)


def load_encoder(path: str | Path, random_init: bool = False) -> tuple[ViT, EncoderSpec, dict]:
    """The encoder stored at `path` (strictly loaded) with its spec, and the checkpoint's extra
    entries (e.g. our `config`). `random_init` returns a freshly initialised encoder of the same shape."""
    raw, extra = _raw_state_dict(Path(path))
    tensors = encoder_state_dict(raw)
    spec = infer_spec(tensors)
    encoder = create_vit(spec.arch, spec.img_size, spec.patch_size)
    if not random_init:
        encoder.load_state_dict(tensors, strict=True)
    return encoder, spec, extra


def export_encoder(path: str | Path, out: str | Path) -> EncoderSpec:
    """Write the key encoder's backbone as safetensors (timm parameter names), atomically, with the
    permissions of any new file (0666 minus the umask)."""
    out = Path(out)
    if out.is_dir():
        raise WeightsError(f"--out {out} is a directory: pass a file name, e.g. {out / 'encoder.safetensors'}")
    if not out.parent.is_dir():
        raise WeightsError(f"--out {out}: the folder {out.parent} does not exist; create it first")
    raw, _ = _raw_state_dict(Path(path))
    tensors = {k: v.contiguous() for k, v in encoder_state_dict(raw).items()}
    spec = infer_spec(tensors)
    data = save(tensors, metadata={"arch": spec.arch, "img_size": str(spec.img_size),
                                   "patch_size": str(spec.patch_size)})
    write_atomic(out, data)
    return spec
