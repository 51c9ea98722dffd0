"""The embedded Ray stays on this machine, asks for a token, exports valid gauges, and a job whose
actors cannot be placed fails at submit time.

The Ray runs happen in subprocesses: the test session may already hold its shared Ray in-process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings

import pytest

from continual_kd.errors import CkdError
from continual_kd.runtime.actors import MetricGauges, gauge_name
from continual_kd.runtime.cluster import check_node_ip_address, is_loopback, ray_session

PROMETHEUS_NAME = r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"


# ------------------------------------------------------------------------------------- gauges


@pytest.mark.parametrize("key, name, group", [
    ("ndcg@20", "ckd_ndcg_at_20", "all"),
    ("recall@20", "ckd_recall_at_20", "all"),
    ("recall@20/head", "ckd_recall_at_20", "head"),
    ("recall@20/mid", "ckd_recall_at_20", "mid"),
    ("recall@50/tail", "ckd_recall_at_50", "tail"),
    ("avgpop@20", "ckd_avgpop_at_20", "all"),
    ("coverage@20", "ckd_coverage_at_20", "all"),
    ("plasticity/ndcg@20", "ckd_plasticity_ndcg_at_20", "all"),
    ("stability/recall@20", "ckd_stability_recall_at_20", "all"),
    ("hmean/recall@20/tail", "ckd_hmean_recall_at_20", "tail"),
    ("Forgetting-NDCG@10", "ckd_forgetting_ndcg_at_10", "all"),
    ("parameters", "ckd_parameters", "all"),
])
def test_gauge_name_maps_keys_to_valid_names_and_a_group_tag(key, name, group):
    import re

    assert gauge_name(key) == (name, group)
    assert re.match(PROMETHEUS_NAME, name)


def test_gauges_are_kept_by_ray_and_share_a_name_across_groups():
    from ray.util.metrics import _is_invalid_metric_name

    metrics = {"ndcg@20": 0.25, "recall@20": 0.5, "recall@20/head": 0.75, "recall@20/mid": 0.125,
               "recall@20/tail": float("nan"), "avgpop@20": 12.0, "coverage@20": 0.375,
               "plasticity/ndcg@20": 0.25, "stability/ndcg@20": None, "note": "text", "flag": True}
    gauges = MetricGauges()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = gauges.report("student", metrics)
    assert [str(w.message) for w in caught if "metric" in str(w.message).lower()] == []
    assert done == [("ckd_ndcg_at_20", "all", 0.25), ("ckd_recall_at_20", "all", 0.5),
                    ("ckd_recall_at_20", "head", 0.75), ("ckd_recall_at_20", "mid", 0.125),
                    ("ckd_avgpop_at_20", "all", 12.0), ("ckd_coverage_at_20", "all", 0.375),
                    ("ckd_plasticity_ndcg_at_20", "all", 0.25)]  # NaN, None, text and bools skipped
    assert sorted(gauges._gauges) == ["ckd_avgpop_at_20", "ckd_coverage_at_20", "ckd_ndcg_at_20",
                                      "ckd_plasticity_ndcg_at_20", "ckd_recall_at_20"]
    assert not any(_is_invalid_metric_name(n) for n in gauges._gauges)
    # a later block brings keys the first did not have: new gauges, no error
    assert gauges.report("student", {"stability/ndcg@20": 0.5}) == [("ckd_stability_ndcg_at_20", "all", 0.5)]


# ------------------------------------------------------------------------------ node address


@pytest.mark.parametrize("host, loop", [("127.0.0.1", True), ("127.0.1.1", True), ("::1", True),
                                         ("::ffff:127.0.0.1", True), ("localhost", True), ("0.0.0.0", False),
                                         ("::", False), ("192.0.2.2", False), ("example.org", False)])
def test_is_loopback(host, loop):
    assert is_loopback(host) is loop


@pytest.mark.parametrize("value, says", [("0.0.0.0", "not 0.0.0.0"), ("::", "not ::"),
                                          ("my-laptop", "not an IP address"),
                                          ("203.0.113.7", "not an address of this machine")])
def test_node_ip_address_must_be_one_address_of_this_machine(value, says):
    with pytest.raises(CkdError, match=says):
        check_node_ip_address(value)
    assert check_node_ip_address("127.0.0.1") == "127.0.0.1"


def test_node_ip_address_with_address_is_refused():
    with pytest.raises(CkdError, match="only applies to the embedded Ray"):
        with ray_session(address="127.0.0.1:1", node_ip_address="127.0.0.1"):
            pass


@pytest.mark.parametrize("extra, says", [
    (["--node-ip-address", "0.0.0.0"], "--node-ip-address 0.0.0.0: Ray binds every port"),
    (["--node-ip-address", "127.0.0.1", "--address", "127.0.0.1:1"], "only applies to the embedded Ray"),
])
def test_cli_node_ip_address_errors_are_one_line(cli, tiny_job, extra, says):
    res = cli("submit", tiny_job(), *extra)
    assert res.exit_code == 2, res.output
    assert says in res.output and "Traceback" not in res.output


# ------------------------------------------------------------------- the embedded Ray, for real


class _Script:
    """A Python script run in a subprocess (its own Ray); ``result()`` is the JSON of its last line."""

    def __init__(self, code: str):
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), *sys.path])
        self.proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)

    def result(self, timeout: int = 150) -> dict:
        try:
            stdout, stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            stdout, stderr = self.proc.communicate()
        assert self.proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
        return json.loads(stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


EMBEDDED = """
import json, os, pathlib, urllib.error, urllib.request
import ray, psutil
from continual_kd.errors import CkdError
from continual_kd.runtime.cluster import ray_session

