"""Workdirs and stores in buckets: gs:// paths are kept as they are, joined as URLs and handed
to tensorstore as its gcs driver; local paths are absolute and written atomically."""

import json
import os

from saejax import checkpoint, paths


def test_gs_paths_stay_urls_and_map_to_tensorstores_gcs_driver():
    run = "gs://my-bucket/sweeps/x32"
    assert paths.is_remote(run) and not paths.is_remote("/tmp/run")
    assert paths.absolute(run) == run
    assert paths.join(run, "members", "l1-0.3") == "gs://my-bucket/sweeps/x32/members/l1-0.3"
    assert checkpoint.directory_of(run) == "gs://my-bucket/sweeps/x32/checkpoints"
    assert paths.kvstore(paths.join(run, "store", "activations")) == {
        "driver": "gcs", "bucket": "my-bucket", "path": "sweeps/x32/store/activations/"}


def test_local_paths_are_absolute_and_written_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.absolute("run") == str(tmp_path / "run")
    assert checkpoint.directory_of("run") == str(tmp_path / "run" / "checkpoints")
    assert paths.kvstore("run/a") == {"driver": "file", "path": str(tmp_path / "run" / "a")}
    paths.makedirs("run/deep/er")
    paths.write_json("run/deep/er/x.json", {"a": 1})
    assert paths.read_json("run/deep/er/x.json") == {"a": 1}
    assert os.listdir(tmp_path / "run" / "deep" / "er") == ["x.json"]  # no temporary left
    assert json.loads((tmp_path / "run/deep/er/x.json").read_text()) == {"a": 1}


def test_bytes_round_trip_locally_and_through_epath(tmp_path, monkeypatch):
    png = bytes(range(256)) * 4
    paths.write_bytes(str(tmp_path / "a.png"), png)
    assert paths.read_bytes(str(tmp_path / "a.png")) == png
    paths.write_text(str(tmp_path / "r.md"), "b = 0.50 ± 0.01\n")
    assert paths.read_text(str(tmp_path / "r.md")) == "b = 0.50 ± 0.01\n"
    assert sorted(os.listdir(tmp_path)) == ["a.png", "r.md"]
    # The bucket branch (etils.epath) on a local folder.
    monkeypatch.setattr(paths, "is_remote", lambda path: True)
    paths.write_bytes(str(tmp_path / "b.png"), png)
    assert paths.read_bytes(str(tmp_path / "b.png")) == (tmp_path / "b.png").read_bytes() == png
    assert paths.read_text(str(tmp_path / "r.md")).startswith("b = 0.50 ±")
