"""Run dirs on S3, against moto's S3 server on a loopback port (build-support/moto-venv.sh):
checkpoints through tensorstore's s3 driver, the one-writer lease, a run killed and resumed
bit for bit, and an export straight from the bucket."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec  # type: ignore[import-untyped]
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import INTERRUPTED, SMALL_RUN, free_port, serving, start_trainer, venv_tool
from etils import epath

from rtdlm.ckpt import CheckpointManager, Retention, committed_steps, restore_params, upload
from rtdlm.data.corpus import stdlib_documents
from rtdlm.train.rundir import LEASE_FILE, RunDirError, RunDirLease
from rtdlm_exporter.main import main as exporter
from rtdlm_trainer.main import main as trainer
from rtdlm_trainer.prepare_data import main as prepare_data

pytestmark = pytest.mark.slow

BUCKET = "rtdlm-test"
SMALL = [*SMALL_RUN, "--max-steps", "20", "--checkpoint-every", "5", "--eval-every", "10"]
SMALL += ["--no-metrics"]


@pytest.fixture(scope="module", autouse=True)
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server with one bucket; the standard AWS variables point everything at it."""
    moto = venv_tool("RTDLM_MOTO", "moto_server command", "moto-venv.sh", "RTDLM_REQUIRE_MOTO")
    port, log = free_port(), tmp_path_factory.mktemp("moto") / "server.log"
    endpoint = f"http://127.0.0.1:{port}"
    make_bucket = urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT")  # moto: unsigned
    variables = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    command = [moto, "-H", "127.0.0.1", "-p", str(port)]
    with serving(command, make_bucket, log, timeout=60), pytest.MonkeyPatch.context() as patch:
        for name, value in variables.items():
            patch.setenv(name, value)
        yield endpoint


def url(name: str) -> str:
    return f"s3://{BUCKET}/{name}"


def test_checkpoints_on_s3_commit_by_their_commit_file_and_come_back_exactly() -> None:
    directory = url("manager")
    params = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4, jnp.bfloat16)}
    with CheckpointManager(directory, Retention(keep_last=2, keep_best=1)) as manager:
        for step, loss in ((1, 2.0), (2, 3.0), (3, 4.0), (4, 5.0)):
            manager.save(
                step, params=params, rng=jax.random.PRNGKey(step), metrics={"eval_loss": loss}
            )
        manager.wait()
        assert manager.steps() == [1, 3, 4]  # the last two and the best
    # a step folder without its commit file (a save killed half way) is no checkpoint
    (epath.Path(directory) / "5" / "params" / "stray").write_text("x")
    assert committed_steps(directory) == [1, 3, 4]
    restored = restore_params(directory)
    assert restored.step == 4
    for name, value in params.items():
        assert np.asarray(restored.params[name]).tobytes() == np.asarray(value).tobytes()
    assert not Path("s3:").exists()  # nothing went to a local folder named after the URL


def test_the_lease_refuses_a_second_writer_and_is_taken_over_only_once_it_lapsed() -> None:
    run_dir = epath.Path(url("lease"))
    with RunDirLease(run_dir, seconds=30):
        with pytest.raises(RunDirError) as refused, RunDirLease(run_dir, seconds=30):
            pass
        assert re.fullmatch(
            rf"run dir {run_dir} is in use by pid {os.getpid()} on \S+ since \S+ \(its lease "
            r"runs \d+ s more unless renewed\): wait for that run to end, or pass another "
            r"--run-dir",
            str(refused.value),
        )
    assert not (run_dir / LEASE_FILE).exists()  # released on the way out
    # a holder killed without releasing: its lease is taken over once it has lapsed
    gone = {"pid": 1, "host": "gone", "since": "2026-01-01T00:00:00+00:00"}
    (run_dir / LEASE_FILE).write_text(json.dumps(gone | {"expires": time.time() + 30}))
    with pytest.raises(RunDirError, match="in use by pid 1 on gone since 2026-01-01"):
        RunDirLease(run_dir, seconds=30).__enter__()
    (run_dir / LEASE_FILE).write_text(json.dumps(gone | {"expires": time.time() - 1}))
    with RunDirLease(run_dir, seconds=0.6) as lease:
        assert json.loads((run_dir / LEASE_FILE).read_text())["pid"] == os.getpid()
        # someone else takes it over: the holder finds out at its next renewal and stops
        (run_dir / LEASE_FILE).write_text(json.dumps(gone | {"expires": time.time() + 30}))
        time.sleep(0.8)
        with pytest.raises(RunDirError, match=f"lost run dir {run_dir} to pid 1 on gone"):
            lease.check()
    assert json.loads((run_dir / LEASE_FILE).read_text())["host"] == "gone"  # left to its owner


def losses(run_dir: str) -> dict[int, float]:
    lines = (epath.Path(run_dir) / "steps.jsonl").read_text().splitlines()
    return {entry["step"]: entry["loss"] for entry in map(json.loads, lines)}


def final_params(run_dir: str) -> list[bytes]:
    checkpoint = restore_params(f"{run_dir}/checkpoints")
    assert checkpoint.step == 20
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(checkpoint.params)]


