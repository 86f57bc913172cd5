"""Publish an IA3 adapter directory or a merged model directory to the Hugging Face Hub, with a model card.

``push`` finds out what the folder holds (a PEFT IA3 adapter, validated first, or a model with config.json and
weights, e.g. the output of ``merge``), collects the files worth uploading (never ``.git``, caches, hidden or
temporary files), writes a model card (README.md with the YAML metadata the Hub reads: ``library_name``,
``base_model``, tags; an existing README keeps its text and gets only the missing metadata), then creates
the repo and the branch if missing and uploads everything in one commit (or one pull request).

Every Hub failure becomes a one-line ``HubError``; the token never appears in messages. Nothing is ever written
to the local folder: the card travels as bytes.
"""

from __future__ import annotations

import fnmatch
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .adapter import CONFIG_NAME, list_adapters, read_adapter
from .errors import AdapterError, CheckpointError, HubError

CARD_NAME = "README.md"
REPORT_NAME = "merge_report.json"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
# Never uploaded: build and editor leftovers, partial downloads, lock files. Hidden files and folders (.git,
# .cache, .DS_Store, the ``.<name>.tmp`` files of an interrupted save) and __pycache__ are skipped as well.
IGNORED_PATTERNS = ("*.tmp", "*.temp", "*.part", "*.partial", "*.incomplete", "*.lock", "*.pyc", "*~", "*.swp")
RETRY_WAITS = (1.0, 2.0)  # seconds between the attempts of an idempotent request that failed transiently

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_T = TypeVar("_T")


@dataclass
class PushResult:
    """What ``push`` did (or, with ``dry_run``, would do).

    ``files`` are the paths committed (README.md included); ``card`` is the README.md content; ``commit_url``
    and ``pr_url`` are None for a dry run (``pr_url`` also without ``create_pr``); ``notes`` are remarks for
    the user (e.g. no Hub id known for the base model).
    """

    repo_id: str
    kind: str
    files: list[str]
    card: str
    revision: str | None = None
    commit_url: str | None = None
    pr_url: str | None = None
    dry_run: bool = False
    sizes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def url(self) -> str | None:
        """The pull request URL when one was opened, else the commit URL."""
        return self.pr_url or self.commit_url


def push(path: str | Path, repo_id: str, *, private: bool | None = None, revision: str | None = None,
         create_pr: bool = False, commit_message: str | None = None, token: str | None = None,
         base_model_id: str | None = None, dry_run: bool = False, include: Sequence[str] | None = None,
         exclude: Sequence[str] | None = None, overwrite_card: bool = False,
         endpoint: str | None = None) -> PushResult:
    """Upload an IA3 adapter directory or a merged model directory to the Hub repo ``repo_id`` in one commit.

    ``path`` is an adapter directory (``adapter_config.json`` at the root or in sub-folders; every adapter
    uploaded is checked by ``validate``, one with errors is refused) or a model directory (``config.json`` and
    weights, with the ``merge_report.json`` that ``merge`` writes summarised in the card). ``repo_id`` is
    ``namespace/name`` or a bare name (the token's user namespace). The repo is created if missing
    (``private`` sets its visibility; an existing repo whose visibility differs is refused rather than
    changed), the branch ``revision`` is created from main if missing, and ``create_pr`` opens a pull request
    instead of committing to the branch.

    ``include``/``exclude`` are glob patterns on the paths inside ``path``. ``base_model_id`` is the Hub id put
    in the card's ``base_model`` (default: the adapter config's or merge report's base when it is a Hub id).
    An existing README.md keeps its text and its metadata (only missing keys and tags are added; an explicit
    ``base_model_id`` replaces ``base_model``) unless ``overwrite_card``. ``token`` defaults to
    huggingface_hub's resolution (HF_TOKEN, then the saved login); ``endpoint`` to HF_ENDPOINT or the Hub.
    ``dry_run`` builds the file list and the card and contacts nothing.

    Raises ``AdapterError``/``CheckpointError`` for a folder that cannot be pushed and ``HubError`` (one line,
    never containing the token) for anything the Hub refuses or cannot answer. The local folder is only read.
    """
    folder = Path(path)
    if not _REPO_ID.match(repo_id or ""):
        raise HubError(f"{repo_id!r}: not a valid Hub repo id",
                       hint="use NAME or NAMESPACE/NAME with letters, digits, '-', '_' or '.'")
    kind = detect_kind(folder)
    files = collect_files(folder, include=include, exclude=exclude)
    adapters = _check_contents(folder, kind, files)
    notes: list[str] = []
    _validate_adapters(folder, adapters, notes)
    card = model_card(folder, kind, repo_id, adapters=adapters, base_model_id=base_model_id,
                      overwrite_card=overwrite_card, notes=notes)
    uploads = sorted({*files, CARD_NAME})
    sizes = {f: (folder / f).stat().st_size for f in files}
    sizes[CARD_NAME] = len(card.encode("utf-8"))
    result = PushResult(repo_id=repo_id, kind=kind, files=uploads, card=card, revision=revision, dry_run=dry_run,
                        sizes=sizes, notes=notes)
    if dry_run:
        return result
    what = "IA3 adapter" if kind == "adapter" else "model with a merged IA3 adapter"
    return _upload(folder, result, private=private, create_pr=create_pr, token=token,
                   commit_message=commit_message or f"Upload {what} with ia3convert", endpoint=endpoint)


