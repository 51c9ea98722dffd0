"""Beyond one node: placement over a real multi-node Ray cluster on this machine, the device rule, the
Jobs API (`ckd cluster up` → `ckd submit --address http://…` → `ckd evaluate`), and the job's metrics
read back from the Prometheus export endpoints.

The clusters run in subprocesses (the test session holds its shared Ray in-process), each under a temp
folder of its own, and are stopped — by process id, found by that folder — even when a test fails.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from continual_kd.config import load_job
from continual_kd.errors import CkdError
from continual_kd.runtime.actors import actor_device
from continual_kd.runtime.jobs import exit_status, is_jobs_address, submit_job

ROOT = Path(__file__).resolve().parents[1]

TWO_TEACHERS = """
name: {name}
seed: 0
source:
  dataset: synthetic
  store: {root}/stores/tiny
  synthetic: {{users: 150, items: 120, interactions: 3000, periods: 3, seed: 1}}
blocks: {{base_fraction: 0.5, incremental: 2}}
teachers:
  - {{name: mf16, backbone: mf, dim: 16, train: {{epochs_base: 6, epochs_block: 3, batch_size: 512}},
     resources: {{num_cpus: 1}}}}
  - {{name: mf32, backbone: mf, dim: 32, train: {{epochs_base: 6, epochs_block: 3, batch_size: 512}},
     resources: {{num_cpus: 1}}}}
student:
  dim: 8
  train: {{epochs_base: 6, epochs_block: 3, batch_size: 512}}
  resources: {{num_cpus: {student_cpus}}}
distill: {{terms: [{{name: rrd, weight: 0.01, k: 10, pool: 30, uninteresting: 10}}]}}
eval: {{ks: [10, 20]}}
snapshots: {{dir: {root}/runs/{name}}}
runtime: {{placement: {placement}}}
"""


def _job(tmp: Path, name: str, placement: str = "pack", student_cpus: float = 0) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(TWO_TEACHERS.format(name=name, root=tmp, placement=placement, student_cpus=student_cpus))
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "CKD_DEBUG")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["COLUMNS"] = "160"
    return env


def _sweep(temp_dir: str) -> int:
    """Stop whatever a test's cluster left running (its processes name ``temp_dir``), then remove it."""
    from continual_kd.runtime.local_cluster import _stop, cluster_processes

    n = _stop(cluster_processes(temp_dir)) if temp_dir else 0
    shutil.rmtree(temp_dir, ignore_errors=True)
    return n


# ------------------------------------------------------------------------------------ without a cluster


@pytest.mark.parametrize("requested, gpus, cuda, device", [
    ("auto", 0, False, "cpu"), ("auto", 0, True, "cpu"), ("auto", 1, True, "cuda"), ("auto", 0.5, True, "cuda"),
    ("cuda", 0.25, True, "cuda"), ("cpu", 1, True, "cpu"), ("cpu", 0, False, "cpu"),
])
def test_actor_device_puts_a_model_on_its_gpu(requested, gpus, cuda, device):
    assert actor_device(requested, gpus, "the model mf", cuda) == device


def test_a_gpu_that_is_not_there_is_one_error_never_a_cpu_fallback():
    with pytest.raises(CkdError) as e:
        actor_device("auto", 0.5, "the model mf", cuda_available=False, where=" on node 10.0.0.7")
    msg = str(e.value)
    assert msg.startswith("the model mf asks for resources.num_gpus 0.5 but its process on node 10.0.0.7 sees no "
                          "CUDA device (torch ")
    assert msg.endswith("install a CUDA build of torch on the GPU nodes, or set resources.num_gpus: 0 (or "
                        "runtime.device: cpu) to train it on the CPU")
    with pytest.raises(CkdError, match=r"^runtime.device is cuda but the model mf asks for no GPU"):
        actor_device("cuda", 0, "the model mf", cuda_available=True)