@pytest.fixture(scope="module")
def uninterrupted() -> str:
    run_dir = url("straight")
    assert trainer([*SMALL, "--run-dir", run_dir]) == 0
    return run_dir


def test_a_run_on_s3_killed_with_sigkill_resumes_bit_for_bit(uninterrupted: str) -> None:
    run_dir = url("killed")
    process = start_trainer(*SMALL, *INTERRUPTED, "--run-dir", run_dir, "--lease-seconds", "4")
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("step    13 |"):  # checkpoint 5 is committed, 10 may be in flight
            break
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    killed_at = time.monotonic()
    # the killed trainer's lease holds the run dir until it lapses: a restart is refused
    refused = start_trainer(*SMALL, "--run-dir", run_dir, "--lease-seconds", "4")
    _, error = refused.communicate(timeout=300)
    if time.monotonic() - killed_at < 4:
        assert refused.returncode == 2, error
        assert (
            error.strip()
            .splitlines()[-1]
            .startswith(f"trainer: error: run dir {run_dir} is in use by pid {process.pid} on ")
        ), error
    time.sleep(max(0.0, killed_at + 4.5 - time.monotonic()))
    resumed = start_trainer(*SMALL, "--run-dir", run_dir, stderr=subprocess.STDOUT)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    # On a loaded machine the kill can land after checkpoint 20 (the killed run goes on to 500
    # steps on the 20-step schedule): its step-20 state is the uninterrupted run's all the same.
    assert re.search(r"resumed from step (5|10|15|20) in s3://", output), output
    resumed_losses = {step: loss for step, loss in losses(run_dir).items() if step <= 20}
    assert resumed_losses == losses(uninterrupted)  # exact floats, every step
    assert final_params(run_dir) == final_params(uninterrupted)
    assert (epath.Path(run_dir) / "data" / "index.json").exists()  # the run's held-out copy
    assert not Path("s3:").exists()


def test_the_exporter_reads_a_run_straight_from_s3(uninterrupted: str, tmp_path: Path) -> None:
    out = tmp_path / "int8"
    command = ["quantize", "--checkpoint", uninterrupted, "--out", str(out)]
    assert exporter([*command, "--eval-tokens", "2048"]) == 0
    artifact = json.loads((out / "artifact.json").read_text())
    assert artifact["source"]["checkpoint"] == f"{uninterrupted}/checkpoints"
    assert artifact["source"]["step"] == 20


class Cuttable:
    """A TCP forwarder to a loopback port: `cut` drops its connections and stops listening (the
    storage is gone), `restore` listens on the same port again."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, 0
        self.sockets: list[socket.socket] = []
        self.listener = socket.socket()
        self.restore()

    def restore(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.listener.close()
        for end in self.sockets:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()
        self.sockets = []


def test_a_bucket_gone_mid_run_is_one_line_and_the_run_resumes_once_it_is_back(
    uninterrupted: str, s3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = url("gone")
    proxy = Cuttable(int(s3.rsplit(":", 1)[1]))
    with monkeypatch.context() as patch:  # the trainer reaches the bucket through the proxy
        patch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        patch.setenv("RTDLM_S3_RETRIES", "2")  # tensorstore's, then botocore's retries
        patch.setenv("AWS_MAX_ATTEMPTS", "2")
        patch.setenv("AWS_RETRY_MODE", "standard")
        process = start_trainer(*SMALL, *INTERRUPTED, "--run-dir", run_dir, "--lease-seconds", "3")
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("step     7 |"):
            break
    deadline = time.monotonic() + 120
    while 5 not in committed_steps(f"{run_dir}/checkpoints"):  # read past the proxy
        assert time.monotonic() < deadline, "checkpoint 5 never committed"
        time.sleep(0.2)
    proxy.cut()
    _, error = process.communicate(timeout=600)
    assert process.returncode == 1, error
    last = error.strip().splitlines()[-1]
    assert last.startswith(f"trainer: error: lost run dir {run_dir}: "), error
    assert last.endswith("run the same command once the storage answers, to resume from the newest")
    assert "Traceback" not in error, error
    proxy.restore()
    time.sleep(3.5)  # the lost trainer could not release its lease: it lapses
    resumed = start_trainer(*SMALL, "--run-dir", run_dir, stderr=subprocess.STDOUT)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    resumed_from = re.search(r"resumed from step (5|10|15) in s3://", output)
    assert resumed_from, output
    # steps.jsonl holds what was flushed before the bucket went (at least every step the
    # resume trained again): each line as the uninterrupted run's
    found, straight = losses(run_dir), losses(uninterrupted)
    assert set(range(int(resumed_from.group(1)) + 1, 21)) <= set(found)
    assert all(found[step] == straight[step] for step in found)
    assert final_params(run_dir) == final_params(uninterrupted)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare-data's shards of some of Python's documentation, several files a split, with a
    trained BPE (a tokenizer file the trainer must fetch too), on disk and in the bucket."""
    root = tmp_path_factory.mktemp("data")
    for i, (_, text) in enumerate(stdlib_documents()[:60]):
        (root / f"doc{i:02d}.txt").write_text(text)
    shards = root / "shards"
    args = [str(root / "*.txt"), "--output", str(shards), "--shard-tokens", "20000"]
    assert prepare_data([*args, "--train-tokenizer", "bpe", "--vocab-size", "300"]) == 0
    upload(shards, epath.Path(url("shards")))
    return shards


