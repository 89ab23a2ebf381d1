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
