"""Pushing adapters and merged models to a Hub: a real HTTP server on 127.0.0.1 (tests/hub_server.py) with
real huggingface_hub on both sides (upload by ia3convert, download back for the round trips). No internet."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import ADAPTERS, MODELS, output, sample_ids
from hub_server import HubServer
from safetensors.torch import load_file, save_file

import ia3convert
from ia3convert.cli import main
from ia3convert.errors import AdapterError, HubError

TOKEN = "hf_TestSecretTokenQwErTy0123456789"
OTHER_TOKEN = "hf_OtherUsersTokenAsDfGh9876543210"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fresh fake Hub with users alice (member of org ia3-org) and bob; huggingface_hub isolated from any real
    login (empty HF_HOME, no HF_TOKEN) and with xet disabled, so that LFS goes through the batch API."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server = HubServer().start()
    server.add_user("alice", TOKEN, orgs=("ia3-org",))
    server.add_user("bob", OTHER_TOKEN)
    yield server
    server.stop()


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and modification time of every file below ``folder``: proof that a push only reads."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def card_of(data: bytes):
    from huggingface_hub import ModelCard

    return ModelCard(data.decode("utf-8"))


def download(hub: HubServer, repo_id: str, tmp_path: Path, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, endpoint=hub.url, token=TOKEN,
                                  cache_dir=tmp_path / "download-cache"))


def cli(*args: object, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def float_llama():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(MODELS / "llama-fp16", dtype=torch.float32).eval()


def test_adapter_push_inline_upload_and_peft_round_trip(hub, tmp_path):
    from peft import PeftModel

    hub.lfs_patterns = []  # the server asks for every file inline ("regular")
    before = snapshot(ADAPTERS / "llama")
    result = ia3convert.push(ADAPTERS / "llama", "llama-ia3", private=True, token=TOKEN,
                             base_model_id="ia3-org/llama-base", endpoint=hub.url)

    assert snapshot(ADAPTERS / "llama") == before
    assert result.repo_id == "alice/llama-ia3" and result.kind == "adapter"
    head = hub.head("alice/llama-ia3")
    assert result.commit_url == f"{hub.url}/alice/llama-ia3/commit/{head.oid}" and result.pr_url is None
    received = hub.files("alice/llama-ia3")
    sent = {k: v for k, v in local_files(ADAPTERS / "llama").items() if k != "README.md"}
    assert {k: v for k, v in received.items() if k not in ("README.md", ".gitattributes")} == sent
    assert sorted(result.files) == sorted([*sent, "README.md"])
    assert hub.repos["alice/llama-ia3"].private is True
    assert hub.calls("POST", "/api/repos/create")[0].json() == {"name": "llama-ia3", "organization": "alice",
                                                               "visibility": "private"}
    commits = hub.calls("POST", "/commit/")
    assert len(commits) == 1
    keys = [line["key"] for line in commits[0].ndjson()[1:]]
    assert keys == ["file"] * len(result.files)
    assert not hub.calls("POST", "/info/lfs/objects/batch")
    for request in hub.requests:
        assert request.headers.get("authorization") == f"Bearer {TOKEN}", request.path

    card = card_of(received["README.md"])
    assert card.data.library_name == "peft"
    assert card.data.base_model == "ia3-org/llama-base"
    assert card.data.base_model_relation == "adapter"
    assert {"ia3", "peft", "base_model:adapter:ia3-org/llama-base"} <= set(card.data.tags)
    assert "base_model:adapter:models/llama-fp16" not in card.data.tags  # the replaced base's tag went with it
    assert "Model Card for Model ID" in card.text  # the folder's own README text is kept

    local_dir = download(hub, "alice/llama-ia3", tmp_path)
    ids = sample_ids()
    for kwargs in ({}, {"subfolder": "second"}):
        expected = output(PeftModel.from_pretrained(float_llama(), ADAPTERS / "llama", **kwargs).eval(), ids)
        got = output(PeftModel.from_pretrained(float_llama(), local_dir, **kwargs).eval(), ids)
        assert torch.equal(got, expected)
        assert not torch.equal(got, output(float_llama(), ids))  # the adapter does change the output


def test_merged_model_push_through_lfs_and_transformers_round_trip(hub, tmp_path):
    from transformers import LlamaForCausalLM

    merged = tmp_path / "merged"
    report = ia3convert.merge(MODELS / "llama-nf4", ADAPTERS / "llama", merged)
    before = snapshot(merged)
    result = ia3convert.push(merged, "ia3-org/llama-nf4-merged", token=TOKEN, endpoint=hub.url)

    assert snapshot(merged) == before
    assert any("--base-model-id" in note for note in result.notes)  # the report names a local path
    received = hub.files("ia3-org/llama-nf4-merged")
    assert {k: v for k, v in received.items() if k not in ("README.md", ".gitattributes")} == local_files(merged)
    assert hub.repos["ia3-org/llama-nf4-merged"].private is False

    weights = (merged / "model.safetensors").read_bytes()
    oid = hashlib.sha256(weights).hexdigest()
    lines = {line["value"]["path"]: line for line in hub.calls("POST", "/commit/")[0].ndjson()[1:]}
    assert lines["model.safetensors"] == {"key": "lfsFile", "value": {"path": "model.safetensors", "algo": "sha256",
                                                                      "oid": oid, "size": len(weights)}}
    assert lines["config.json"]["key"] == "file"
    batch = hub.calls("POST", "/info/lfs/objects/batch")[0].json()
    assert batch["objects"] == [{"oid": oid, "size": len(weights)}]
    puts = hub.calls("PUT", "/lfs-upload/")
    assert len(puts) == 1 and puts[0].body == weights
    assert "authorization" not in puts[0].headers  # the storage upload URL is pre-signed: no token sent there
    assert hub.calls("POST", "/info/lfs/objects/verify")[0].json() == {"oid": oid, "size": len(weights)}

    card = card_of(received["README.md"])
    assert card.data.library_name == "transformers"
    assert card.data.base_model is None
    assert {"ia3", "merged", "bitsandbytes", "4-bit", "nf4"} <= set(card.data.tags)
    assert 'LlamaForCausalLM.from_pretrained("ia3-org/llama-nf4-merged")' in card.text
    assert "over 512 sampled output rows per module" in card.text  # the check as it ran
    for transform, entry in report.summary().items():
        assert f"| {transform} | {entry['modules']} | {entry['max_rel_error']:.2e} |" in card.text

    local_dir = download(hub, "ia3-org/llama-nf4-merged", tmp_path)
    ids = sample_ids()
    expected = output(LlamaForCausalLM.from_pretrained(merged).eval(), ids)
    assert torch.equal(output(LlamaForCausalLM.from_pretrained(local_dir).eval(), ids), expected)


def test_branch_then_pull_request(hub, tmp_path):
    hub.lfs_patterns = ["*.safetensors"]
    first = ia3convert.push(ADAPTERS / "opt", "alice/opt-ia3", revision="dev", token=TOKEN, endpoint=hub.url,
                            base_model_id="facebook/opt-125m")
    assert hub.calls("POST", "/branch/dev")[0].json() == {}
    assert set(hub.files("alice/opt-ia3", "main")) == {".gitattributes"}  # main untouched
    assert hub.files("alice/opt-ia3", "dev")["adapter_model.safetensors"] == \
        (ADAPTERS / "opt" / "adapter_model.safetensors").read_bytes()
    assert first.commit_url.endswith(hub.head("alice/opt-ia3", "dev").oid) and first.pr_url is None

    edited = tmp_path / "opt"
    shutil.copytree(ADAPTERS / "opt", edited)
    (edited / "notes.txt").write_text("trained longer\n")
    pr = ia3convert.push(edited, "alice/opt-ia3", revision="dev", create_pr=True, commit_message="Longer run",
                         token=TOKEN, endpoint=hub.url, base_model_id="facebook/opt-125m")
    assert pr.pr_url == f"{hub.url}/alice/opt-ia3/discussions/1" and pr.url == pr.pr_url
    assert len(hub.calls("POST", "/branch/dev")) == 2  # asked again, already there (409), not an error
    commit = hub.calls("POST", "/commit/")[-1]
    assert commit.path.endswith("/commit/dev") and commit.query == {"create_pr": ["1"]}
    assert commit.ndjson()[0]["value"]["summary"] == "Longer run"
    assert "notes.txt" not in hub.files("alice/opt-ia3", "dev")  # the branch waits for the PR
    assert hub.files("alice/opt-ia3", "refs/pr/1")["notes.txt"] == b"trained longer\n"
    assert download(hub, "alice/opt-ia3", tmp_path, revision="refs/pr/1").joinpath("notes.txt").is_file()


def test_token_from_the_environment_and_visibility_of_an_existing_repo_never_changed(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # huggingface_hub's usual resolution when no token is passed
    ia3convert.push(ADAPTERS / "gpt2", "alice/gpt2-ia3", private=False, endpoint=hub.url)
    api_calls = [r for r in hub.requests if not r.path.startswith("/lfs-upload/")]  # pre-signed storage URLs
    assert {r.headers.get("authorization") for r in api_calls} == {f"Bearer {TOKEN}"}
    with pytest.raises(HubError, match=r"exists and is public, but --private was asked"):
        ia3convert.push(ADAPTERS / "gpt2", "alice/gpt2-ia3", private=True, endpoint=hub.url)
    assert hub.repos["alice/gpt2-ia3"].private is False and len(hub.calls("POST", "/commit/")) == 1


def test_existing_readme_kept_with_missing_metadata_or_overwritten(hub, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(ADAPTERS / "bert", folder)
    (folder / "README.md").write_text("---\nlicense: mit\ntags:\n- my-tag\n---\n# My adapter\n\nHand-written.\n")
    kept = ia3convert.push(folder, "alice/bert-ia3", dry_run=True, base_model_id="google/bert-tiny")
    card = card_of(kept.card.encode())
    assert card.data.license == "mit" and card.data.tags[0] == "my-tag"
    assert {"ia3", "peft", "base_model:adapter:google/bert-tiny"} <= set(card.data.tags)
    assert card.data.library_name == "peft" and card.data.base_model == "google/bert-tiny"
    assert card.text == "# My adapter\n\nHand-written.\n"

    plain = tmp_path / "plain"
    shutil.copytree(ADAPTERS / "bert", plain)
    (plain / "README.md").write_text("Just text, no metadata.\n")
    card = card_of(ia3convert.push(plain, "alice/bert-ia3", dry_run=True).card.encode())
    assert card.text.strip() == "Just text, no metadata." and card.data.library_name == "peft"

    fresh = card_of(ia3convert.push(folder, "alice/bert-ia3", dry_run=True, overwrite_card=True).card.encode())
    assert fresh.data.license is None and "my-tag" not in fresh.data.tags
    assert "Hand-written" not in fresh.text and 'PeftModel.from_pretrained(base, "alice/bert-ia3")' in fresh.text
    assert hub.requests == []  # dry runs contact nothing

    (folder / "README.md").write_text("---\ntags: [unclosed\n---\ntext\n")
    with pytest.raises(AdapterError, match=r"README.md: the metadata block cannot be read .*--overwrite-card"):
        ia3convert.push(folder, "alice/bert-ia3", dry_run=True)


def test_never_uploads_git_caches_or_temp_files_and_honours_globs(hub, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(ADAPTERS / "llama", folder)
    junk = [".git/config", ".cache/huggingface/upload/adapter_model.safetensors.metadata", "__pycache__/x.pyc",
            ".adapter_model.safetensors.a1b2.tmp", "adapter_model.safetensors.incomplete", "run.lock", ".DS_Store"]
    for name in junk:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"junk")
    (folder / "training_args.json").write_text("{}")

    result = cli("push", folder, "--repo", "alice/x", "--dry-run", "--base-model-id", "a/b")
    assert result.exit_code == 0, result.output
    listed = [line.split()[0] for line in result.output.splitlines() if line.startswith("  ")]
    assert listed == ["README.md", "adapter_config.json", "adapter_model.safetensors", "second/adapter_config.json",
                      "second/adapter_model.safetensors", "training_args.json"]
    assert "library_name: peft" in result.output and result.output.rstrip().endswith("nothing was sent")

    only_root = ia3convert.push(folder, "alice/x", dry_run=True, overwrite_card=True, include=["adapter_*", "second/*"],
                                exclude=["second/*"])
    assert only_root.files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "| default |" in only_root.card and "| second |" not in only_root.card
    assert 'subfolder="second"' not in only_root.card
    with pytest.raises(AdapterError, match=r"leave out adapter 'second''s weights"):
        ia3convert.push(folder, "alice/x", dry_run=True, exclude=["second/*.safetensors"])
    with pytest.raises(AdapterError, match=r"hold no complete adapter"):
        ia3convert.push(folder, "alice/x", dry_run=True, include=["*.json"], exclude=["*adapter_config.json"])
    assert hub.requests == []


def test_refuses_folders_that_are_not_adapters_or_models(hub, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(MODELS / "llama-nf4" / "config.json", weightless / "config.json")
    broken = tmp_path / "broken"
    shutil.copytree(ADAPTERS / "llama", broken)
    (broken / "second" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    diverged = tmp_path / "diverged"  # loads fine, but ``validate`` finds a NaN scale
    shutil.copytree(ADAPTERS / "llama", diverged)
    tensors = load_file(diverged / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
    tensors[key][0, 3] = float("nan")
    save_file(tensors, diverged / "adapter_model.safetensors", metadata={"format": "pt"})
    ia3convert.read_adapter(diverged)
    cases = [(empty, 4, "is empty, nothing to push"), (weightless, 4, "has config.json but no weights"),
             (tmp_path / "missing", 4, "does not exist"), (broken, 3, "not a readable safetensors file"),
             (diverged, 3, "adapter 'default' is not usable, 1 error(s), first: "
                           "model.layers.0.mlp.down_proj: 1 of 128 scales are NaN or infinite")]
    for folder, code, message in cases:
        result = cli("push", folder, "--repo", "alice/x", "--token", TOKEN, "--endpoint", hub.url)
        assert result.exit_code == code, result.output
        assert result.output.startswith("error: ") and message in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert hub.requests == []


# case: (token, repo, injected failure (method, path regex, status, headers), expected part of the message)
ERROR_CASES = {
    "no token": (None, "alice/target", None, "alice/target: no Hugging Face token found"),
    "bad token": ("hf_NotAValidTokenZzZz000", "alice/target", None, "the token was rejected (401 Unauthorized)"),
    "no permission": (OTHER_TOKEN, "alice/target", None,
                      "alice/target: no permission (403 Forbidden) while creating the repo"),
    "repo not found": (TOKEN, "alice/target", ("POST", r"/preupload/", 404, {"X-Error-Code": "RepoNotFound"}),
                       "alice/target: repository not found"),
    "network unreachable": (TOKEN, "alice/target", None,
                            "cannot reach the Hub while checking the token after 3 attempts (ConnectError)"),
    "rate limited": (TOKEN, "alice/target", ("GET", r"/api/whoami-v2", 429, {"Retry-After": "30"}),
                     "rate limited (429 Too Many Requests) while checking the token (wait 30 s"),
    "server error": (TOKEN, "alice/target", ("POST", r"/api/repos/create", 503, {}),
                     "server error 503 while creating the repo after 3 attempts"),
    "offline mode": (TOKEN, "alice/target", None, "offline mode is on (HF_HUB_OFFLINE), so checking the token"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_hub_errors_are_one_line_without_the_token(hub, tmp_path, case, capfd, caplog, monkeypatch):
    token, repo, failure, message = ERROR_CASES[case]
    monkeypatch.setattr("ia3convert.hub.RETRY_WAITS", (0.05, 0.1))
    if case == "offline mode":
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    if failure:
        method, path, status, headers = failure
        hub.fail(method, path, status, headers=headers)
    if case == "network unreachable":
        with socket.socket() as sock:  # a port that nothing listens on
            sock.bind(("127.0.0.1", 0))
            endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    else:
        endpoint = hub.url
    folder = tmp_path / "adapter"
    shutil.copytree(ADAPTERS / "llama", folder)
    before = snapshot(folder)

    options = ["--token", token] if token else []
    result = cli("push", folder, "--repo", repo, "--base-model-id", "a/b", *options, env={"HF_ENDPOINT": endpoint})

    assert result.exit_code == 8, result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert message in result.output, result.output
    captured = capfd.readouterr()
    for text in (result.output, captured.out, captured.err, caplog.text):
        assert TOKEN not in text and OTHER_TOKEN not in text
    assert snapshot(folder) == before
    assert not hub.calls("POST", "/commit/")
    if case in ("no token", "offline mode"):
        assert hub.requests == []
    if case == "server error":
        assert len(hub.calls("POST", "/api/repos/create")) == 3


def test_merge_push_to_after_a_checked_merge(hub, tmp_path, capfd, caplog):
    out = tmp_path / "merged-int8"
    env = {"HF_ENDPOINT": hub.url}
    result = cli("merge", MODELS / "opt-int8", ADAPTERS / "opt", out, "--quiet", "--push-to", "alice/opt-int8",
                 "--private", "--token", TOKEN, "--base-model-id", "facebook/opt-125m", env=env)
    assert result.exit_code == 0, result.output
    head = hub.head("alice/opt-int8")
    assert result.output.strip() == (f"pushed {len(local_files(out)) + 1} files to alice/opt-int8 (model, main): "
                                     f"{hub.url}/alice/opt-int8/commit/{head.oid}")
    assert hub.repos["alice/opt-int8"].private is True
    received = hub.files("alice/opt-int8")
    assert {k: v for k, v in received.items() if k not in ("README.md", ".gitattributes")} == local_files(out)
    card = card_of(received["README.md"])
    assert card.data.base_model == "facebook/opt-125m"
    assert {"ia3", "merged", "bitsandbytes", "8-bit", "int8"} <= set(card.data.tags)
    assert json.loads(received["merge_report.json"])["passed"] is True

    failing = cli("merge", MODELS / "opt-int8", ADAPTERS / "opt", tmp_path / "never", "--quiet", "--max-error",
                  "1e-12", "--push-to", "alice/never", "--token", TOKEN, env=env)
    assert failing.exit_code == 7 and not (tmp_path / "never").exists()
    assert "alice/never" not in hub.repos and len(hub.calls("POST", "/commit/")) == 1
    captured = capfd.readouterr()
    for text in (result.output, failing.output, captured.out, captured.err, caplog.text):
        assert TOKEN not in text
