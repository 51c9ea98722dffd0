"""Where the job runs: an embedded local Ray (default) or a running cluster (``--address``).

The embedded Ray is reachable from this machine only: its node address is 127.0.0.1, so the GCS,
raylet, object manager, metrics export, dashboard agent, runtime-env agent and workers all listen
on loopback, and the dashboard on ``dashboard_host`` (127.0.0.1 by default). ``node_ip_address``
exposes it on one of this machine's addresses instead (an explicit choice; the CLI warns). Token
authentication is always on (``RAY_AUTH_MODE=token``); the token is in ``~/.ray/auth_token`` (send
it as ``Authorization: Bearer <token>`` to the dashboard API).

The job's actors are reserved as one placement group (``reserve_actors``): a job that cannot be
placed fails before any model is built, instead of waiting forever for resources.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field

import ray

from ..errors import CkdError

LOOPBACK = "127.0.0.1"
AUTH_MODE_ENV = "RAY_AUTH_MODE"


@dataclass
class RaySession:
    started_here: bool  # True: we started an embedded Ray and will shut it down
    address: str
    dashboard_url: str | None
    node_ip_address: str | None = None


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast on an unreachable ``host:port`` instead of letting Ray retry for minutes."""
    m = re.fullmatch(r"(?:ray://)?\[?([^\]\s/]+?)\]?:(\d+)", address.strip())
    if not m:
        if address in ("auto", "local"):
            return
        raise CkdError(f"--address {address!r}: expected host:port of a Ray head (e.g. 127.0.0.1:6379) or 'auto'")
    host, port = m.group(1), int(m.group(2))
    if not 1 <= port <= 65535:
        raise CkdError(f"--address {address!r}: port {port} is not a TCP port (1–65535); a Ray head listens on "
                       f"6379 unless told otherwise")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise CkdError(
            f"--address {address}: no Ray cluster answers there ({e.strerror or e}); start one with "
            f"`ray start --head` (see cluster/README.md) or omit --address to use an embedded local Ray"
        ) from None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, an IPv4-mapped loopback (``::ffff:127.0.0.1``) or ``localhost``."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def check_node_ip_address(value: str) -> str:
    """The embedded Ray's node address: one IP of this machine (every Ray port binds to it)."""
    try:
        ip = ipaddress.ip_address(value.strip())
    except ValueError:
        raise CkdError(f"--node-ip-address {value!r}: not an IP address; give one of this machine's addresses, "
                       f"e.g. {LOOPBACK} (the default, this machine only)") from None
    if ip.is_unspecified:
        raise CkdError(f"--node-ip-address {value}: Ray binds every port to the node address, so it must be one of "
                       f"this machine's addresses (e.g. its LAN address), not {value}")
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((str(ip), 0))
    except OSError as e:
        raise CkdError(f"--node-ip-address {value}: not an address of this machine ({e.strerror or e}); "
                       f"give one it has (see `ip addr`) or omit the option") from None
    return str(ip)


@contextmanager
def _node_address_is_loopback():
    """Let Ray keep 127.0.0.1 as the node address (it otherwise swaps loopback for the network address).

    Ray already does this on macOS and Windows (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` unset); the
    flag is read when ``ray.init`` resolves the node address, so it is lowered only for that call.
    """
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def _require_token_auth() -> None:
    """Token authentication for the embedded Ray, set explicitly (not left to Ray's default)."""
    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is not None and mode.strip().lower() != "token":
        raise CkdError(f"{AUTH_MODE_ENV}={mode}: ckd's embedded Ray always runs with token authentication; unset "
                       f"{AUTH_MODE_ENV} (or set it to token) and run again")
    if mode is None:
        os.environ[AUTH_MODE_ENV] = "token"  # inherited by every Ray process started from here
        from ray._raylet import Config

        Config.initialize("")  # this process re-reads RAY_AUTH_MODE (what Ray does for its own default)


