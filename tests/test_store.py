"""The activation store: resumable writing, clear errors, and the deterministic shuffled stream."""

import gc
import json
import os
import subprocess
import sys
import threading

import jax
import ml_dtypes
import numpy as np
import pytest

from conftest import ROOT
from saejax import configs, sharding
from saejax.data import store

D, CTX, CHUNK = 8, 16, 32


def activations(start, stop, d=D):
    """Row r is r in column 0 (exact in float32), so a batch names the rows it holds."""
    rows = np.arange(start, stop, dtype=np.float32)[:, None]
    return rows + np.linspace(0, 0.5, d, dtype=np.float32)[None, :]


def tokens(start, stop):
    return (np.arange(start, stop) * 7 % 50257).astype(np.int32)


def write_store(path, n=640, *, chunk_rows=CHUNK, shard_rows=None, dtype="float32",
                step=96, metadata=None):
    writer = store.ActivationStoreWriter.create_or_open(
        path, d=D, dtype=dtype, context_length=CTX, n_tokens=n, chunk_rows=chunk_rows,
        shard_rows=shard_rows, metadata=metadata or {"model": "toy", "hook": "resid", "layer": 3})
    for start in range(writer.committed_rows, n, step):
        stop = min(start + step, n)
        writer.write(start, activations(start, stop), tokens(start, stop))
    return writer


def data_config(path, **overrides):
    """The `data` section of the config schema, pointed at `path`."""
    config = configs.base_config().data
    config.update({"source": "store", "path": str(path), "d": D, "seed": 0,
                   "shuffle_buffer_chunks": 3, "eval_tokens": 64, "prefetch_windows": 2,
                   **overrides})
    return config


def make_source(path, *, batch_size=48, **overrides):
    mesh = jax.make_mesh((8, 1), sharding.MESH_AXES)
    return store.ArraySource(data_config(path, **overrides), batch_size=batch_size, mesh=mesh,
                             rules=sharding.DEFAULT_RULES)


def row_ids(batch):
    return np.asarray(batch)[:, 0].round().astype(np.int64)


