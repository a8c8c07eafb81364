"""Fetch the PsyDefConv splits from the Hugging Face Hub into a plain data folder.

The files go through the huggingface_hub cache, so a second fetch, or one with ``HF_HUB_OFFLINE=1``,
is served from it. The data is CC BY-NC 4.0 and is never shipped with, or committed to, this project.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError

from psydef.core.files import atomic_files, writable_folder

DEFAULT_REPO_ID = "AIMH/PsyDefConv"
SPLIT_FILES = {"train": "Splits/train.json", "test": "Splits/test.json"}


def fetch_data(dest: str | Path = "data/psydefconv", *, repo_id: str = DEFAULT_REPO_ID,
               revision: str | None = None, cache_dir: str | Path | None = None) -> dict[str, Path]:
    """Download ``Splits/train.json`` and ``Splits/test.json`` of the dataset repo ``repo_id`` and
    copy them to ``dest/train.json`` and ``dest/test.json``; returns ``{"train": path, "test": path}``.

    Raises FileNotFoundError, saying how to place the files by hand, when the Hub cannot be reached
    (no network, or ``HF_HUB_OFFLINE=1``) and the files are not in the cache; ValueError when ``dest``
    is not a writable folder. Both files are replaced together once both are copied.
    """
    dest = Path(dest)
    cached = {}
    for split, filename in SPLIT_FILES.items():
        try:
            cached[split] = hf_hub_download(repo_id, filename, repo_type="dataset", revision=revision,
                                            cache_dir=cache_dir)
        except LocalEntryNotFoundError as err:
            raise FileNotFoundError(
                f"Cannot fetch {filename} of the Hugging Face dataset {repo_id}"
                f"{f' at revision {revision}' if revision else ''}: the Hub is unreachable (no network, "
                f"or HF_HUB_OFFLINE=1) and the file is not in the huggingface_hub cache"
                f"{f' at {cache_dir}' if cache_dir else ''}. Connect and run again, or place train.json "
                f"and test.json by hand in {dest.resolve()}/ (from "
                f"https://huggingface.co/datasets/{repo_id}, folder Splits/). The data is CC BY-NC 4.0: "
                f"non-commercial research use with attribution only; do not commit it."
            ) from err
    targets = {split: writable_folder(dest, "--dest") / f"{split}.json" for split in cached}
    with atomic_files(*targets.values()) as temporaries:
        for source, temporary in zip(cached.values(), temporaries):
            shutil.copyfile(source, temporary)
    return targets