# -- what is in the folder ---------------------------------------------------------------------------------
def detect_kind(folder: Path) -> str:
    """``"adapter"`` for an IA3 adapter directory, ``"model"`` for a model directory (config.json); raises for
    anything else (missing, a file, empty, neither)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: {'is a file' if folder.exists() else 'does not exist'}",
                              hint="give the directory of an adapter or of a merged model")
    if list_adapters(folder):
        return "adapter"
    if (folder / "config.json").is_file():
        return "model"
    if not any(folder.iterdir()):
        raise CheckpointError(f"{folder}: is empty, nothing to push",
                              hint="give the directory an adapter or a merged model was saved to")
    raise CheckpointError(f"{folder}: neither an IA3 adapter ({CONFIG_NAME}) nor a model (config.json + weights)",
                          hint="give the directory an adapter or a merged model was saved to")


def _validate_adapters(folder: Path, names: Sequence[str], notes: list[str]) -> None:
    """Refuse an adapter that ``validate`` finds unusable; count its warnings in ``notes``."""
    from .validation import validate

    for name in names:
        report = validate(folder, adapter_name=name)
        if not report.ok:
            first = report.errors[0]
            raise AdapterError(f"{folder}: adapter {name!r} is not usable, {len(report.errors)} error(s), first: "
                               f"{first.where}: {first.message}", hint=f"`ia3convert validate {folder}` lists all")
        if report.warnings:
            notes.append(f"adapter {name!r}: {len(report.warnings)} validation warning(s); "
                         f"`ia3convert validate {folder}` lists them")


def _ignored(rel: str) -> bool:
    parts = rel.split("/")
    return (any(p.startswith(".") or p == "__pycache__" for p in parts)
            or any(fnmatch.fnmatchcase(parts[-1], pattern) for pattern in IGNORED_PATTERNS))


def _as_list(patterns: Sequence[str] | str | None) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns or [])


def collect_files(folder: Path, *, include: Sequence[str] | str | None = None,
                  exclude: Sequence[str] | str | None = None) -> list[str]:
    """Relative POSIX paths of the files to upload: everything but hidden, temporary and cache files, kept by
    ``include`` (if given) and not matched by ``exclude``. README.md is left out: the card replaces it."""
    include, exclude = _as_list(include), _as_list(exclude)
    found = []
    for file in sorted(folder.rglob("*")):
        rel = file.relative_to(folder).as_posix()
        if not file.is_file() or _ignored(rel) or rel == CARD_NAME:
            continue
        if include and not any(fnmatch.fnmatchcase(rel, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(rel, p) for p in exclude):
            continue
        found.append(rel)
    return found


def _check_contents(folder: Path, kind: str, files: list[str]) -> list[str]:
    """Refuse uploads that would leave out what makes the folder usable (weights, configs, shards). Returns the
    names of the adapters uploaded (an adapter may be left out whole, not in part); empty for a model."""
    chosen = set(files)
    if kind == "adapter":
        names = []
        for name in list_adapters(folder):
            prefix = "" if name == "default" else f"{name}/"
            parts = [f"{prefix}{CONFIG_NAME}" in chosen,
                     any(f"{prefix}{w}" in chosen for w in ("adapter_model.safetensors", "adapter_model.bin"))]
            if any(parts) and not all(parts):
                raise AdapterError(f"{folder / prefix}: the files chosen for upload leave out adapter {name!r}'s "
                                   f"{'weights' if parts[0] else CONFIG_NAME}", hint="loosen --include/--exclude")
            if all(parts):
                names.append(name)
        if not names:
            raise AdapterError(f"{folder}: the files chosen for upload hold no complete adapter",
                               hint="loosen --include/--exclude")
        return names
    weights = [f for f in files if "/" not in f and any(fnmatch.fnmatchcase(f, p) for p in WEIGHT_PATTERNS)]
    if not weights:
        raise CheckpointError(f"{folder}: has config.json but no weights to upload (*.safetensors or *.bin)",
                              hint="push the directory a model was saved to, or loosen --include/--exclude")
    if "config.json" not in chosen:
        raise CheckpointError(f"{folder}: config.json is excluded", hint="loosen --include/--exclude")
    for index in [f for f in files if f.endswith(".index.json")]:
        try:
            shards = set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"{folder / index}: not a readable shard index ({exc})",
                                  hint="save the model again") from None
        missing = sorted(shards - chosen)
        if missing:
            raise CheckpointError(f"{folder / index}: shard {missing[0]} is missing or excluded "
                                  f"({len(missing)} missing)", hint="push the complete model directory")
    return []


# -- the model card ----------------------------------------------------------------------------------------
def _hub_id(value: Any) -> str | None:
    """``value`` when it can be a Hub model id (``name`` or ``namespace/name``, not an existing local path)."""
    if not isinstance(value, str) or not _REPO_ID.match(value) or Path(value).exists():
        return None
    return value


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not readable JSON ({exc})", hint="save the model again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: does not hold a JSON object", hint="save the model again")
    return data


def model_card(folder: Path, kind: str, repo_id: str, *, adapters: Sequence[str] | None = None,
               base_model_id: str | None = None, overwrite_card: bool = False, notes: list[str] | None = None) -> str:
    """The README.md to upload: generated metadata and text, or the folder's own README with missing metadata
    added (see ``push``). ``kind`` is ``"adapter"`` or ``"model"``; ``adapters`` names the adapters of an
    adapter directory that are uploaded (default: all). ``notes`` receives remarks for the user."""
    import yaml  # huggingface_hub's own YAML library, which parses the card
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    notes = notes if notes is not None else []
    if kind == "adapter":
        declared, metadata, body = _adapter_card(folder, repo_id, base_model_id, adapters or list_adapters(folder))
    else:
        declared, metadata, body = _model_card(folder, repo_id, base_model_id)
    if metadata.get("base_model") is None:
        notes.append(f"no Hub id known for the base model (the folder names {declared!r}); "
                     "pass --base-model-id so that the Hub links the card to it")
    existing = folder / CARD_NAME
    error = AdapterError if kind == "adapter" else CheckpointError
    if overwrite_card or not existing.is_file():
        data = ModelCardData(**{k: v for k, v in metadata.items() if v is not None})
        return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
    try:
        text = existing.read_text(encoding="utf-8")
        card = ModelCard(text if REGEX_YAML_BLOCK.search(text) else f"---\n\n---\n{text}")
    except (OSError, ValueError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"{existing}: the metadata block cannot be read ({first})",
                    hint="fix the YAML between the '---' lines, or pass --overwrite-card") from None
    _complete_metadata(card.data, metadata, replace_base=base_model_id is not None)
    return str(card)


def _complete_metadata(data: Any, metadata: dict[str, Any], *, replace_base: bool) -> None:
    """Add the generated metadata a user's card lacks: missing keys, missing tags; ``base_model`` replaced
    (with its ``base_model:`` tags) only when the caller named one explicitly."""
    old_base = getattr(data, "base_model", None)
    if replace_base and metadata.get("base_model") and old_base != metadata["base_model"]:
        data.base_model = metadata["base_model"]
        if old_base is not None and data.tags:
            data.tags = [t for t in data.tags if not (t.startswith("base_model:") and t.endswith(f":{old_base}"))]
    for key, value in metadata.items():
        if value is None:
            continue
        if key == "tags":
            current = list(getattr(data, "tags", None) or [])
            data.tags = current + [t for t in value if t not in current]
        elif getattr(data, key, None) is None:
            setattr(data, key, value)


def _adapter_card(folder: Path, repo_id: str, base_model_id: str | None,
                  names: Sequence[str]) -> tuple[Any, dict[str, Any], str]:
    adapters = {name: read_adapter(folder, name) for name in names}
    first = adapters.get("default") or next(iter(adapters.values()))
    declared = first.config.base_model_name_or_path
    base = base_model_id or _hub_id(declared)
    tags = ["ia3", "peft", *([f"base_model:adapter:{base}"] if base else [])]
    metadata = {"library_name": "peft", "base_model": base, "base_model_relation": "adapter" if base else None,
                "tags": tags}
    model_class = (first.config.auto_mapping or {}).get("base_model_class") or "AutoModelForCausalLM"
    base_ref = base or "<base model id>"
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"An (IA)^3 adapter for [{base}](https://huggingface.co/{base}), in PEFT's format." if base else
             "An (IA)^3 adapter, in PEFT's format.", "",
             "| adapter | folder | modules | input-scaled | output-scaled |", "| --- | --- | --- | --- | --- |"]
    for name, adapter in adapters.items():
        inputs = sum(1 for p in adapter.vectors if adapter.is_feedforward(p))
        lines.append(f"| {name} | {'/' if name == 'default' else name + '/'} | {len(adapter.vectors)} | {inputs} "
                     f"| {len(adapter.vectors) - inputs} |")
    lines += ["", "## Usage", "", "With PEFT:", "", "```python", "from peft import PeftModel",
              f"from transformers import {model_class}", "",
              f'base = {model_class}.from_pretrained("{base_ref}")',
              f'model = PeftModel.from_pretrained(base, "{repo_id}")']
    for name in adapters:
        if name != "default":
            lines.append(f'model.load_adapter("{repo_id}", adapter_name="{name}", subfolder="{name}")')
    lines += ["```", "", "Merged into the base's weights (also when the base is 8-bit or 4-bit bitsandbytes) with "
              "ia3convert:", "", "```bash",
              f"ia3convert merge {base_ref} {repo_id} merged-model", "```", ""]
    return declared, metadata, "\n".join(lines)


def _storage(config: dict[str, Any]) -> tuple[str, list[str]]:
    """A readable storage name and the tags for a model config's quantization."""
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") == "bitsandbytes" and quant.get("load_in_4bit"):
        kind = quant.get("bnb_4bit_quant_type") or "fp4"
        nested = " with double quantization" if quant.get("bnb_4bit_use_double_quant") else ""
        return f"4-bit {kind.upper()}{nested} (bitsandbytes)", ["bitsandbytes", "4-bit", kind]
    if quant.get("quant_method") == "bitsandbytes" and quant.get("load_in_8bit"):
        return "8-bit LLM.int8 (bitsandbytes)", ["bitsandbytes", "8-bit", "int8"]
    return str(config.get("dtype") or config.get("torch_dtype") or "float"), []


