"""Where inputs come from: a local directory, or a Hugging Face Hub repo id downloaded to the local cache."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import AdapterError, CheckpointError, HubError, IA3ConvertError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*", "*.tiktoken"]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
                 "*/adapter_config.json", "*/adapter_model.safetensors", "*/adapter_model.bin"]


def _download(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise HubError(f"{repo_id}: no such repository on the Hub (or no access)",
                       hint="check the id, or log in with a token that can read it") from None
    except GatedRepoError:
        raise HubError(f"{repo_id}: gated repository", hint="accept its terms on the Hub and log in") from None
    except LocalEntryNotFoundError:
        raise HubError(f"{repo_id}: the Hub cannot be reached and the repo is not in the local cache",
                       hint="connect to the network, or give a local directory") from None
    except (HfHubHTTPError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubError(f"{repo_id}: download failed ({first})", hint="retry, or give a local directory") from None


def _resolve(spec: str | Path, patterns: list[str], missing: IA3ConvertError) -> Path:
    """The local path ``spec`` when it exists; a Hub snapshot when ``spec`` is a repo id; else ``missing``."""
    path = Path(spec)
    if path.exists():
        return path
    if not _REPO_ID.match(str(spec)):
        raise missing
    return _download(str(spec), patterns)


def resolve_base(spec: str | Path) -> Path:
    """A base model directory: the path itself, or a downloaded snapshot of a Hub repo id."""
    return _resolve(spec, MODEL_FILES, CheckpointError(f"{spec}: does not exist",
                                                       hint="give a model directory or a Hub repo id"))


def resolve_adapter(spec: str | Path) -> Path:
    """An adapter directory: the path itself, or a downloaded snapshot of a Hub repo id."""
    return _resolve(spec, ADAPTER_FILES, AdapterError(f"{spec}: no such file or directory",
                                                      hint="give an adapter directory or a Hub repo id"))