@pytest.fixture(scope="module")
def disk_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    run_dir = tmp_path_factory.mktemp("disk-run")
    assert trainer([*SMALL, "--run-dir", str(run_dir), "--set", f"data.path={shards}"]) == 0
    return str(run_dir)


def test_data_in_a_bucket_trains_bit_for_bit_as_the_same_shards_on_disk(
    shards: Path, disk_run: str, tmp_path: Path
) -> None:
    sets = ["--set", f"data.path={url('shards')}", "--set", "data.verify=true"]
    assert trainer([*SMALL, "--run-dir", str(tmp_path), *sets]) == 0
    assert losses(str(tmp_path)) == losses(disk_run)
    assert final_params(str(tmp_path)) == final_params(disk_run)
    # the run keeps the tokenizer it fetched, beside its held-out documents
    kept = tmp_path / "data" / "tokenizer.json"
    assert kept.read_bytes() == (shards / "tokenizer.json").read_bytes()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A GCS emulator (build-support/gcs-venv.sh) with one bucket; STORAGE_EMULATOR_HOST, which
    gcsfs reads, points at it."""
    emulator = venv_tool("RTDLM_GCS", "GCS emulator", "gcs-venv.sh", "RTDLM_REQUIRE_GCS")
    port, log = free_port(), tmp_path_factory.mktemp("gcs") / "server.log"
    endpoint = f"http://127.0.0.1:{port}"
    command = [emulator, "start", "-H", "127.0.0.1", "--port", str(port), "--in-memory"]
    command += ["--default-bucket", BUCKET]
    with serving(command, f"{endpoint}/storage/v1/b/{BUCKET}", log, timeout=60):
        yield endpoint


def test_data_in_a_gcs_bucket_trains_bit_for_bit_as_on_disk(
    shards: Path, disk_run: str, gcs: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs)
    upload(shards, epath.Path(f"gs://{BUCKET}/shards"))
    sets = ["--set", f"data.path=gs://{BUCKET}/shards", "--set", "data.verify=true"]
    assert trainer([*SMALL, "--run-dir", str(tmp_path), *sets]) == 0
    assert losses(str(tmp_path)) == losses(disk_run)
    assert final_params(str(tmp_path)) == final_params(disk_run)


@pytest.mark.parametrize(
    ("damage", "sets", "message"),
    [
        (
            lambda data: data[:-10],
            [],
            r"shard file s3://\S+/train-00000\.tokens\.npy is corrupt \([\d,]+ bytes where its "
            r"header needs [\d,]+\): rerun prepare-data or restore the file",
        ),
        (  # same size: only the checksum tells, and only data.verify reads whole token files
            lambda data: data[:-10] + bytes(b ^ 0xFF for b in data[-10:]),
            ["--set", "data.verify=true"],
            r"shard file s3://\S+/train-00000\.tokens\.npy is corrupt \(SHA-256 differs from "
            r"index\.json\): rerun prepare-data or restore the file",
        ),
        (
            None,
            [],
            r"no index\.json in s3://\S+: point data\.path at a directory written by "
            r"prepare-data",
        ),
    ],
)
def test_bad_shards_in_a_bucket_are_one_line_before_anything_is_written(
    shards: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: Callable[[bytes], bytes] | None,
    sets: list[str],
    message: str,
) -> None:
    copy = epath.Path(url(f"bad-shards/{tmp_path.name}"))
    upload(shards, copy)
    if damage is None:
        (copy / "index.json").unlink()
    else:
        victim = copy / "train-00000.tokens.npy"
        victim.write_bytes(damage(victim.read_bytes()))
    run_dir = tmp_path / "run"
    args = [*SMALL, "--run-dir", str(run_dir), "--set", f"data.path={copy}", *sets]
    assert trainer(args) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(f"trainer: error: {message}", err), err
    assert not run_dir.exists()


def test_shards_in_a_bucket_that_does_not_answer_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries: the line, not the wait
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    run_dir = tmp_path / "run"
    args = [*SMALL, "--run-dir", str(run_dir), "--set", f"data.path={url('unreachable')}"]
    s3fs = fsspec.get_filesystem_class("s3")
    s3fs.clear_instance_cache()  # fsspec keeps the filesystem, with its endpoint, per process
    try:
        assert trainer(args) == 2
    finally:
        s3fs.clear_instance_cache()
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(
        rf"trainer: error: cannot read {url('unreachable')}/index\.json: "
        rf"EndpointConnectionError: Could not connect to the endpoint URL: \"{endpoint}/\S+\": "
        r"check the bucket and the credentials \(AWS_\* variables, AWS_ENDPOINT_URL, or "
        r"Google's application-default credentials\)",
        err,
    ), err
    assert not run_dir.exists()
