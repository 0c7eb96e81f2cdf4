"""Models named `org/name` found in a local Hugging Face hub cache, offline: jlora never downloads.

The cache is the one huggingface_hub uses: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
`~/.cache/huggingface/hub`. A model there is laid out as

    models--org--name/refs/main            the commit hash that the branch (or tag) "main" points at
    models--org--name/snapshots/<hash>/    the files of that commit (links into blobs/)
"""

from __future__ import annotations

import os
import re

from jlora.errors import ModelLoadError

# A hub repository id: "org/name" of letters, digits and "-_.", with an optional "@revision" (branch, tag or commit).
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def cache_dir() -> tuple[str, str]:
    """(the hub cache directory, the setting that chose it), as huggingface_hub picks it."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"], "HF_HUB_CACHE"
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub"), "HF_HOME"
    return os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub"), "the default"


def is_hub_name(model: str) -> bool:
    """Whether `model` reads as a hub id (`org/name` or `org/name@revision`), not as a path."""
    return bool(_REPO_ID.match(model)) and ".." not in model and "--" not in model.split("@")[0]


def resolve_hub_model(model: str) -> str:
    """The snapshot directory of hub id `model` in the local cache.

    `org/name` takes the commit that refs/main names; `org/name@rev` that of branch or tag `rev`, or the commit
    `rev` itself (40 hex digits). Raises `ModelLoadError` listing every path it looked in.
    """
    m = _REPO_ID.match(model)
    if m is None or not is_hub_name(model):
        raise ModelLoadError(f"{model!r} is not a Hugging Face model id (org/name or org/name@revision)")
    repo, revision = m.group("repo"), m.group("revision") or "main"
    root, source = cache_dir()
    folder = os.path.join(root, "models--" + repo.replace("/", "--"))
    looked = []
    commit = revision if _COMMIT.match(revision) else None
    if commit is None:
        ref = os.path.join(folder, "refs", revision)
        looked.append(ref)
        if os.path.isfile(ref):
            with open(ref) as f:
                commit = f.read().strip()
    if commit is not None:
        snapshot = os.path.join(folder, "snapshots", commit)
        looked.append(snapshot)
        if os.path.isfile(os.path.join(snapshot, "config.json")):
            return snapshot
        if os.path.isdir(snapshot):
            raise ModelLoadError(f"model {model!r}: the hub cache's snapshot {snapshot} has no config.json (a "
                                 "partial download?)")
    raise ModelLoadError(
        f"model {model!r} is not in the local Hugging Face hub cache {root} (set by {source}; HF_HUB_CACHE, else "
        f"HF_HOME/hub, else ~/.cache/huggingface/hub); looked in: {', '.join(looked)}. jlora never downloads: "
        f"fetch it where there is a network (`huggingface-cli download {repo}`), or pass a model directory")
