"""Read and write IA3 adapter directories in PEFT's exact on-disk format.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``)
or the legacy ``adapter_model.bin`` (a torch pickle, loaded with ``weights_only=True`` so that it can never
run code). A non-default adapter lives in the sub-folder ``<dir>/<name>/``. Tensor keys are
``base_model.model.<module path>.ia3_l`` (the adapter name stripped), shaped ``(1, in)`` for an
input-scaled module and ``(out, 1)`` for an output-scaled one.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import IA3Config
from .errors import AdapterError, OutputError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
DEFAULT_ADAPTER = "default"
KEY_PREFIX = "base_model.model."
KEY_SUFFIX = ".ia3_l"


def check_adapter_name(name: str) -> str:
    """Refuse names that could not be a sub-folder of an adapter directory (separators, '..', empty)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise AdapterError(f"adapter name {name!r} is not usable",
                           hint="use a plain name without path separators, such as 'default' or 'task1'")
    return name


@dataclass
class Adapter:
    """One IA3 adapter: its config and one vector per module path, in PEFT's shapes.

    ``vectors`` maps a module path (``model.layers.0.mlp.down_proj``) to a ``(1, in)`` vector (input-scaled)
    or an ``(out, 1)`` vector (output-scaled). The shape, not the config, says which side is scaled: an
    adapter trained by PEFT carries the side PEFT chose.
    """

    config: IA3Config
    vectors: dict[str, torch.Tensor]
    name: str = DEFAULT_ADAPTER
    source: Path | None = field(default=None, compare=False)

    def is_feedforward(self, path: str) -> bool:
        """True when this module's input is scaled (vector shape ``(1, n)``)."""
        rows, cols = self.vectors[path].shape
        if rows == 1 and cols == 1:
            return self.config.is_feedforward(path)
        return rows == 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under PEFT's keys, contiguous, ready for safetensors."""
        return {f"{KEY_PREFIX}{path}{KEY_SUFFIX}": v.detach().contiguous() for path, v in sorted(self.vectors.items())}

    def save(self, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write this adapter into ``out_dir`` (created if missing) in PEFT's canonical format.

        Each file is written under a temporary name and renamed into place, so a reader never sees half a file.
        ``dtype`` casts the vectors (refusing values that would overflow to infinity).
        """
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        tensors = self.state_dict()
        if dtype is not None:
            tensors = {k: _cast(k, v, dtype) for k, v in tensors.items()}
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(out_dir / SAFETENSORS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
            _atomic_write(out_dir / CONFIG_NAME, lambda p: Path(p).write_text(self.config.to_json(), encoding="utf-8"))
        except OSError as exc:
            raise OutputError(f"{out_dir}: cannot write the adapter ({exc.strerror or exc})",
                              hint="choose a writable output directory") from None
        return out_dir


def _cast(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    cast = tensor.to(dtype)
    if torch.isfinite(tensor).all() and not torch.isfinite(cast).all():
        raise OutputError(f"{key}: values overflow {str(dtype).removeprefix('torch.')}",
                          hint="keep a wider dtype such as float32")
    return cast


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def list_adapters(path: str | Path) -> list[str]:
    """Names of the adapters in a directory: ``default`` for the root, then each named sub-folder."""
    path = Path(path)
    names = [DEFAULT_ADAPTER] if (path / CONFIG_NAME).is_file() else []
    if path.is_dir():
        names += sorted(p.name for p in path.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file())
    return names


def _adapter_dir(path: Path, adapter_name: str | None) -> tuple[Path, str]:
    if not path.exists():
        raise AdapterError(f"{path}: no such file or directory", hint="give the path of an adapter directory")
    if not path.is_dir():
        raise AdapterError(f"{path}: is a file, not an adapter directory",
                           hint=f"give the directory that holds {CONFIG_NAME}")
    available = list_adapters(path)
    if adapter_name is None:
        if not available:
            raise AdapterError(f"{path}: no {CONFIG_NAME} here or in a sub-folder",
                               hint="give the directory an IA3 adapter was saved to")
        if len(available) > 1 and DEFAULT_ADAPTER not in available:
            raise AdapterError(f"{path}: holds several adapters ({', '.join(available)})",
                               hint="choose one with --adapter-name")
        adapter_name = DEFAULT_ADAPTER if DEFAULT_ADAPTER in available else available[0]
    check_adapter_name(adapter_name)
    if adapter_name not in available:
        listing = ", ".join(available) if available else "none"
        raise AdapterError(f"{path}: no adapter named {adapter_name!r} (found: {listing})",
                           hint="pick one of the names found")
    return (path if adapter_name == DEFAULT_ADAPTER else path / adapter_name), adapter_name


def _read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    st_file, bin_file = folder / SAFETENSORS_NAME, folder / BIN_NAME
    if st_file.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(st_file), st_file
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterError(f"{st_file}: not a readable safetensors file ({exc})",
                               hint="the file is damaged; save or download the adapter again") from None
    if bin_file.is_file():
        try:
            data = torch.load(bin_file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
            raise AdapterError(
                f"{bin_file}: refused, the pickle holds objects that are not tensors ({first})",
                hint="only plain tensor files are loaded; ask for a safetensors adapter",
            ) from None
        except (OSError, RuntimeError, EOFError, ValueError) as exc:
            raise AdapterError(f"{bin_file}: not a readable torch file ({exc})",
                               hint="the file is damaged; save or download the adapter again") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in data.items()):
            raise AdapterError(f"{bin_file}: does not hold a mapping of names to tensors",
                               hint="this is not a PEFT adapter weight file")
        return data, bin_file
    raise AdapterError(f"{folder}: neither {SAFETENSORS_NAME} nor {BIN_NAME} found",
                       hint="the adapter weights are missing; copy them next to adapter_config.json")


def _module_path(key: str, adapter_name: str, where: Path) -> str:
    """``base_model.model.<path>.ia3_l`` (or ``.ia3_l.<name>`` from older writers) -> ``<path>``."""
    body = key.removeprefix(KEY_PREFIX)
    for suffix in (KEY_SUFFIX, f"{KEY_SUFFIX}.{adapter_name}", f"{KEY_SUFFIX}.weight"):
        if body.endswith(suffix) and len(body) > len(suffix):
            return body[: -len(suffix)]
    raise AdapterError(f"{where}: tensor {key!r} is not an IA3 vector",
                       hint="an IA3 adapter holds only 'base_model.model.<module>.ia3_l' tensors")


def read_adapter(path: str | Path, adapter_name: str | None = None) -> Adapter:
    """Load one adapter from a directory: the root one, or the sub-folder ``adapter_name``.

    Checks the structure (IA3 config, IA3 keys, 2-D floating vectors with one side of size 1) and raises
    ``AdapterError`` naming the file and key otherwise. Values are not judged here (see validation).
    """
    folder, name = _adapter_dir(Path(path), adapter_name)
    config = IA3Config.from_file(folder / CONFIG_NAME)
    if config.modules_to_save:
        raise AdapterError(f"{folder / CONFIG_NAME}: modules_to_save {config.modules_to_save} is not supported",
                           hint="ia3convert handles adapters made of IA3 vectors only")
    tensors, source = _read_tensors(folder)
    vectors: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        module = _module_path(key, name, source)
        if not tensor.is_floating_point():
            raise AdapterError(f"{source}: tensor {key!r} has dtype {tensor.dtype}, not a float",
                               hint="IA3 vectors are floating point; the file is not a valid adapter")
        if tensor.dim() != 2 or 1 not in tensor.shape:
            raise AdapterError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}",
                               hint="IA3 vectors are (1, in_features) or (out_features, 1)")
        if module in vectors:
            raise AdapterError(f"{source}: module {module!r} appears twice", hint="the file is not a valid adapter")
        vectors[module] = tensor
    if not vectors:
        raise AdapterError(f"{source}: holds no IA3 vectors", hint="the adapter weights are empty")
    return Adapter(config=config, vectors=vectors, name=name, source=folder)