out = {}
os.environ["RAY_AUTH_MODE"] = "disabled"
try:
    with ray_session(num_cpus=1, dashboard_port=PORT):
        pass
except CkdError as e:
    out["disabled"] = str(e)
del os.environ["RAY_AUTH_MODE"]

@ray.remote(num_cpus=1)
class Where:
    def ip(self):
        return ray.util.get_node_ip_address()

with ray_session(num_cpus=1, namespace="t", dashboard_port=PORT) as s:
    out["address"], out["node"], out["dashboard"] = s.address, s.node_ip_address, s.dashboard_url
    out["worker_ip"] = ray.get(Where.remote().ip.remote())  # a worker process exists (and listens)
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    me = psutil.Process()
    procs = {me.pid: me, **{p.pid: p for p in me.children(recursive=True)}}
    for p in psutil.process_iter():
        try:
            if session_dir in " ".join(p.cmdline()):
                procs[p.pid] = p
        except psutil.Error:
            pass
    out["listening"] = []
    for p in procs.values():
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out["listening"].append([p.name(), c.laddr.ip, c.laddr.port])
        except psutil.Error:
            pass
    token = (pathlib.Path.home() / ".ray" / "auth_token").read_text().strip()
    url = f"http://{s.dashboard_url}/api/jobs/"
    out["http"] = []
    for headers in ({}, {"Authorization": f"Bearer {token}"}, {"Authorization": "Bearer wrong"}):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
                out["http"].append(r.status)
        except urllib.error.HTTPError as e:
            out["http"].append(e.code)
out["after"] = ray.is_initialized()
print(json.dumps(out))
"""


PLACEMENT = """
import json, time
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table
from continual_kd.config import ModelSpec
from continual_kd.errors import CkdError
from continual_kd.runtime.actors import spawn_learner
from continual_kd.runtime.cluster import reserve_actors

# two nodes of 2 CPUs and 1 (declared) GPU each: the head and one more
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=2, num_gpus=1)
ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
cluster.wait_for_nodes()
out = {}

def refused(demands, timeout_s=30.0):
    t = time.monotonic()
    try:
        reserve_actors(demands, timeout_s=timeout_s).release()
    except CkdError as e:
        return [str(e), round(time.monotonic() - t, 1)]
    return None

out["two_gpus"] = refused({"teacher:big": {"CPU": 1, "GPU": 2}})
out["three_cpus"] = refused({"student": {"CPU": 3, "GPU": 0}})
out["three_gpus"] = refused({f"teacher:t{i}": {"CPU": 1, "GPU": 1} for i in range(3)})
out["groups_after_instant"] = len(placement_group_table())  # refused before any reservation was made
# each fits a node and the totals fit (4 CPU), but 1.5 + 1.5 + 1 cannot be packed onto 2 + 2
out["fragmented"] = refused({"teacher:a": {"CPU": 1.5}, "teacher:b": {"CPU": 1.5}, "student": {"CPU": 1}},
                            timeout_s=2.0)
out["after_refusals"] = ray.available_resources().get("CPU")

