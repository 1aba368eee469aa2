"""The one reader of specdraft's environment variables: each is read here, when it is used (never
at import), and checked like a config value. A bad value raises InputError naming the variable and
what it takes; `environment_problems` lists every bad one at once, so that a job is refused before
any stage runs (config.load_job adds them to the job's problems, dag.execute checks them again).

| variable | what | takes |
|---|---|---|
| SPECDRAFT_STORE | the artifact store when the job names none | a directory or fsspec URL |
| SPECDRAFT_CACHE | this machine's mirror of a remote store | a directory |
| SPECDRAFT_LOCK_LEASE | seconds a stage lock lasts unrenewed (renewed every third) | 1 to 86400 |
| SPECDRAFT_VERIFY_HASH_BYTES | artifacts up to this many bytes: hashed whole on reuse | >= 0 |
| SPECDRAFT_PLACEMENT_TIMEOUT | seconds to wait for a Ray placement group | > 0, finite |
| SPECDRAFT_VLLM_ENV | serve-check's vLLM environment | a directory |
| SPECDRAFT_VLLM_MEMORY_FRACTION | share of GPU memory serve-check's vLLM takes | (0, 1] |
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from specdraft.errors import InputError

DEFAULT_LEASE_SECONDS = 60.0
MAX_LEASE_SECONDS = 86400.0  # no lock may claim more (lock.py bounds a record's expiry by it)
DEFAULT_HASH_ON_REUSE_BYTES = 64 * 2**20
DEFAULT_PLACEMENT_TIMEOUT = 600.0
DEFAULT_VLLM_MEMORY_FRACTION = 0.15


def _raw(name: str) -> str | None:
    """The variable's value, None when unset or empty (an empty variable means its default)."""
    value = os.environ.get(name)
    return value if value and value.strip() else None


def _number(name: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    low_ok = value > lo if lo_open else value >= lo
    if not (math.isfinite(value) and low_ok and value <= hi):
        bound = f"{'>' if lo_open else 'at least'} {lo:g}" + (
            f" and at most {hi:g}" if math.isfinite(hi) else ", finite"
        )
        raise InputError(
            f"${name}={_shown(raw)}: expected a number {bound} (unset it for the default "
            f"{default:g})"
        )
    return value


def _integer(name: str, default: int, lo: int, hi: int) -> int:
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise InputError(
            f"${name}={_shown(raw)}: expected a whole number of bytes, {lo} or more (unset it "
            f"for the default {default})"
        )
    return value


def _path_text(name: str) -> str | None:
    raw = _raw(name)
    if raw is not None and "\0" in raw:
        raise InputError(f"${name}: holds a NUL character; give a path")
    return raw


def _shown(raw: str) -> str:
    return repr(raw if len(raw) <= 40 else raw[:37] + "...")


def store_location() -> str:
    return _path_text("SPECDRAFT_STORE") or str(Path.home() / ".cache" / "specdraft" / "store")


def mirror_root() -> Path:
    env = _path_text("SPECDRAFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specdraft" / "mirror"


def lock_lease() -> float:
    return _number("SPECDRAFT_LOCK_LEASE", DEFAULT_LEASE_SECONDS, 1.0, MAX_LEASE_SECONDS)


def hash_on_reuse_bytes() -> int:
    return _integer("SPECDRAFT_VERIFY_HASH_BYTES", DEFAULT_HASH_ON_REUSE_BYTES, 0, 2**62)


def placement_timeout() -> float:
    return _number(
        "SPECDRAFT_PLACEMENT_TIMEOUT", DEFAULT_PLACEMENT_TIMEOUT, 0.0, math.inf, lo_open=True
    )


def vllm_env(default: Path) -> Path:
    env = _path_text("SPECDRAFT_VLLM_ENV")
    return Path(env).expanduser() if env else default


def vllm_memory_fraction() -> float:
    return _number(
        "SPECDRAFT_VLLM_MEMORY_FRACTION", DEFAULT_VLLM_MEMORY_FRACTION, 0.0, 1.0, lo_open=True
    )


RAY_CONNECT_SECONDS = 10.0


def check_ray_address(address: str, source: str) -> None:
    """InputError unless Ray's `address` (from `source`, e.g. "$RAY_ADDRESS") names a host and
    port that answer within RAY_CONNECT_SECONDS: Ray itself retries an unreachable address for
    minutes. `auto` and `local` are Ray's to resolve."""
    if address in ("", "auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is no number
        host, port = None, None
    fix = f"fix it or unset it ({source})" + (
        "; without an address specdraft starts a Ray instance of its own"
        if source == "$RAY_ADDRESS"
        else ""
    )
    if not host or port is None:
        raise InputError(f"Ray address {address!r} from {source}: expected HOST:PORT; {fix}")
    try:
        socket.create_connection((host, port), timeout=RAY_CONNECT_SECONDS).close()
    except OSError as err:
        why = err.strerror or type(err).__name__
        if isinstance(err, socket.gaierror):
            why = f"the host name does not resolve: {why}"
        elif isinstance(err, TimeoutError):
            why = f"no answer within {RAY_CONNECT_SECONDS:g}s"
        raise InputError(
            f"Ray address {address!r} from {source}: cannot reach {host}:{port} ({why}); is the "
            f"cluster up? Otherwise {fix}"
        ) from None


CHECKS = (
    store_location,
    mirror_root,
    lock_lease,
    hash_on_reuse_bytes,
    placement_timeout,
    lambda: vllm_env(Path()),
    vllm_memory_fraction,
)


def environment_problems() -> list[str]:
    """What is wrong with every SPECDRAFT_* variable set, one line each; [] when nothing is."""
    problems = []
    for check in CHECKS:
        try:
            check()
        except InputError as err:
            problems.append(str(err))
    return problems


def check_environment() -> None:
    """InputError listing every bad SPECDRAFT_* variable (before any stage runs)."""
    problems = environment_problems()
    if problems:
        raise InputError("bad environment:\n" + "\n".join(f"  - {p}" for p in problems))
