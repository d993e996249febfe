"""How long training steps wait for their batch (rtdlm_data_wait_seconds) with the shards in a
bucket, against the same shards on the local disk.

Run: ./pants run libs/rtdlm-train/benchmarks:bench-data -- --moto "$RTDLM_MOTO" [--latency-ms 20]

Starts moto's S3 server on loopback (build-support/moto-venv.sh prints its command) behind a
proxy that holds each response back by --latency-ms, a bucket's round trip; writes the built-in
corpus as prepare-data shards to a temp dir and to the bucket; then runs the real Trainer on one
and the other in turn, --rounds times, and reports each one's data wait per step beside its step
time. The two sources alternate in one process, so the machine's drift falls on both.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess  # nosec B404 # starts the moto server the user names
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from etils import epath

from rtdlm.ckpt import upload
from rtdlm.data import BYTES, load_data, split_documents, stdlib_documents
from rtdlm.data.shards import Corpus, write_shards
from rtdlm.train import Callback, StepLog, Trainer, resolve
from rtdlm.train.config import for_first_start


class DelayProxy:
    """Forwards loopback TCP to `target`, holding the first bytes of each response back by
    `delay` seconds: one simulated round trip per request, concurrent requests overlapping."""

    def __init__(self, target: int, delay: float) -> None:
        self.target, self.delay = target, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(("127.0.0.1", self.target))
            asked = threading.Event()
            threading.Thread(target=self._up, args=(client, server, asked), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, asked), daemon=True).start()

    @staticmethod
    def _up(source: socket.socket, sink: socket.socket, asked: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                asked.set()
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def _down(self, source: socket.socket, sink: socket.socket, asked: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                if asked.is_set():  # the first bytes of a response
                    asked.clear()
                    time.sleep(self.delay)
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def bucket(moto: str, latency_ms: float, log: Path) -> Iterator[str]:
    """moto on loopback behind the delay, with a bucket; the AWS variables point at it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with log.open("w") as sink:
        server = subprocess.Popen(  # nosec B603 # the command the user named
            [moto, "-H", "127.0.0.1", "-p", str(port)], stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                put = urllib.request.Request(f"http://127.0.0.1:{port}/data", method="PUT")
                with urllib.request.urlopen(put, timeout=2):  # nosec B310 # loopback
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"moto_server did not start; see {log}") from None
                time.sleep(0.2)
        proxy = DelayProxy(port, latency_ms / 1000)
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}"
        os.environ["AWS_REGION"] = "us-east-1"
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # moto takes any
            os.environ[name] = "bench"
        yield "s3://data/shards"
    finally:
        server.terminate()
        server.wait(timeout=30)


class Waits(Callback):
    def __init__(self) -> None:
        self.logs: list[StepLog] = []

    def on_step(self, log: StepLog) -> None:
        self.logs.append(log)


def run(data_path: str, sets: list[str], steps: int) -> list[StepLog]:
    """The Trainer on `data_path`; the step logs after the first (which compiles)."""
    cfg = for_first_start(
        resolve(
            "tiny",
            sets=[
                *sets,
                f"data.path={data_path}",
                f"train.max_steps={steps}",
                f"train.eval_every={steps}",
                "metrics.enabled=false",
            ],
            vocab_size=BYTES.vocab_size,
        )
    )
    waits = Waits()
    data, _ = load_data(data_path)
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(cfg, data, run_dir, [waits], compile_cache=False).run()
    return waits.logs[1:]


def documents(corpus: Corpus) -> Iterator[np.ndarray]:
    return (corpus.document(i) for i in range(corpus.num_documents))


def summary(logs: list[StepLog]) -> dict[str, float]:
    waits = sorted(log.data_wait_seconds for log in logs)
    steps = [log.step_seconds for log in logs]
    return {
        "wait p50 ms": 1000 * statistics.median(waits),
        "wait p95 ms": 1000 * waits[int(0.95 * (len(waits) - 1))],
        "wait max ms": 1000 * waits[-1],
        "step p50 ms": 1000 * statistics.median(steps),
        "wait/step": sum(waits) / sum(steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moto", default=os.environ.get("RTDLM_MOTO"), help="moto_server")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="per request")
    parser.add_argument("--steps", type=int, default=40, help="steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="local and bucket runs each")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE")
    args = parser.parse_args()
    if not args.moto:
        raise SystemExit("name moto_server with --moto (build-support/moto-venv.sh prints it)")
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / "shards"
        splits = split_documents(stdlib_documents())
        parts = {"train": documents(splits.train), "validation": documents(splits.validation)}
        write_shards(local, parts, BYTES.vocab_size, BYTES.index_entry, shard_tokens=1 << 20)
        with bucket(args.moto, args.latency_ms, Path(scratch) / "moto.log") as remote:
            upload(local, epath.Path(remote))
            seen: dict[str, list[StepLog]] = {"local": [], "bucket": []}
            for _ in range(args.rounds):
                seen["local"] += run(str(local), args.sets, args.steps)
                seen["bucket"] += run(remote, args.sets, args.steps)
    print(
        f"tiny preset {' '.join(args.sets)}; {args.latency_ms:g} ms per bucket request; "
        f"{args.rounds} x {args.steps} steps each, alternated"
    )
    results = {name: summary(logs) for name, logs in seen.items()}
    keys = list(results["local"])
    print(f"{'':8}" + "".join(f"{k:>13}" for k in keys))
    for name, values in results.items():
        print(f"{name:8}" + "".join(f"{values[k]:13.3f}" for k in keys))


if __name__ == "__main__":
    main()
