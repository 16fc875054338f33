"""Safe checkpoint reading and strict loading with a readable mismatch report.

Nothing here executes pickled code: safetensors; `torch.load(weights_only=True)` for .pth/.pt/.bin;
a restricted unpickler (numpy arrays and plain containers only) for detectron2 .pkl files.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

# Where official checkpoints keep the weights, tried in order.
CONTAINER_KEYS = ("model", "model_ema", "state_dict", "module")
# Classes that official checkpoints pickle beside the weights and that hold plain data only
# (VMamba's classification .pth stores its yacs config; mmengine runs store history buffers).
# They are rebuilt as OrderedDicts by torch's weights-only unpickler: no code of theirs runs.
PLAIN_DATA_CLASSES = (
    "yacs.config.CfgNode",
    "argparse.Namespace",
    "mmengine.logging.history_buffer.HistoryBuffer",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain containers; refuses every other global."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
        ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 rebuild bytes with it
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: only numpy arrays and plain data"
        )


def safe_unpickle(path: str | Path):
    """Loads a pickle of plain data and numpy arrays (detectron2 .pkl, refer .p); refuses code."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}: {e}") from e
        except (EOFError, ValueError) as e:
            raise CheckpointError(f"{path}: truncated or corrupt pickle ({e})") from e


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a checkpoint file into a flat {key: tensor} dict, without executing code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e
    if suffix == ".pkl":
        obj = safe_unpickle(path)
    else:
        if (
            suffix in (".pth", ".pt", ".bin")
            and zipfile.is_zipfile(path) is False
            and path.stat().st_size < 64
        ):
            raise CheckpointError(f"{path}: truncated file ({path.stat().st_size} bytes)")
        try:
            with torch.serialization.safe_globals(
                [(collections.OrderedDict, name) for name in PLAIN_DATA_CLASSES]
            ):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path}: refused: the file holds objects other than tensors and plain data "
                f"(loading it would execute code). Details: {str(e).splitlines()[0]}"
            ) from e
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({e})") from e
    return _to_tensors(unwrap(obj, path), path)


def unwrap(obj, path: str | Path = "<checkpoint>") -> Mapping:
    """Finds the state dict inside a checkpoint ({'model': ...}, {'state_dict': ...}, or itself)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of weights, got {type(obj).__name__}")
    for k in CONTAINER_KEYS:
        if k in obj and isinstance(obj[k], Mapping):
            return obj[k]
    return obj


def _to_tensors(sd: Mapping, path) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            out[k] = v
        elif isinstance(v, np.ndarray):
            out[k] = torch.from_numpy(np.ascontiguousarray(v))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = torch.tensor(v)
        # other entries (strings, nested meta) are not weights
    if not out:
        raise CheckpointError(f"{path}: no tensors found")
    return out


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keeps the keys under `prefix` (e.g. 'backbone.' of mmdet/mmseg), without it."""
    if not prefix:
        return dict(sd)
    out = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        some = ", ".join(list(sd)[:5])
        raise CheckpointError(f"no keys start with {prefix!r} (first keys: {some})")
    return out


def mismatch_report(model_sd: Mapping, ckpt_sd: Mapping, limit: int = 20) -> str:
    """Empty string if keys and shapes agree; else a report of missing/unexpected/mis-shaped keys."""
    missing = [k for k in model_sd if k not in ckpt_sd]
    unexpected = [k for k in ckpt_sd if k not in model_sd]
    shaped = [
        f"{k}: checkpoint {tuple(ckpt_sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
        for k in model_sd
        if k in ckpt_sd and tuple(ckpt_sd[k].shape) != tuple(model_sd[k].shape)
    ]
    if not (missing or unexpected or shaped):
        return ""
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            lines.append(f"{len(items)} {title} keys{more}:\n    " + "\n    ".join(items[:limit]))
    return "\n  ".join(lines)


def load_into(
    module: nn.Module, sd: Mapping[str, torch.Tensor], what: str = "checkpoint", config=None
) -> None:
    """Strict load with a full report on mismatch (config: what the model expected)."""
    report = mismatch_report(module.state_dict(), sd)
    if report:
        cfg = f"\n  model config: {config}" if config is not None else ""
        raise CheckpointError(f"{what} does not fit {type(module).__name__}:\n  {report}{cfg}")
    module.load_state_dict(sd, strict=True)


def load_checkpoint(enc, path: str | Path, prefix: str | None = None) -> None:
    """Loads an official-layout checkpoint into `enc.model` strictly.

    Families may define `enc.checkpoint_filter(sd) -> sd` (e.g. strip 'backbone.' / 'backbone.net.',
    rename official keys) and `enc.model_config` (shown in mismatch errors).
    """
    sd = read_state_dict(path)
    if prefix:
        sd = strip_prefix(sd, prefix)
    filt = getattr(enc, "checkpoint_filter", None)
    if filt is not None:
        sd = filt(sd)
    load_into(enc.model, sd, what=str(path), config=getattr(enc, "model_config", None))


def save_safetensors(sd: Mapping[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Atomic safetensors write (temp file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