# ------------------------------------------------------------------------------------------
# Writing and resuming.
# ------------------------------------------------------------------------------------------
def test_resume_after_crash_equals_a_store_written_in_one_go(tmp_path, monkeypatch):
    n = 640
    one_go = store.open_store(write_store(tmp_path / "one_go", n, step=n).path)

    path = tmp_path / "resumed"
    writer = store.ActivationStoreWriter.create_or_open(
        path, d=D, dtype="float32", context_length=CTX, n_tokens=n, chunk_rows=CHUNK,
        metadata={"model": "toy", "hook": "resid", "layer": 3})
    writer.write(0, activations(0, 100), tokens(0, 100))  # not chunk-aligned
    # The crash: the data of rows [100, 200) is written, the commit never happens.
    monkeypatch.setattr(store.ActivationStoreWriter, "commit",
                        lambda self, rows: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        writer.write(100, activations(100, 200), tokens(100, 200))
    monkeypatch.undo()
    with pytest.raises(store.StoreError, match="incomplete store: 100 of 640"):
        store.open_store(path)

    resumed = store.ActivationStoreWriter.create_or_open(
        path, d=D, dtype="float32", context_length=CTX, n_tokens=n, chunk_rows=CHUNK,
        metadata={"model": "toy", "hook": "resid", "layer": 3})
    assert resumed.committed_rows == 100
    with pytest.raises(store.StoreError, match="must start at committed_rows=100"):
        resumed.write(200, activations(200, 300), tokens(200, 300))
    write_store(path, n)  # continues from row 100
    again = store.open_store(path)
    np.testing.assert_array_equal(again.read(0, n).result(), one_go.read(0, n).result())
    np.testing.assert_array_equal(again.token_ids(0, n), one_go.token_ids(0, n))
    np.testing.assert_array_equal(again.token_ids(0, n), tokens(0, n))
    assert again.sequence_position(35) == (2, 3)
    metadata = json.loads((path / "metadata.json").read_text())
    assert metadata["model"] == "toy" and metadata["d"] == D and metadata["format_version"] == 1
    with pytest.raises(store.StoreError, match="past the planned n_tokens=640"):
        write_store(path, n).write(n, activations(0, 1), tokens(0, 1))


def test_resuming_with_other_metadata_names_the_field_and_changes_nothing(tmp_path):
    path = tmp_path / "s"
    write_store(path, 640)
    before = {p: os.path.getmtime(os.path.join(dp, p))
              for dp, _, files in os.walk(path) for p in files}
    with pytest.raises(store.StoreError, match=r"s: cannot resume.*layer=3 but 4"):
        write_store(path, 640, metadata={"model": "toy", "hook": "resid", "layer": 4})
    with pytest.raises(store.StoreError, match="chunk_rows=32 but 64"):
        write_store(path, 640, chunk_rows=64)
    after = {p: os.path.getmtime(os.path.join(dp, p))
             for dp, _, files in os.walk(path) for p in files}
    assert before == after
    with pytest.raises(store.StoreError, match="whole number of sequences"):
        write_store(tmp_path / "t", 650)


# ------------------------------------------------------------------------------------------
# Opening for reading: clear errors.
# ------------------------------------------------------------------------------------------
def test_open_store_errors_name_the_store_and_the_mismatch(tmp_path):
    path = write_store(tmp_path / "s", 640).path
    with pytest.raises(store.StoreError, match=r"s: .*d=8 but data.d=16"):
        store.open_store(path, expected_d=16)
    with pytest.raises(store.StoreError, match="holds float32 but bfloat16 was expected"):
        store.open_store(path, expected_dtype="bfloat16")
    (tmp_path / "empty").mkdir()
    with pytest.raises(store.StoreError, match="empty: not an activation store"):
        store.open_store(tmp_path / "empty")
    with pytest.raises(store.StoreError, match="d=8 but data.d=16"):
        make_source(path, d=16)
    partial = write_store(tmp_path / "partial", 640, step=96)
    os.remove(os.path.join(partial.path, "progress.json"))
    with pytest.raises(store.StoreError, match="incomplete store: 0 of 640"):
        store.open_store(partial.path)
    assert store.open_store(partial.path, allow_partial=True).n_rows == 0


def test_a_missing_chunk_file_is_an_error_naming_the_rows_not_zeros(tmp_path):
    path = write_store(tmp_path / "s", 640).path
    os.remove(os.path.join(path, "activations", "c", "3", "0"))  # rows [96, 128)
    opened = store.open_store(path)
    np.testing.assert_array_equal(opened.read(0, 96).result(), activations(0, 96))
    with pytest.raises(store.StoreError, match=r"s: rows \[96, 128\) could not be read"):
        opened.read(96, 128).result()
    source = make_source(path)  # the error crosses the prefetch thread
    with pytest.raises(store.StoreError, match="could not be read"):
        for _ in range(20):
            source.next_batch()
    source.close()
    os.truncate(os.path.join(path, "activations", "c", "4", "0"), 100)  # rows [128, 160)
    with pytest.raises(store.StoreError, match=r"rows \[128, 160\) could not be read"):
        opened.read(128, 160).result()


def test_with_checksums_a_flipped_bit_is_an_error(tmp_path):
    path = tmp_path / "s"
    store.ActivationStoreWriter.create_or_open(
        path, d=D, dtype="float32", context_length=CTX, n_tokens=64, chunk_rows=CHUNK,
        checksum=True).write(0, activations(0, 64), tokens(0, 64))
    with open(path / "activations" / "c" / "1" / "0", "r+b") as f:
        f.seek(5)
        byte = f.read(1)
        f.seek(5)
        f.write(bytes([byte[0] ^ 1]))
    opened = store.open_store(path)
    np.testing.assert_array_equal(opened.read(0, 32).result(), activations(0, 32))
    with pytest.raises(store.StoreError, match=r"rows \[32, 64\) could not be read.*[Dd]igest"):
        opened.read(32, 64, out=np.empty((32, D), np.float32)).result()


# ------------------------------------------------------------------------------------------
# The stream.
# ------------------------------------------------------------------------------------------
def test_each_epoch_visits_every_training_row_once_and_never_an_eval_row(tmp_path):
    n, batch = 640, 48
    path = write_store(tmp_path / "s", n).path
    source = make_source(path, batch_size=batch)
    train_rows = source.reader.train_rows
    assert train_rows == 576  # 640 - 64 held out, chunk-aligned
    seen = np.concatenate([row_ids(source.next_batch()) for _ in range(2 * train_rows // batch)])
    epochs = seen.reshape(2, train_rows)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(train_rows))
    assert not np.array_equal(epochs[0], epochs[1])  # each epoch has its own order
    assert not np.array_equal(epochs[0], np.arange(train_rows))  # shuffled
    eval_rows = np.concatenate([row_ids(source.eval_batch(i)) for i in range(2)])
    np.testing.assert_array_equal(eval_rows[:64], np.arange(576, 640))
    assert set(eval_rows) == set(range(576, 640))
    np.testing.assert_array_equal(row_ids(source.eval_batch(1)), eval_rows[48:])  # deterministic
    source.close()


def test_batches_are_a_pure_function_of_the_position(tmp_path):
    path = write_store(tmp_path / "s", 640).path
    first = make_source(path)
    batches = [np.asarray(first.next_batch()) for _ in range(30)]  # wraps an epoch (12 batches)
    state = json.loads(json.dumps(first.state()))
    assert state["position"] == 30
    first.close()

    resumed = make_source(path, prefetch_windows=0)  # prefetching does not change the batches
    resumed.restore({**state, "position": 7})
    for i in range(7, 30):
        np.testing.assert_array_equal(np.asarray(resumed.next_batch()), batches[i])
    resumed.restore(state)
    after = np.asarray(resumed.next_batch())
    again = make_source(path)
    again.restore(state)
    np.testing.assert_array_equal(np.asarray(again.next_batch()), after)
    with pytest.raises(store.StoreError, match="seed 0 then, 1 now"):
        make_source(path, seed=1).restore(state)
    other_seed = make_source(path, seed=1)
    assert not np.array_equal(np.asarray(other_seed.next_batch()), batches[0])
    for s in (resumed, again, other_seed):
        s.close()


def test_process_slices_concatenate_to_the_single_process_batch(tmp_path):
    rows = store.open_store(write_store(tmp_path / "s", 640).path)

    def reader(**kwargs):
        return store.BatchReader(rows, batch_size=48, seed=0, shuffle_buffer_chunks=3,
                                 eval_tokens=64, **kwargs)

    whole = reader(process_index=0, process_count=1)
    parts = [reader(process_index=p, process_count=2, prefetch_windows=p) for p in range(2)]
    for r in (whole, *parts):
        r.seek(3)
    for _ in range(15):  # across windows and an epoch boundary
        local = [p.next() for p in parts]
        assert all(x.shape == (24, D) for x in local)
        np.testing.assert_array_equal(np.concatenate(local), whole.next())
    np.testing.assert_array_equal(np.concatenate([p.eval_batch(1) for p in parts]),
                                  whole.eval_batch(1))
    for r in (whole, *parts):
        r.close()


def test_next_batch_is_sharded_over_the_data_axis(tmp_path):
    path = write_store(tmp_path / "s", 640).path
    source = make_source(path, batch_size=48)
    batch = source.next_batch()
    assert batch.shape == (48, D) and batch.dtype == np.float32
    assert batch.sharding == source.sharding
    assert {s.data.shape for s in batch.addressable_shards} == {(6, D)}
    source.close()
    mesh = jax.make_mesh((2, 4), sharding.MESH_AXES)  # data.eval_tokens=0: eval_batches batches
    source = store.ArraySource(data_config(path, eval_tokens=0), batch_size=48, mesh=mesh,
                               rules=sharding.DEFAULT_RULES, eval_batches=2)
    assert source.reader.eval_rows == 96 and source.eval_batch(0).shape == (48, D)
    assert {s.data.shape for s in source.next_batch().addressable_shards} == {(24, D)}
    source.close()
    with pytest.raises(sharding.ConfigError, match="holds out no rows"):
        make_source(path, eval_tokens=0).eval_batch(0)


def test_npy_source_streams_exactly_like_a_store(tmp_path):
    n = 640
    path = write_store(tmp_path / "s", n).path
    npy = tmp_path / "acts.npy"
    np.save(npy, activations(0, n))
    from_store, from_npy = make_source(path), make_source(npy, npy_chunk_rows=CHUNK)
    for _ in range(14):
        np.testing.assert_array_equal(np.asarray(from_npy.next_batch()),
                                      np.asarray(from_store.next_batch()))
    np.testing.assert_array_equal(np.asarray(from_npy.eval_batch(0)),
                                  np.asarray(from_store.eval_batch(0)))
    np.save(tmp_path / "flat.npy", np.zeros(100, np.float32))
    with pytest.raises(store.StoreError, match=r"flat.npy: expected a \[tokens, d\] array"):
        make_source(tmp_path / "flat.npy")
    with pytest.raises(store.StoreError, match="acts.npy: .*d=8 but data.d=4"):
        make_source(npy, d=4)
    for s in (from_store, from_npy):
        s.close()


def test_bfloat16_store_round_trips_and_yields_float32(tmp_path):
    path = write_store(tmp_path / "s", 640, dtype=ml_dtypes.bfloat16).path
    opened = store.open_store(path, expected_dtype="bfloat16")
    assert opened.dtype == ml_dtypes.bfloat16
    expected = activations(0, 640).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(opened.read(0, 640).result(), expected)
    source = make_source(path, eval_tokens=0, batch_size=64)
    rows = np.concatenate([np.asarray(source.next_batch()) for _ in range(10)])
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows[np.lexsort(rows.T[::-1])],
                                  expected.astype(np.float32))
    source.close()


def test_sharded_codec_store_writes_resumes_and_streams(tmp_path):
    path = tmp_path / "s"
    write_store(path, 640, shard_rows=4 * CHUNK, step=80)  # writes straddle chunks and shards
    assert sorted(os.listdir(path / "activations" / "c")) == ["0", "1", "2", "3", "4"]
    opened = store.open_store(path)
    np.testing.assert_array_equal(opened.read(0, 640).result(), activations(0, 640))
    source = make_source(path, batch_size=48)
    seen = np.concatenate([row_ids(source.next_batch()) for _ in range(12)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(576))
    source.close()


def test_harvest_loop_resumes_each_hook_where_it_stopped(tmp_path):
    n, b = 640, 2  # 20 batches of 2 sequences of 16 tokens

    def batches(first=0):
        for s in range(first, n // CTX, b):
            yield s * CTX, tokens(s * CTX, (s + b) * CTX).reshape(b, CTX)

    calls = []

    def activation_fn(token_ids):
        calls.append(token_ids)
        x = token_ids.astype(np.float32)[..., None] * np.ones(D, np.float32)
        return {"resid": x, "mlp": -x}

    def writers():
        return {hook: store.ActivationStoreWriter.create_or_open(
            tmp_path / hook, d=D, dtype="float32", context_length=CTX, n_tokens=n,
            chunk_rows=CHUNK, metadata={"hook": hook}) for hook in ("resid", "mlp")}

    first = writers()
    store.harvest_loop(activation_fn, batches(), first)
    # Simulate a crash that left the two stores at different points.
    for hook, rows in (("resid", 5 * b * CTX), ("mlp", 3 * b * CTX)):
        first[hook].commit(rows)
    calls.clear()
    result = store.harvest_loop(activation_fn, batches(), writers(), progress=False)
    assert len(calls) == n // CTX // b - 3  # batches both stores had were not recomputed
    assert result["tokens_skipped"] == 3 * b * CTX
    for hook, sign in (("resid", 1), ("mlp", -1)):
        opened = store.open_store(tmp_path / hook)
        np.testing.assert_array_equal(opened.token_ids(0, n), tokens(0, n))
        np.testing.assert_array_equal(opened.read(0, n).result()[:, 0], sign * tokens(0, n))


def test_store_read_benchmark_reports_throughput(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, os.path.join("benchmarks", "store_read.py"), "--rows=8192", "--d=64",
         "--chunk_rows=1024", "--batch_size=512", "--batches=20", f"--path={tmp_path / 'b'}",
         "--step_ms=0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["read_rows_per_s"] > 0 and result["write_tokens_per_s"] > 0
    assert result["read_gb_per_s"] > 0


def test_a_run_on_a_store_resumes_to_the_params_of_an_uninterrupted_run(tmp_path):
    from conftest import toy_config
    from saejax import train
    path = write_store(tmp_path / "s", 640).path
    overrides = {"data.source": "store", "data.path": path, "data.d": D,
                 "data.shuffle_buffer_chunks": 3, "data.eval_tokens": 96,
                 "train.batch_size": 48, "train.steps": 20, "evals.eval_batches": 2}
    reference = train.train_and_evaluate(toy_config(**overrides), str(tmp_path / "whole"))
    train.train_and_evaluate(toy_config(**{**overrides, "train.steps": 10}),
                             str(tmp_path / "resumed"))
    resumed = train.train_and_evaluate(toy_config(**overrides), str(tmp_path / "resumed"))
    assert resumed["fvu"] == reference["fvu"]
    whole, again = (train.load_params(str(tmp_path / w)) for w in ("whole", "resumed"))
    for name in whole:
        np.testing.assert_array_equal(again[name], whole[name], err_msg=name)
    gc.collect()  # a dropped source stops its prefetch thread
    assert not [t for t in threading.enumerate() if t.name == "saejax-store-prefetch"]


def test_a_store_with_positions_leaves_rows_out_and_resumes(tmp_path):
    """harvest_loop with a keep mask: only kept tokens are rows, each with its (sequence,
    position) and (document, offset); a crash mid-way resumes to the same store."""
    n_sequences, b = 20, 2
    all_tokens = tokens(0, n_sequences * CTX).reshape(n_sequences, CTX)
    keep = (np.arange(CTX) > 0) & (all_tokens % 5 != 0)   # position 0 and some "special" ids
    row_starts = np.concatenate([[0], np.cumsum(keep.sum(1))])
    where = np.stack(np.broadcast_arrays(np.arange(n_sequences)[:, None], np.arange(CTX)), -1)
    documents = np.stack([where[..., 0] // 3, where[..., 1] + 100], -1)

    def batches():
        for s in range(0, n_sequences, b):
            yield store.TokenBatch(int(row_starts[s]), all_tokens[s:s + b], keep[s:s + b],
                                   where[s:s + b], documents[s:s + b])

    def activation_fn(token_ids):
        return {"resid": token_ids.astype(np.float32)[..., None] * np.ones(D, np.float32)}

    def writer(name):
        return store.ActivationStoreWriter.create_or_open(
            tmp_path / name, d=D, dtype="float32", context_length=CTX,
            n_tokens=int(row_starts[-1]), chunk_rows=CHUNK, positions=True)

    store.harvest_loop(activation_fn, batches(), {"resid": writer("whole")}, progress=False)
    crashed = writer("crashed")
    store.harvest_loop(activation_fn, batches(), {"resid": crashed}, progress=False)
    crashed.commit(int(row_starts[7]) + 3)   # a crash inside a batch
    result = store.harvest_loop(activation_fn, batches(), {"resid": writer("crashed")},
                                progress=False)
    assert result["tokens_skipped"] == row_starts[6]
    n = int(row_starts[-1])
    for name in ("whole", "crashed"):
        opened = store.open_store(tmp_path / name)
        assert opened.has_positions and opened.n_rows == n < n_sequences * CTX
        np.testing.assert_array_equal(opened.positions(0, n), np.argwhere(keep))
        np.testing.assert_array_equal(opened.token_ids(0, n), all_tokens[keep])
        np.testing.assert_array_equal(opened.read(0, n).result()[:, 0], all_tokens[keep])
        np.testing.assert_array_equal(opened.documents(0, n), documents[keep])
        np.testing.assert_array_equal(opened.sequence_positions([n - 1, 0]),
                                      np.argwhere(keep)[[n - 1, 0]])
    with pytest.raises(store.StoreError, match=r"keeps each row's positions; write expects "
                                               r"positions \[rows, 2\]"):
        writer("other").write(0, np.zeros((4, D)), np.zeros(4))
    plain = store.ActivationStoreWriter.create_or_open(
        tmp_path / "plain", d=D, dtype="float32", context_length=CTX, n_tokens=CTX,
        chunk_rows=CHUNK)
    with pytest.raises(store.StoreError, match="created without positions"):
        plain.write(0, np.zeros((4, D)), np.zeros(4), np.zeros((4, 2)), np.zeros((4, 2)))
    # A store without positions keeps the old metadata: no `positions` field at all.
    assert "positions" not in json.loads((tmp_path / "plain" / "metadata.json").read_text())


def _write_parts(writer, parts, *, leader):
    """A `PartWriter` of `parts` fed every row from its first part on, in batches of 40 rows
    that ignore part boundaries."""
    part_writer = store.PartWriter(writer, parts, leader=leader)
    while (row := part_writer.committed_rows) < writer.n_tokens:
        stop = min(row + 40, writer.n_tokens)
        part_writer.write(row, activations(row, stop), tokens(row, stop))
    return part_writer


@pytest.mark.parametrize("shard_rows", [None, 2 * CHUNK])
def test_parts_of_any_number_of_replicas_make_the_store_one_writer_makes(tmp_path, shard_rows):
    """Three replicas plan, then each writes some of its parts (and is killed); a reader sees
    only the committed prefix; one replica then writes what is left: the store is the one
    `write` writes in order, progress.json complete and no parts left."""
    n, path, unit = 40 * CTX, str(tmp_path / "parts"), shard_rows or CHUNK
    open_writer = lambda: store.ActivationStoreWriter.create_or_open(
        path, d=D, dtype="float32", context_length=CTX, n_tokens=n, chunk_rows=CHUNK,
        shard_rows=shard_rows, metadata={"model": "toy", "hook": "resid", "layer": 3})
    writer = open_writer()
    plans = [store.parts.plan({"h": writer}, replica, 3) for replica in range(3)]
    assert all(todo == n for _, todo in plans)
    mine = [parts["h"] for parts, _ in plans]
    assert sorted(sum(mine, [])) == [(u, min(u + unit, n)) for u in range(0, n, unit)]
    assert all(a[-1][1] == b[0][0] for a, b in zip(mine, mine[1:]))  # contiguous runs
    for replica, first_parts in ((1, 2), (2, 1), (0, 1)):
        _write_parts(writer, mine[replica][:first_parts], leader=replica == 0)
    # Replica 0 moved progress.json over its first unit; replicas 1 and 2 left parts files
    # past a gap, which no reader counts.
    assert store.open_store(path, allow_partial=True).n_rows == unit
    assert len(os.listdir(os.path.join(path, "parts"))) == 3
    with pytest.raises(store.StoreError, match="incomplete store"):
        store.open_store(path)

    writer = open_writer()
    (parts, todo), = [store.parts.plan({"h": writer}, 0, 1)]
    assert todo == n - 4 * unit  # four units are committed and not written again
    part_writer = _write_parts(writer, parts["h"], leader=True)
    store.finish_parts({"h": part_writer}, timeout_s=10)
    assert not os.path.exists(os.path.join(path, "parts"))
    assert json.loads(open(os.path.join(path, "progress.json")).read())["complete"]
    opened = store.open_store(path)
    np.testing.assert_array_equal(opened.read(0, n).result(), activations(0, n))
    np.testing.assert_array_equal(opened.token_ids(0, n), tokens(0, n))

def test_todo_parts_are_the_rows_not_done_cut_at_units():
    todo = store.parts.todo_parts
    assert todo(100, 32, [(0, 40), (64, 96)]) == [(40, 64), (96, 100)]
    assert todo(100, 32, [(0, 0)]) == [(0, 32), (32, 64), (64, 96), (96, 100)]
    assert todo(64, 32, [(0, 10), (20, 64)]) == [(10, 20)]
    assert todo(64, 32, [(0, 64)]) == []
