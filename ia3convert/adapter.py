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
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ALL_LINEAR, IA3Config
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
    dropped: list[str] = field(default_factory=list, compare=False)  # non-IA3 keys left out by a lenient read

    def is_feedforward(self, path: str) -> bool:
        """True when this module's input is scaled (vector shape ``(1, n)``)."""
        rows, cols = self.vectors[path].shape
        if rows == 1 and cols == 1:
            return self.config.is_feedforward(path)
        return rows == 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under PEFT's keys, each its own contiguous copy (safetensors refuses tensors sharing memory,
        and one vector object may well serve several modules)."""
        return {f"{KEY_PREFIX}{path}{KEY_SUFFIX}": v.detach().clone(memory_format=torch.contiguous_format)
                for path, v in sorted(self.vectors.items())}

    def save(self, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write this adapter into ``out_dir`` (created if missing) in PEFT's canonical format.

        Each file is written under a temporary name and renamed into place, so a reader never sees half a file.
        ``dtype`` casts the vectors (refusing values that would overflow to infinity).
        """
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        tensors = self.state_dict()
        if dtype is not None:
            tensors = {k: _cast(k, v, dtype) for k, v in tensors.items()}
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(out_dir / SAFETENSORS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
            _atomic_write(out_dir / CONFIG_NAME, lambda p: Path(p).write_text(self.config.to_json(), encoding="utf-8"))
        except (OSError, SafetensorError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise OutputError(f"{out_dir}: cannot write the adapter ({reason})",
                              hint="free some disk space or choose a writable output directory") from None
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
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # an ordinary file once in place, not mkstemp's private 0600
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
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's notes on pickle protocols are not the user's concern
                data = torch.load(bin_file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # torch's text advises weights_only=False (running the file's code); keep only what it refused.
            detail = str(exc).partition("WeightsUnpickler error:")[2].strip().splitlines()
            reason = f" ({detail[0].strip()})" if detail and detail[0].strip() else ""
            raise AdapterError(
                f"{bin_file}: refused, the pickle holds objects that are not tensors{reason}; it was not run",
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


def vector_problem(config: IA3Config, module: str, tensor: torch.Tensor) -> tuple[str, str] | None:
    """What is wrong with one stored IA3 vector, as ``(message, fix)``, or None when nothing is.

    Checks the dtype and the shape, and, where the config decides it without a model (explicit targets, not
    PEFT's per-architecture defaults or ``all-linear``), that the config selects the module (PEFT ignores a
    vector it does not target) and that the vector's shape scales the side the config says.
    """
    if not tensor.is_floating_point():
        return (f"has dtype {str(tensor.dtype).removeprefix('torch.')}, not a float",
                "IA3 vectors are floating point; the file is not a valid adapter")
    if tensor.dim() != 2 or 1 not in tensor.shape:
        return f"has shape {tuple(tensor.shape)}", "IA3 vectors are (1, in_features) or (out_features, 1)"
    if config.target_modules not in (None, ALL_LINEAR) and not config.is_target(module):
        return (f"is for module {module}, which target_modules does not select (PEFT would ignore it)",
                "add the module to target_modules in adapter_config.json, or remove the tensor")
    rows, cols = tensor.shape
    decided = config.feedforward_modules is not None and (rows, cols) != (1, 1)
    if decided and config.is_feedforward(module) != (rows == 1):
        sides = ("input", "output") if rows == 1 else ("output", "input")
        return (f"has shape {(rows, cols)}, which scales the {sides[0]} of {module}, but feedforward_modules "
                f"says it scales its {sides[1]}",
                "make feedforward_modules in adapter_config.json list exactly the input-scaled modules")
    return None


def read_adapter(path: str | Path, adapter_name: str | None = None, *, strict: bool = True) -> Adapter:
    """Load one adapter from a directory: the root one, or the sub-folder ``adapter_name``.

    Checks the structure (IA3 config, IA3 keys, 2-D floating vectors with one side of size 1, agreement of
    vectors and config) and raises ``AdapterError`` naming the file and key otherwise. With ``strict=False``
    tensors whose keys are not IA3 vectors are left out and listed in ``Adapter.dropped`` instead of refused.
    Values are not judged here (see ``validation``).
    """
    folder, name = _adapter_dir(Path(path), adapter_name)
    config = IA3Config.from_file(folder / CONFIG_NAME)
    if config.modules_to_save:
        raise AdapterError(f"{folder / CONFIG_NAME}: modules_to_save {config.modules_to_save} is not supported",
                           hint="ia3convert handles adapters made of IA3 vectors only")
    tensors, source = _read_tensors(folder)
    vectors: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, tensor in sorted(tensors.items()):
        try:
            module = _module_path(key, name, source)
        except AdapterError:
            if strict:
                raise
            dropped.append(key)
            continue
        problem = vector_problem(config, module, tensor)
        if problem is not None:
            raise AdapterError(f"{source}: tensor {key!r} {problem[0]}", hint=problem[1])
        if module in vectors:
            raise AdapterError(f"{source}: module {module!r} appears twice", hint="the file is not a valid adapter")
        vectors[module] = tensor
    if not vectors:
        raise AdapterError(f"{source}: holds no IA3 vectors", hint="the adapter weights are empty")
    return Adapter(config=config, vectors=vectors, name=name, source=folder, dropped=dropped)
