"""Hugging Face Hub ids wherever a model or dataset folder is accepted (`init_from`,
`model.init_from`, eval's systems, diagnose's `--model`, `data.path`, eval's `--data`).

    init_from: Qwen/Qwen2.5-VL-7B-Instruct          # the snapshot in the Hugging Face cache
    data.path: ThinkMorph/Spatial_Navigation@main   # a dataset repo, at a revision

`resolve_folder` turns `org/name[@revision]` into its snapshot folder through
`huggingface_hub.snapshot_download`, which honours HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE
(offline: the cache only). A local path that exists always wins over an id. The id a folder came
from is remembered (`given_name`), so that what a run records (a LoRA adapter's base model) is the
id the user gave, not a cache path that only exists on this machine.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from visual_opsd.errors import ConfigError

RepoKind = Literal["model", "dataset"]
# `org/name` (the Hub's rules: letters, digits, '-', '_', '.'; no leading '.' or '-'), then `@revision`
_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*)(?:@(?P<revision>[^\s@]+))?", re.ASCII)
_GIVEN: dict[str, str] = {}  # resolved snapshot folder -> the id it was resolved from, this process
_RESOLVED: dict[tuple[str, str], Path] = {}  # (id, kind) -> snapshot folder: one look-up per id and process


def parse_id(value: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `value` is a well-formed Hub id `org/name[@revision]`, else None."""
    match = _ID.fullmatch(value)
    if match is None or "--" in match["repo"] or ".." in match["repo"] or match["repo"].endswith("."):
        return None
    return match["repo"], match["revision"]


def resolve_folder(value: str | os.PathLike, kind: RepoKind = "model", key: str = "init_from") -> Path:
    """The local folder for config key `key`'s `value`: `value` itself when it exists or is no Hub
    id (the caller's "no such folder" error follows), else the id's snapshot folder in the Hugging
    Face cache, downloaded first when online. An id that cannot be had is a one-line ConfigError
    naming `key` and the `hf download` command that fetches it."""
    path = Path(value)
    parsed = None if path.exists() else parse_id(str(value))
    if parsed is None:
        return path
    if (str(value), kind) not in _RESOLVED:
        folder = Path(_snapshot(*parsed, kind, str(value), key))
        _RESOLVED[str(value), kind] = folder
        _GIVEN[str(folder)] = _GIVEN[str(folder.resolve())] = str(value)
    return _RESOLVED[str(value), kind]


def given_name(path: str | os.PathLike | None) -> str | None:
    """The Hub id that `path` was resolved from in this process, or None (a plain folder)."""
    if path is None:
        return None
    return _GIVEN.get(str(path)) or _GIVEN.get(str(Path(path).resolve()))


def cache_repo_root(path: str | os.PathLike) -> Path | None:
    """The repository's cache folder (`<cache>/datasets--org--name`, resolved) when `path` lies in one
    of its snapshots (`.../snapshots/<commit>/...`), else None. A snapshot's files are links into the
    repository's `blobs/`: its files are those that resolve inside this folder, not the snapshot."""
    parts = Path(os.path.abspath(path)).parts
    for i in range(1, len(parts) - 1):
        if (parts[i] == "snapshots" and parts[i - 1].startswith(("models--", "datasets--"))
                and re.fullmatch(r"[0-9a-f]{40}", parts[i + 1])):
            return Path(*parts[:i]).resolve()
    return None


def repo_name(value: str) -> str | None:
    """The repository's name of a Hub id (`org/name@rev` -> `name`), or None when `value` is no id."""
    parsed = parse_id(value)
    return parsed[0].split("/")[1] if parsed else None


def download_command(repo: str, revision: str | None, kind: RepoKind) -> str:
    """The `hf download` command line that puts `repo` (at `revision`) into the cache."""
    return " ".join(["hf download", repo, *(["--repo-type", kind] if kind != "model" else []),
                     *(["--revision", revision] if revision else [])])


def _snapshot(repo: str, revision: str | None, kind: RepoKind, value: str, key: str) -> str:
    """`snapshot_download`, with every way it can fail as one ConfigError line."""
    from huggingface_hub import constants, snapshot_download

    # read now rather than at huggingface_hub's import: a variable set after start-up counts too
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        return snapshot_download(repo, repo_type=kind, revision=revision, local_files_only=offline)
    except (OSError, ValueError) as e:  # not cached, offline, no such repo or revision, no access (all OSError)
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        problem = ("is not in the Hugging Face cache (HF_HUB_OFFLINE is set: the cache only)" if offline
                   else f"cannot be downloaded from the Hugging Face Hub ({type(e).__name__}: {reason})")
        raise ConfigError(f"{key}: no such folder {value}, and the Hub {kind} {repo} {problem}; "
                          f"fetch it with `{download_command(repo, revision, kind)}`") from None