def _token_auth_on() -> bool:
    from ray._raylet import AuthenticationMode, get_authentication_mode

    return get_authentication_mode() == AuthenticationMode.TOKEN


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, namespace: str = "ckd",
                dashboard_host: str = LOOPBACK, runtime_env: dict | None = None,
                node_ip_address: str | None = None, dashboard_port: int | None = None):
    """Yield a RaySession; shut Ray down at the end only if this call started it.

    With no ``address``, an embedded Ray on ``node_ip_address`` (default 127.0.0.1: loopback only)
    with token authentication on.
    """
    if address and node_ip_address:
        raise CkdError("--node-ip-address only applies to the embedded Ray; drop it when using --address")
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
        node_ip = check_node_ip_address(node_ip_address) if node_ip_address else LOOPBACK
        _require_token_auth()
        # address "local": always a new embedded cluster, never one found on this machine (RAY_ADDRESS,
        # a `ray start` head): joining a cluster is what --address is for
        kwargs = dict(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host=dashboard_host,
                      namespace=namespace, log_to_driver=False, configure_logging=False, _node_ip_address=node_ip)
        if dashboard_port is not None:
            kwargs["dashboard_port"] = dashboard_port
        if is_loopback(node_ip):
            with _node_address_is_loopback():
                info = ray.init(**kwargs)
        else:
            info = ray.init(**kwargs)
        started = True
        got = info.address_info.get("node_ip_address", "")
        problem = None
        if got != node_ip and not (is_loopback(node_ip) and is_loopback(got)):
            problem = (f"Ray {ray.__version__} put the embedded cluster on {got} instead of {node_ip}, so it would be "
                       f"reachable from the network; install the Ray version pinned in pyproject.toml")
        elif not _token_auth_on():
            problem = (f"Ray {ray.__version__} started the embedded cluster without token authentication; install "
                       f"the Ray version pinned in pyproject.toml")
        if problem:
            ray.shutdown()
            raise CkdError(problem)
    try:
        yield RaySession(started, info.address_info.get("gcs_address", address or ""), info.dashboard_url or None,
                         info.address_info.get("node_ip_address"))
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------------ placement


def _fmt_demand(d: dict[str, float]) -> str:
    return " ".join(f"{k}={d.get(k, 0):g}" for k in ("CPU", "GPU") if d.get(k, 0)) or "nothing"


def _alive_nodes() -> list[dict[str, float]]:
    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def _nodes_text(nodes: list[dict[str, float]]) -> str:
    return ", ".join(f"CPU={n.get('CPU', 0):g} GPU={n.get('GPU', 0):g}" for n in nodes) or "none"


PLACEMENTS = {"pack": "PACK", "spread": "SPREAD", "strict_pack": "STRICT_PACK", "strict_spread": "STRICT_SPREAD"}


def _fits(node: dict[str, float], d: dict[str, float]) -> bool:
    return all(node.get(r, 0.0) + 1e-9 >= d.get(r, 0.0) for r in ("CPU", "GPU"))