specs = {f"teacher:g{i}": ModelSpec(name=f"g{i}", resources={"num_cpus": 1, "num_gpus": 1}) for i in range(2)}
specs["student"] = ModelSpec(name="student", resources={"num_cpus": 0, "num_gpus": 0})
demands = {n: {"CPU": s.resources.num_cpus, "GPU": s.resources.num_gpus} for n, s in specs.items()}
with reserve_actors(demands, timeout_s=30) as res:
    out["strategies"] = {n: (None if st is None else st.placement_group_bundle_index)
                         for n, st in res.strategies.items()}
    table = placement_group_table(res.group)
    out["bundle_nodes"] = len(set(table["bundles_to_node_id"].values()))
    actors = {n: spawn_learner(n, specs[n], 0, "cpu", scheduling_strategy=res.strategies[n])
              for n in ("teacher:g0", "teacher:g1")}
    out["ping"] = sorted(r["name"] for r in ray.get([a.ping.remote() for a in actors.values()], timeout=60))
    out["gpus_left"] = ray.available_resources().get("GPU", 0.0)
    for a in actors.values():
        ray.kill(a)
time.sleep(0.5)
out["released"] = ray.available_resources().get("GPU", 0.0)
ray.shutdown()
cluster.shutdown()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def ray_scripts():
    """Both Ray scenarios, started at once (each mostly waits on Ray's start-up)."""
    port = _free_port()
    scripts = {"embedded": _Script(EMBEDDED.replace("PORT", str(port))), "placement": _Script(PLACEMENT),
               "port": port}
    yield scripts
    for name in ("embedded", "placement"):
        if scripts[name].proc.poll() is None:
            scripts[name].proc.kill()
            scripts[name].proc.wait()


@pytest.mark.slow
def test_embedded_ray_listens_on_loopback_only_and_requires_the_token(ray_scripts):
    port = ray_scripts["port"]
    out = ray_scripts["embedded"].result()
    assert out["disabled"].startswith("RAY_AUTH_MODE=disabled: ckd's embedded Ray always runs with token")
    assert out["node"] == "127.0.0.1" and out["worker_ip"] == "127.0.0.1"
    assert out["address"].startswith("127.0.0.1:") and out["dashboard"] == f"127.0.0.1:{port}"
    listening = out["listening"]
    names = {name for name, _, _ in listening}
    # GCS, raylet, dashboard, the agents and the worker all listen somewhere: all of it on loopback
    assert {"gcs_server", "raylet"} <= names and len(listening) >= 8, listening
    gcs_port = int(out["address"].rsplit(":", 1)[1])
    assert gcs_port in {p for _, _, p in listening} and port in {p for _, _, p in listening}
    exposed = [entry for entry in listening if not is_loopback(entry[1])]
    assert exposed == []
    assert out["http"] == [401, 200, 403]  # no token, the token, a wrong one
    assert out["after"] is False  # the session shut down the Ray it started


@pytest.mark.slow
def test_actors_are_reserved_per_node_or_refused_at_submit_time(ray_scripts):
    out = ray_scripts["placement"].result()
    msg, took = out["two_gpus"]
    assert msg.startswith("the actor teacher:big asks for CPU=1 GPU=2 but no node of the Ray cluster has that much")
    assert "(nodes: CPU=2 GPU=1, CPU=2 GPU=1)" in msg
    assert msg.endswith("lower the resources.num_cpus/num_gpus of teacher:big in the job file or run on a cluster "
                        "with a larger node (--address)")
    assert took < 15.0  # refused at once, not after the 30 s timeout
    assert out["three_cpus"][0].startswith("the actor student asks for CPU=3 but no node")
    assert out["three_gpus"][0].startswith("the job's actors need 3 GPU (teacher:t0=1, teacher:t1=1, teacher:t2=1) "
                                           "but the Ray cluster has 2")
    msg, took = out["fragmented"]
    assert msg.startswith("the job's actors teacher:a (CPU=1.5), teacher:b (CPU=1.5), student (CPU=1) could not be "
                          "placed on the Ray cluster within 2 s")
    assert took >= 2.0  # this one waited its timeout: a reservation was tried, then removed
    assert out["groups_after_instant"] == 0
    assert out["after_refusals"] == 4.0  # a refused reservation holds nothing
    assert out["strategies"] == {"teacher:g0": 0, "teacher:g1": 1, "student": None}
    assert out["bundle_nodes"] == 2  # one GPU bundle per 1-GPU node
    assert out["ping"] == ["g0", "g1"]
    assert out["gpus_left"] == 0.0
    assert out["released"] == 2.0