def _model_card(folder: Path, repo_id: str, base_model_id: str | None) -> tuple[Any, dict[str, Any], str]:
    config = _read_json(folder / "config.json")
    report = _read_json(folder / REPORT_NAME) if (folder / REPORT_NAME).is_file() else None
    declared = report.get("base") if report else config.get("_name_or_path")
    base = base_model_id or _hub_id(declared)
    storage, quant_tags = _storage(config)
    metadata = {"library_name": "transformers", "base_model": base,
                "tags": ["ia3", "merged", *quant_tags]}
    model_class = (config.get("architectures") or ["AutoModel"])[0]
    tokenizer = any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    origin = f"[{base}](https://huggingface.co/{base})" if base else "A base model"
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"{origin} with an (IA)^3 adapter merged into its weights by ia3convert, stored as {storage}. "
             "It loads as a plain transformers model: no PEFT needed.", "",
             "## Usage", "", "```python", f"from transformers import {model_class}"
             + (", AutoTokenizer" if tokenizer else ""), "",
             f'model = {model_class}.from_pretrained("{repo_id}")']
    if tokenizer:
        lines.append(f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")')
    lines += ["```", ""]
    if quant_tags:
        lines += ["Loading needs `bitsandbytes` installed (the quantization settings are in config.json).", ""]
    lines += _report_section(report)
    return declared, metadata, "\n".join(lines)


def _source(value: Any) -> str:
    """A merge input for the card: its Hub id, or only the name of a local folder (no machine paths)."""
    hub_id = _hub_id(value)
    return f"`{hub_id}`" if hub_id else f"a local folder `{Path(str(value)).name}`"


def _report_section(report: dict[str, Any] | None) -> list[str]:
    """The merge-accuracy summary of merge_report.json, as markdown lines."""
    if report is None:
        return ["## Merge accuracy", "", "No merge_report.json was found next to the weights.", ""]
    lines = ["## Merge accuracy", "",
             f"Merged adapter `{report.get('adapter_name', 'default')}` of {_source(report.get('adapter'))} into "
             f"{_source(report.get('base'))}."]
    if not report.get("checked", True):
        lines += ["", "The merge was **not checked** (`--no-check`): no errors were measured.", ""]
    else:
        sample = (report.get("options") or {}).get("check_sample")
        rows = f" over {sample} sampled output rows per module (all rows of smaller modules)" if sample else ""
        lines += ["Every merged module was checked against the IA3-wrapped original layer (PEFT's forward) on "
                  f"seeded probe inputs{rows}; the relative error is that of the layer's output.", ""]
    modules = report.get("modules") or []
    lines += ["| transform | modules | max relative error | limit |", "| --- | --- | --- | --- |"]
    for transform, entry in sorted((report.get("summary") or {}).items()):
        limits = [m.get("limit") for m in modules if m.get("transform") == transform and m.get("limit") is not None]
        worst = entry.get("max_rel_error")
        lines.append(f"| {transform} | {entry.get('modules')} | {'-' if worst is None else f'{worst:.2e}'} "
                     f"| {f'{max(limits):.0e}' if limits else '-'} |")
    passed = report.get("passed")
    lines += ["", f"{len(modules)} modules merged; check {'passed' if passed else 'not passed'}. "
              "The per-module details are in `merge_report.json`.", ""]
    return lines


# -- talking to the Hub --------------------------------------------------------------------------------------
def _upload(folder: Path, result: PushResult, *, private: bool | None, create_pr: bool, token: str | None,
            commit_message: str, endpoint: str | None) -> PushResult:
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import RepositoryNotFoundError

    from . import __version__

    secret = token or get_token()
    if not secret:
        raise HubError(f"{result.repo_id}: no Hugging Face token found, pushing needs one",
                       hint="log in with `hf auth login`, set HF_TOKEN, or pass --token")
    api = HfApi(endpoint=endpoint, token=secret, library_name="ia3convert", library_version=__version__)
    where = api.endpoint

    def call(step: str, fn: Callable[[], _T], retry: bool = True) -> _T:
        return _call(step, fn, retry=retry, repo_id=result.repo_id, endpoint=where, secret=secret)

    user = call("checking the token", lambda: api.whoami())["name"]
    if "/" not in result.repo_id:
        result.repo_id = f"{user}/{result.repo_id}"
    repo_id = result.repo_id

    def existing_info():
        try:
            return api.repo_info(repo_id)
        except RepositoryNotFoundError:
            return None

    info = call("looking up the repo", existing_info)
    if info is None:
        call("creating the repo", lambda: api.create_repo(repo_id, private=private, exist_ok=True))
    elif private is not None and info.private is not None and info.private != private:
        raise HubError(f"{repo_id}: the repo exists and is {'private' if info.private else 'public'}, "
                       f"but {'--private' if private else '--public'} was asked",
                       hint="change its visibility on the Hub, or push without --private/--public")
    if result.revision and result.revision != "main":
        branch = result.revision
        call(f"creating branch {branch!r}", lambda: api.create_branch(repo_id, branch=branch, exist_ok=True))
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f))
                  for f in result.files if f != CARD_NAME]
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=result.card.encode("utf-8")))
    info = call("uploading the files and committing",
                lambda: api.create_commit(repo_id, operations, commit_message=commit_message,
                                          revision=result.revision, create_pr=create_pr), retry=False)
    result.commit_url = info.commit_url
    result.pr_url = info.pr_url
    return result