def check_resources(demands: dict[str, dict[str, float]], placement: str = "pack") -> None:
    """Refuse a job whose actors cannot be placed: one actor larger than every node, or more than the cluster,
    or (``strict_pack``) more than any one node, or (``strict_spread``) more actors than nodes that hold one.

    Necessary conditions only, checked at once; ``reserve_actors`` settles the rest by placing them.
    """
    nodes = _alive_nodes()
    for name, d in demands.items():
        if not any(all(node.get(r, 0.0) + 1e-9 >= d.get(r, 0.0) for r in ("CPU", "GPU")) for node in nodes):
            raise CkdError(
                f"the actor {name} asks for {_fmt_demand(d)} but no node of the Ray cluster has that much "
                f"(nodes: {_nodes_text(nodes)}); lower the resources.num_cpus/num_gpus of {name} in the job "
                f"file or run on a cluster with a larger node (--address)"
            )
    for res in ("CPU", "GPU"):
        need = sum(d.get(res, 0.0) for d in demands.values())
        have = sum(node.get(res, 0.0) for node in nodes)
        if need > have + 1e-9:
            who = ", ".join(f"{n}={d.get(res, 0):g}" for n, d in demands.items() if d.get(res, 0))
            key = "num_cpus" if res == "CPU" else "num_gpus"
            raise CkdError(
                f"the job's actors need {need:g} {res} ({who}) but the Ray cluster has {have:g}; lower "
                f"resources.{key} of the teachers/student or run on a larger cluster with --address"
            )
    asking = {n: d for n, d in demands.items() if any(v > 0 for v in d.values())}
    if placement == "strict_pack" and asking:
        total = {r: sum(d.get(r, 0.0) for d in asking.values()) for r in ("CPU", "GPU")}
        if not any(_fits(node, total) for node in nodes):
            raise CkdError(
                f"runtime.placement strict_pack puts all the job's actors ({_fmt_demand(total)}) on one node, but no "
                f"node has that much (nodes: {_nodes_text(nodes)}); use placement: pack, or lower the resources"
            )
    if placement == "strict_spread" and asking:
        # a bundle per node: every actor needs a node of its own that holds it
        holders = [sum(_fits(node, d) for node in nodes) for d in asking.values()]
        if len(asking) > len(nodes) or min(holders) < len(asking):
            raise CkdError(
                f"runtime.placement strict_spread puts each of the job's {len(asking)} actors on its own node, but "
                f"the Ray cluster has {len(nodes)} node(s) (nodes: {_nodes_text(nodes)}) and not every actor fits "
                f"{len(asking)} of them; use placement: spread, or add nodes (`ckd cluster up --workers N`)"
            )


@dataclass
class Reservation:
    """The job's actors reserved as one placement group: ``strategies[name]`` places actor ``name``."""

    group: object | None  # ray.util.placement_group.PlacementGroup; None when no actor asks for anything
    strategies: dict[str, object | None] = field(default_factory=dict)

    def release(self) -> None:
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
            self.group = None

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def reserve_actors(demands: dict[str, dict[str, float]], timeout_s: float = 60.0,
                   strategy: str = "pack") -> Reservation:
    """Reserve one bundle per actor (``{"CPU": x, "GPU": y}``) or fail in one sentence.

    PACK puts the bundles on as few nodes as fit (block data and knowledge stay node-local), and
    across nodes when they do not. An actor larger than every node, or a job larger than the
    cluster, fails at once; anything else that is not placed within ``timeout_s`` (fragmented
    nodes, resources held by other jobs) fails then, and the partial reservation is removed.
    Actors that ask for nothing get no bundle (strategy None: Ray's default). ``strategy`` is the job
    file's ``runtime.placement`` (``pack``, ``spread``, ``strict_pack``, ``strict_spread``; Ray's upper-case
    names are accepted too): SPREAD puts the bundles on as many nodes as possible.
    """
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    placement = strategy.lower()
    if placement not in PLACEMENTS:
        raise CkdError(f"runtime.placement: {strategy!r} is not a placement; use one of {', '.join(PLACEMENTS)}")
    check_resources(demands, placement)
    names = [n for n, d in demands.items() if any(v > 0 for v in d.values())]
    strategies: dict[str, object | None] = {n: None for n in demands}
    if not names:
        return Reservation(None, strategies)
    bundles = [{r: float(v) for r, v in demands[n].items() if v > 0} for n in names]
    group = placement_group(bundles, strategy=PLACEMENTS[placement])
    if not group.wait(timeout_seconds=timeout_s):
        remove_placement_group(group)
        who = ", ".join(f"{n} ({_fmt_demand(demands[n])})" for n in names)
        how = "" if placement == "pack" else f" with placement {placement}"
        raise CkdError(
            f"the job's actors {who} could not be placed on the Ray cluster{how} within {timeout_s:g} s (nodes: "
            f"{_nodes_text(_alive_nodes())}, some may be busy with other jobs); lower the resources of the "
            f"teachers/student, free the cluster, or add nodes"
        )
    for i, n in enumerate(names):
        strategies[n] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
    return Reservation(group, strategies)
