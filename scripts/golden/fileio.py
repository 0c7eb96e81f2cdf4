"""Deterministic writers: re-running the generator must give byte-identical fixture files."""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile

import numpy as np

_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can hold; fixed so archives are reproducible


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Like `np.savez_compressed`, but with fixed entry timestamps and sorted keys (np.load reads it)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)


def save_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def load_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def reset_dir(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


def compare_trees(a: str, b: str) -> list[str]:
    """Relative paths that differ (content, or present on one side only) between two folders."""
    def files(root):
        out = set()
        for d, _, names in os.walk(root):
            out.update(os.path.relpath(os.path.join(d, n), root) for n in names)
        return out

    fa, fb = files(a), files(b)
    diff = sorted((fa ^ fb))
    for rel in sorted(fa & fb):
        with open(os.path.join(a, rel), "rb") as x, open(os.path.join(b, rel), "rb") as y:
            if x.read() != y.read():
                diff.append(rel)
    return diff