def test_cuda_for_a_model_without_gpu_is_refused_before_ray_starts(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _job(tmp_path, "nogpu")
    path.write_text(path.read_text().replace("runtime: {placement: pack}", "runtime: {device: cuda}"))
    res = cli("submit", path)
    assert res.exit_code == 2, res.output
    assert "runtime.device is cuda but the model mf16 asks for no GPU (resources.num_gpus 0)" in res.output
    assert "Traceback" not in res.output


def test_placement_is_a_named_choice_in_the_job_file(tmp_path):
    assert load_job(_job(tmp_path, "p", "strict_spread")).runtime.placement == "strict_spread"
    assert load_job(_job(tmp_path, "q")).config_hash() == load_job(_job(tmp_path, "q", "spread")).config_hash()
    with pytest.raises(CkdError, match=r"runtime.placement"):
        load_job(_job(tmp_path, "r", "scatter"))


def test_jobs_api_arguments_fail_before_any_network(tmp_path):
    assert is_jobs_address("http://10.0.0.1:8265") and is_jobs_address("https://h:443")
    assert not is_jobs_address("127.0.0.1:6379") and not is_jobs_address(None)
    elsewhere = tmp_path / "a"
    elsewhere.mkdir()
    job = _job(tmp_path, "out")
    with pytest.raises(CkdError, match=r"the job file must lie inside the working folder shipped to the cluster"):
        submit_job("http://127.0.0.1:1", job, elsewhere)
    assert exit_status({"status": "SUCCEEDED", "driver_exit_code": 0}) == 0
    assert exit_status({"status": "FAILED", "driver_exit_code": 2}) == 2
    assert exit_status({"status": "FAILED", "driver_exit_code": None}) == 1
    assert exit_status({"status": "STOPPED"}) == 1
    assert exit_status({"status": "FAILED", "driver_exit_code": None,
                        "message": "Job entrypoint command failed with exit code 2, last available logs …"}) == 2


def test_unreachable_jobs_api_and_no_cluster_are_one_line(cli, tmp_path):
    port = _free_port()
    res = cli("status", "--address", f"http://127.0.0.1:{port}")
    assert res.exit_code == 2 and "no Ray Jobs API answers there" in res.output and "Traceback" not in res.output
    res = cli("status", "--address", "127.0.0.1:6379")
    assert res.exit_code == 2 and "give http://HEAD:8265" in res.output
    res = cli("cluster", "status", "--state-dir", tmp_path / "none")
    assert res.exit_code == 1 and "no local cluster is up" in res.output
    res = cli("cluster", "down", "--state-dir", tmp_path / "none")
    assert res.exit_code == 0 and "no local cluster is up" in res.output


def test_cluster_up_refuses_a_port_in_use(cli, tmp_path):
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        res = cli("cluster", "up", "--workers", "1", "--port", port, "--state-dir", tmp_path / "s")
    assert res.exit_code == 2, res.output
    assert f"--port {port}: the port is in use on this machine" in res.output
    assert not (tmp_path / "s" / "cluster.json").exists()


# ------------------------------------------------------------------------- a real multi-node cluster

MULTINODE = """
import json, os, sys, time
os.environ["RAY_metrics_report_interval_ms"] = "1000"  # every node process inherits it: gauges reach the endpoint fast
import ray, torch, urllib.request
from prometheus_client.parser import text_string_to_metric_families
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table
from continual_kd.config import load_job
from continual_kd.continual import run_stream_local
from continual_kd.data.sources import open_source
from continual_kd.errors import CkdError
from continual_kd.runtime.cluster import reserve_actors
from continual_kd.runtime.coordinator import run_job

TEMP, JOB = sys.argv[1], sys.argv[2]
out = {}
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {"ckd_node_head": 1},
                                                        "temp_dir": TEMP, "include_dashboard": False})
try:
    for i in (1, 2):
        cluster.add_node(num_cpus=2, resources={f"ckd_node_w{i}": 1}, temp_dir=TEMP)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    cluster.wait_for_nodes()
    label = {n["NodeID"]: next(r for r in n["Resources"] if r.startswith("ckd_node_")) for n in ray.nodes() if n["Alive"]}

    def nodes_of(placement, demands):
        with reserve_actors(demands, timeout_s=20, strategy=placement) as res:
            table = placement_group_table(res.group)
            return sorted(label[table["bundles_to_node_id"][i]] for i in range(len(table["bundles_to_node_id"])))

    two = {"teacher:a": {"CPU": 1}, "teacher:b": {"CPU": 1}}
    out["pack"], out["strict_spread"] = nodes_of("pack", two), nodes_of("strict_spread", two)
    for placement, demands in (("strict_spread", {**two, "student": {"CPU": 1}}), ("strict_pack", {**two, "student": {"CPU": 1}})):
        try:
            nodes_of(placement, demands)
        except CkdError as e:
            out["refused_" + placement] = str(e)

    job = load_job(JOB)
    t = time.monotonic()
    result = run_job(job, address=cluster.address)
    out["job_seconds"] = time.monotonic() - t
    out["placement"] = {n: p["node"] for n, p in result.placement.items()}
    out["history"] = result.history
    out["base_loss"] = {n: u.get("base_loss") for n, u in result.results[-1].updates.items()}
    out["snapshot_rows"] = result.plan.blocks[-1].rows

    # the driver is alive: its gauges are on its node's Prometheus endpoint (every node is scraped)
    want = {"ray_ckd_ndcg_at_20", "ray_ckd_current_block", "ray_ckd_interactions_consumed_total",
            "ray_ckd_stage_seconds", "ray_ckd_snapshot_age_seconds", "ray_ckd_loss_base",
            "ray_ckd_plasticity_ndcg_at_20", "ray_ckd_stability_ndcg_at_20", "ray_ckd_recall_at_20"}
    total = sum(b.rows for b in result.plan.blocks)
    deadline, settled = time.monotonic() + 30, False
    while True:
        samples = []
        for n in ray.nodes():
            if not n["Alive"]:
                continue
            url = f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            for fam in text_string_to_metric_families(text):
                samples += [[s.name, s.labels, s.value] for s in fam.samples if s.name.startswith("ray_ckd_")]
        names = {s[0] for s in samples}
        consumed = [v for n, _, v in samples if n == "ray_ckd_interactions_consumed_total"]
        if settled or time.monotonic() > deadline:
            break
        # the last block's numbers are exported together; one more export interval settles them all
        settled = want <= names and consumed == [total]
        time.sleep(2 if settled else 1)
    out["samples"] = samples

    # the same job in one process
    store = open_source(job.source)
    torch.set_num_threads(1)
    local = run_stream_local(job, lambda k: store.read_blocks(result.plan.plan_id, k), result.plan.num_blocks)
    out["local"] = [r.metrics for r in local]
finally:
    ray.shutdown()
    cluster.shutdown()
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.cluster
def test_teachers_spread_over_nodes_give_the_single_node_metrics_and_export_them(tmp_path):
    temp = tempfile.mkdtemp(prefix="ckd-t-", dir="/tmp")  # short: Ray's socket paths
    job = _job(tmp_path, "spread", "strict_spread")
    try:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(MULTINODE), temp, str(job)], cwd=tmp_path,
                              env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        _sweep(temp)

    # placement: pack fills one worker, strict_spread one bundle per worker; impossible layouts are one sentence
    assert len(set(out["pack"])) == 1 and out["pack"][0] in ("ckd_node_w1", "ckd_node_w2")
    assert out["strict_spread"] == ["ckd_node_w1", "ckd_node_w2"]
    assert out["refused_strict_spread"].startswith(
        "runtime.placement strict_spread puts each of the job's 3 actors on its own node, but the Ray cluster has "
        "3 node(s) (nodes: ")
    assert out["refused_strict_pack"].startswith("runtime.placement strict_pack puts all the job's actors (CPU=3) on "
                                                 "one node, but no node has that much")
    # where each actor ran: one teacher per worker node
    p = out["placement"]
    assert sorted([p["teacher:mf16"], p["teacher:mf32"]]) == ["ckd_node_w1", "ckd_node_w2"]
    assert set(p) == {"teacher:mf16", "teacher:mf32", "student"}

    # the same numbers as the single-process run
    assert [h["block"] for h in out["history"]] == [0, 1, 2]
    for h, local in zip(out["history"], out["local"]):
        assert set(local) == {"teacher:mf16", "teacher:mf32", "student"}
        for model, metrics in local.items():
            for key, value in metrics.items():
                got = h["metrics"][model][key]
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    assert got is None, (h["block"], model, key)
                else:
                    assert math.isclose(got, value, rel_tol=1e-5, abs_tol=1e-7), (h["block"], model, key)

    # the metrics, read back from the export endpoints, are the committed numbers
    def value(name, **tags):
        found = [v for n, labels, v in out["samples"]
                 if n == name and all(labels.get(k) == t for k, t in tags.items())]
        assert len(found) == 1, (name, tags, found, sorted({n for n, _, _ in out["samples"]}))
        return found[0]

    last = out["history"][-1]
    assert value("ray_ckd_current_block", job="spread") == 2
    assert value("ray_ckd_interactions_consumed_total", job="spread") == 3000
    for model in ("teacher:mf16", "teacher:mf32", "student"):
        assert math.isclose(value("ray_ckd_ndcg_at_20", job="spread", model=model, group="all"),
                            last["metrics"][model]["ndcg@20"], rel_tol=1e-6)
        assert math.isclose(value("ray_ckd_plasticity_ndcg_at_20", job="spread", model=model),
                            last["continual"][model]["plasticity/ndcg@20"], rel_tol=1e-6)
        assert math.isclose(value("ray_ckd_stability_ndcg_at_20", job="spread", model=model),
                            last["continual"][model]["stability/ndcg@20"], rel_tol=1e-6)
        assert math.isclose(value("ray_ckd_loss_base", job="spread", model=model), out["base_loss"][model],
                            rel_tol=1e-6) and out["base_loss"][model] > 0
    tail = last["metrics"]["student"].get("recall@20/tail")
    assert tail is not None
    assert math.isclose(value("ray_ckd_recall_at_20", model="student", group="tail"), tail, rel_tol=1e-6)
    stages = {labels["stage"]: v for n, labels, v in out["samples"] if n == "ray_ckd_stage_seconds"}
    assert len({labels["WorkerId"] for n, labels, v in out["samples"]}) == 1  # all from the driver
    assert set(stages) == set(last["stages"]) and all(v >= 0 for v in stages.values())
    assert 0 <= value("ray_ckd_snapshot_age_seconds", job="spread") < 600  # the gauge ages from the last commit


# ------------------------------------------------------------------------------ the Jobs API, for real


def _ckd(*args, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    # ~70 s for the whole test on an idle 2-core box; the limits leave room for a box shared by several runs
    return subprocess.run([sys.executable, "-m", "continual_kd.cli", *map(str, args)], cwd=cwd, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.cluster
def test_cluster_up_submit_through_the_jobs_api_then_evaluate(tmp_path):
    state_dir = tmp_path / "state"
    port, dport = _free_port(), _free_port()
    api = f"http://127.0.0.1:{dport}"
    temp = ""
    try:
        # two workers: each one's runtime-env agent must leave alone the package a job's driver runs in on the head
        up = _ckd("cluster", "up", "--workers", "2", "--cpus-per-worker", "1", "--port", port, "--dashboard-port",
                  dport, "--state-dir", state_dir, cwd=tmp_path, timeout=240)
        temp = json.loads((state_dir / "cluster.json").read_text())["temp_dir"] if (state_dir / "cluster.json").exists() else ""
        assert up.returncode == 0, up.stdout + up.stderr
        st = _ckd("cluster", "status", "--state-dir", state_dir, "--json", "-", cwd=tmp_path)
        assert st.returncode == 0, st.stderr
        nodes = {n["name"]: n for n in json.loads(st.stdout)["nodes_now"]}
        assert set(nodes) == {"head", "w1", "w2"} and all(n["state"] == "ALIVE" for n in nodes.values())
        assert (nodes["head"]["cpus"], nodes["w1"]["cpus"], nodes["w2"]["cpus"]) == (0, 1, 1)
        assert nodes["w1"]["resources"]["ckd_node_w1"] == 1 and "ckd_node_w1" not in nodes["head"]["resources"]
        # each worker runs under its own temp folder inside the cluster's
        assert sorted(p.name for p in Path(temp).iterdir() if p.name in ("w1", "w2")) == ["w1", "w2"]

        job = _job(tmp_path, "viajobs", "pack")
        sub = _ckd("submit", job, "--address", api, cwd=tmp_path)
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
        job_id = re.search(r"submitted job (raysubmit_\w+)", sub.stdout).group(1)
        assert "block 2 (" in sub.stdout  # the driver's log lines, followed here
        assert f"job {job_id}: SUCCEEDED" in sub.stdout

        # a job that cannot be placed fails in the driver at once; submit returns the driver's exit code
        big = _job(tmp_path, "toobig", "pack", student_cpus=1)
        bad = _ckd("submit", big, "--address", api, cwd=tmp_path)
        assert bad.returncode == 2, bad.stdout[-3000:] + bad.stderr[-3000:]
        assert "the job's actors need 3 CPU (teacher:mf16=1, teacher:mf32=1, student=1) but the Ray cluster has 2" in bad.stdout
        assert re.search(r"job raysubmit_\w+: FAILED \(Job entrypoint command failed with exit code 2\)", bad.stdout)

        jobs = _ckd("status", "--address", api, "--json", "-", cwd=tmp_path)
        assert jobs.returncode == 0, jobs.stderr
        rows = {r["job_id"]: r for r in json.loads(jobs.stdout)["jobs"]}
        assert rows[job_id]["status"] == "SUCCEEDED" and rows[job_id]["metadata"]["ckd_job"] == "viajobs"
        assert sorted(r["status"] for r in rows.values()) == ["FAILED", "SUCCEEDED"]

        wrong = _ckd("status", "--address", api, cwd=tmp_path, env={**_env(), "RAY_AUTH_TOKEN": "not-the-token"})
        assert wrong.returncode == 2 and "refused the token" in wrong.stderr and "Traceback" not in wrong.stderr
        # --restart through a cluster that refuses the driver's token: refused before anything is revoked
        restart = _ckd("submit", job, "--address", f"127.0.0.1:{port}", "--restart", cwd=tmp_path,
                       env={**_env(), "RAY_AUTH_TOKEN": "not-the-token"})
        assert restart.returncode == 2 and "could not join the Ray cluster" in restart.stderr, restart.stderr[-2000:]
        assert "revoked" not in restart.stdout + restart.stderr
        assert sorted(p.name for p in (tmp_path / "runs" / "viajobs").glob("block-*")) == [
            "block-0000", "block-0001", "block-0002"]

        ev = _ckd("evaluate", "--snapshot", "latest", "--runs", tmp_path / "runs", "--job", "viajobs", "--json", "-",
                  cwd=tmp_path)
        assert ev.returncode == 0, ev.stderr
        res = json.loads(ev.stdout)
        manifest = json.loads((tmp_path / "runs" / "viajobs" / "block-0002" / "manifest.json").read_text())
        assert res["block"] == 2
        for model in ("teacher:mf16", "teacher:mf32", "student"):
            assert math.isclose(res["models"][model]["blocks"]["2"]["ndcg@20"], manifest["metrics"][model]["ndcg@20"],
                                rel_tol=1e-5)
    finally:
        down = _ckd("cluster", "down", "--state-dir", state_dir, cwd=tmp_path, timeout=60)
        left = _sweep(temp)
    assert down.returncode == 0 and left == 0, down.stdout + down.stderr
