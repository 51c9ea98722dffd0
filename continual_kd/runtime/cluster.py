"""Where the job runs: an embedded local Ray (default) or a running cluster (``--address``).

The embedded Ray binds its dashboard to 127.0.0.1 and keeps Ray's token authentication on; the
token is in ``~/.ray/auth_token`` (send it as ``Authorization: Bearer <token>`` to the dashboard API).
"""

from __future__ import annotations

import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass

import ray

from ..errors import CkdError


@dataclass
class RaySession:
    started_here: bool  # True: we started an embedded Ray and will shut it down
    address: str
    dashboard_url: str | None


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast on an unreachable ``host:port`` instead of letting Ray retry for minutes."""
    m = re.fullmatch(r"(?:ray://)?\[?([^\]\s/]+?)\]?:(\d+)", address.strip())
    if not m:
        if address in ("auto", "local"):
            return
        raise CkdError(f"--address {address!r}: expected host:port of a Ray head (e.g. 127.0.0.1:6379) or 'auto'")
    host, port = m.group(1), int(m.group(2))
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise CkdError(
            f"--address {address}: no Ray cluster answers there ({e.strerror or e}); start one with "
            f"`ray start --head` (see cluster/README.md) or omit --address to use an embedded local Ray"
        ) from None


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, namespace: str = "ckd",
                dashboard_host: str = "127.0.0.1", runtime_env: dict | None = None):
    """Yield a RaySession; shut Ray down at the end only if this call started it."""
    if address:
        check_address(address)
    if ray.is_initialized():  # e.g. a test session's shared Ray, or a driver inside `ray job submit`
        ctx = ray.get_runtime_context()
        yield RaySession(False, ctx.gcs_address, None)
        return
    if address:
        try:
            info = ray.init(address=address, namespace=namespace, runtime_env=runtime_env,
                            log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError) as e:
            raise CkdError(f"--address {address}: could not join the Ray cluster ({str(e).splitlines()[0]}); "
                           f"check RAY_AUTH_MODE=token and the token in ~/.ray/auth_token match the cluster's") from None
        started = False
    else:
        # Ray's default for a local cluster it starts is token auth on; keep it (never set disabled)
        info = ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host=dashboard_host,
                        namespace=namespace, log_to_driver=False, configure_logging=False)
        started = True
    try:
        yield RaySession(started, info.address_info.get("gcs_address", address or ""), info.dashboard_url or None)
    finally:
        if started:
            ray.shutdown()


def check_resources(demands: dict[str, dict[str, float]]) -> None:
    """Refuse a job whose actors cannot all be placed at once (they would wait forever)."""
    total = ray.cluster_resources()
    for res in ("CPU", "GPU"):
        need = sum(d.get(res, 0.0) for d in demands.values())
        have = total.get(res, 0.0)
        if need > have + 1e-9:
            who = ", ".join(f"{n}={d.get(res, 0)}" for n, d in demands.items() if d.get(res, 0))
            key = "num_cpus" if res == "CPU" else "num_gpus"
            raise CkdError(
                f"the job's actors need {need:g} {res} ({who}) but the Ray cluster has {have:g}; lower "
                f"resources.{key} of the teachers/student or run on a larger cluster with --address"
            )