def _network_errors() -> tuple[type[BaseException], ...]:
    try:
        import httpx2 as httpx  # the HTTP client of huggingface_hub >= 2
    except ImportError:  # pragma: no cover - huggingface_hub 1.x uses httpx
        import httpx
    return (httpx.TransportError,)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from (huggingface_hub wraps HTTP errors in others)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _find(exc: BaseException, kinds: type[BaseException] | tuple[type[BaseException], ...]) -> Any:
    return next((e for e in _chain(exc) if isinstance(e, kinds)), None)


def _transient(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    http = _find(exc, HfHubHTTPError)
    if http is not None and http.response is not None:
        return http.response.status_code >= 500 or http.response.status_code == 408
    return _find(exc, _network_errors()) is not None


def _call(step: str, fn: Callable[[], _T], *, retry: bool, repo_id: str, endpoint: str, secret: str) -> _T:
    """Run one Hub request; retry transient failures of idempotent ones; turn failures into a HubError."""
    attempt = 1
    while True:
        try:
            return fn()
        except (OSError, ValueError, RuntimeError) as exc:  # HfHubHTTPError is an OSError
            failure: BaseException = exc
        except _network_errors() as exc:
            failure = exc
        if retry and attempt <= len(RETRY_WAITS) and _transient(failure):
            time.sleep(RETRY_WAITS[attempt - 1])
            attempt += 1
            continue
        raise _hub_error(failure, step, repo_id, endpoint, attempt, secret) from None


def _first_line(text: Any) -> str:
    text = str(text or "").strip()
    return text.splitlines()[0].strip() if text else ""


def _hub_error(exc: BaseException, step: str, repo_id: str, endpoint: str, attempts: int, secret: str) -> HubError:
    """One line for a failed Hub request: what went wrong, where, what to do. ``secret`` is scrubbed."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    http = _find(exc, HfHubHTTPError)
    network = _find(exc, _network_errors())
    status = http.response.status_code if http is not None and http.response is not None else None
    server = _first_line(getattr(http, "server_message", None)) if http is not None else ""
    if http is not None and not server and exc is not http:  # e.g. "Invalid metadata in README.md."
        server = _first_line(exc)
    detail = f": {server}" if server else ""
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    if isinstance(http, RevisionNotFoundError):
        message, hint = f"{repo_id}: revision not found while {step}{detail}", "check --revision"
    elif isinstance(http, RepositoryNotFoundError) or status == 404:
        message = f"{repo_id}: repository not found on {endpoint} while {step}"
        hint = "check the repo id, and that the token can see and write to it"
    elif status == 401:
        message = f"{endpoint}: the token was rejected (401 Unauthorized) while {step}"
        hint = "log in again with `hf auth login`, set HF_TOKEN, or pass a valid --token"
    elif status == 403:
        message = f"{repo_id}: no permission (403 Forbidden) while {step}{detail}"
        hint = "use a token with write access to this namespace, or push to a repo of your own"
    elif status == 429:
        wait = http.response.headers.get("Retry-After")
        message = f"{endpoint}: rate limited (429 Too Many Requests) while {step}"
        hint = f"wait {wait} s and push again" if wait and wait.isdigit() else "wait a few minutes and push again"
    elif status is not None and status >= 500:
        message = f"{endpoint}: server error {status} while {step}{tries}{detail}"
        hint = "the Hub is having trouble; push again later"
    elif status is not None:
        message, hint = f"{repo_id}: the Hub refused {step} ({status}{detail})", "check the repo id and options"
    elif _find(exc, OfflineModeIsEnabled) is not None:
        message = f"{endpoint}: offline mode is on (HF_HUB_OFFLINE), so {step} could not reach the Hub"
        hint = "unset HF_HUB_OFFLINE to push"
    elif network is not None:
        message = f"{endpoint}: cannot reach the Hub while {step}{tries} ({type(network).__name__})"
        hint = "check the network connection, a proxy, or HF_ENDPOINT"
    else:
        message = f"{repo_id}: {step} failed ({_first_line(exc) or type(exc).__name__})"
        hint = "check the folder and the options, or retry"
    return HubError(message.replace(secret, "***"), hint=hint.replace(secret, "***"))
