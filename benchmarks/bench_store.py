"""The cost of a remote store: the demo job with its store on the local disk vs at an s3:// URL.

    python benchmarks/bench_store.py          # about 6 minutes on a 2-core CPU

The S3 is moto's server on loopback, in this process (an object store on the same machine, as a
MinIO beside the job would be): it measures specdraft's own work for a remote store (fetching into
the mirror, publishing file by file, conditional-write locks), not a network.
1. `specdraft run` of the demo, cold, with `store=<dir>` and with `store=s3://…`, alternating
   (`--repeats` times): wall seconds of the whole command.
2. The same command again on each store (every stage cached): wall seconds.
3. The S3 run again from an empty mirror (another machine reusing the store): every artifact the
   run needs is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from specdraft.pipeline.engine.machine import describe_machine

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "store_cpu.json"


def timed_run(store: str, root: Path, mirror: str, env: dict) -> float:
    command = ["specdraft", "run", f"store={store}", "--out", str(root / "out")]
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**env, "SPECDRAFT_CACHE": mirror}, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()

    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "endpoint_url": f"http://{host}:{port}",
        "key": "bench",
        "secret": "bench",
        "client_kwargs": {"region_name": "eu-west-1"},
    }
    env = {**os.environ, "FSSPEC_S3": json.dumps(options)}
    fs = s3fs.S3FileSystem(**options)
    seconds: dict[str, list[float]] = {k: [] for k in ("local", "s3")}
    warm: dict[str, list[float]] = {k: [] for k in ("local", "s3", "s3_empty_mirror")}
    stored_bytes = 0
    try:
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
                root = Path(tmp)
                bucket = f"bench-{uuid.uuid4().hex[:8]}"
                fs.mkdir(bucket)
                stores = {"local": str(root / "store"), "s3": f"s3://{bucket}/store"}
                mirror = str(root / "mirror")
                for kind, store in stores.items():
                    seconds[kind].append(timed_run(store, root / kind, mirror, env))
                for kind, store in stores.items():
                    warm[kind].append(timed_run(store, root / kind, mirror, env))
                warm["s3_empty_mirror"].append(
                    timed_run(stores["s3"], root / "s3", str(root / "mirror2"), env)
                )
                fs.invalidate_cache()
                stored_bytes = sum(fs.du(f"{bucket}/store", total=False).values())
    finally:
        server.stop()
    medians = {k: statistics.median(v) for k, v in seconds.items()}
    warm_medians = {k: statistics.median(v) for k, v in warm.items()}
    result = {
        "benchmark": "demo job with a local store vs an s3:// store (moto on loopback)",
        "command": "python benchmarks/bench_store.py",
        "machine": describe_machine(),
        "cold_seconds": seconds,
        "cold_median_seconds": medians,
        "cold_s3_over_local": medians["s3"] / medians["local"],
        "cached_seconds": warm,
        "cached_median_seconds": warm_medians,
        "s3_store_bytes": stored_bytes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
