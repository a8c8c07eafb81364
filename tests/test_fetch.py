"""fetch_data offline, against a huggingface_hub cache laid out as hf_hub_download writes it:
<cache>/datasets--AIMH--PsyDefConv/{blobs/<etag>, refs/main, snapshots/<commit>/Splits/<file> -> blob}."""
import json

import huggingface_hub.constants
import pytest

from psydef.core.fetch import fetch_data

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SPLITS = {"train": [{"id": "train_00001", "label": 7}], "test": [{"id": "test_00001"}]}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once at import, so the constant is patched as well.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def build_cache(cache_dir, repo_id="AIMH/PsyDefConv"):
    repo = cache_dir / ("datasets--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / COMMIT / "Splits").mkdir(parents=True)
    for i, (split, records) in enumerate(SPLITS.items()):
        blob = repo / "blobs" / f"etag{i}"
        blob.write_text(json.dumps(records))
        (repo / "snapshots" / COMMIT / "Splits" / f"{split}.json").symlink_to(f"../../../blobs/etag{i}")


@pytest.mark.parametrize("revision", [None, "main", COMMIT])
def test_fetch_from_cache_offline(tmp_path, revision):
    build_cache(tmp_path / "cache")
    paths = fetch_data(tmp_path / "data", revision=revision, cache_dir=tmp_path / "cache")
    assert paths == {"train": tmp_path / "data" / "train.json", "test": tmp_path / "data" / "test.json"}
    for split, path in paths.items():
        assert not path.is_symlink()
        assert json.loads(path.read_text()) == SPLITS[split]


def test_not_cached_offline_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        fetch_data(tmp_path / "data", cache_dir=tmp_path / "empty-cache")
    message = str(excinfo.value)
    assert "AIMH/PsyDefConv" in message and "Splits/train.json" in message
    assert str((tmp_path / "data").resolve()) in message and "by hand" in message
    assert "CC BY-NC 4.0" in message
    assert not (tmp_path / "data").exists()


def test_the_fetch_data_command_prints_where_the_splits_went_and_fails_in_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from psydef.cli import cli

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    missing = CliRunner().invoke(cli, ["fetch-data", "--dest", str(tmp_path / "data")])
    assert missing.exit_code == 1 and missing.output.startswith("Error: Cannot fetch Splits/train.json")
    assert len(missing.output.strip().splitlines()) == 1, missing.output
    build_cache(tmp_path / "cache")
    result = CliRunner().invoke(cli, ["fetch-data", "--dest", str(tmp_path / "data"), "--revision", COMMIT])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"{split}: {tmp_path / 'data' / f'{split}.json'}" for split in SPLITS]
