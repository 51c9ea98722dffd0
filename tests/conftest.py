"""Shared fixtures: one real local Ray for the whole session, small generated stores, CLI runner."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

os.environ.setdefault("COLUMNS", "200")  # Rich tables at a fixed width under CliRunner

NETWORK_HOSTS = (("files.grouplens.org", 443), ("pypi.org", 443))  # MovieLens-100K's two download sources


@functools.cache
def _online() -> bool:
    import socket

    for host in NETWORK_HOSTS:
        try:
            socket.create_connection(host, timeout=3).close()
            return True
        except OSError:
            continue
    return False


def pytest_runtest_setup(item):
    """Tests marked ``network`` are skipped (with the reason) when no download source is reachable."""
    if item.get_closest_marker("network") is not None and not _online():
        pytest.skip(f"needs the network: none of {', '.join(h for h, _ in NETWORK_HOSTS)} is reachable")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray (2 CPUs), started once and shared; the coordinator reuses it."""
    import ray

    import socket

    with socket.socket() as sock:  # a free port, so a test's own embedded Ray can take the default 8265
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             namespace="ckd-tests", log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test (tiny tensors: a second thread only adds contention on a
    loaded 2-core box; the actors run with num_cpus 1 too), restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli():
    """Invoke ``ckd`` in-process; returns the click Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from continual_kd.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


TINY_JOB = """
name: {name}
seed: {seed}
source:
  dataset: synthetic
  store: {store}
  synthetic: {{users: 150, items: 120, interactions: 3000, periods: 3, seed: 1}}
blocks: {{base_fraction: 0.5, incremental: 2}}
teachers:
  - name: mf32
    backbone: mf
    dim: 32
    train: {{epochs_base: 8, epochs_block: 4, batch_size: 512}}
student:
  dim: 8
  train: {{epochs_base: 8, epochs_block: 4, batch_size: 512}}
distill: {{terms: [{{name: rrd, weight: 0.01, k: 10, pool: 30, uninteresting: 10}}]}}
eval: {{ks: [10, 20]}}
"""


@pytest.fixture
def tiny_job(tmp_path: Path, monkeypatch):
    """Write a tiny synthetic job in a fresh working directory; returns a writer for variants."""
    monkeypatch.chdir(tmp_path)

    def write(name: str = "tiny", seed: int = 0, store: str = "stores/tiny", extra: str = "") -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(TINY_JOB.format(name=name, seed=seed, store=store) + extra)
        return path

    return write


@pytest.fixture
def local_snapshot():
    """Write the snapshot of models trained in-process (``run_stream_local``) as ``ckd submit`` would, under
    ``runs_dir / job.name``: a writer (runs_dir, job, plan, store, learners)."""
    from continual_kd.snapshots import write_snapshot

    def write(runs_dir: Path, job, plan, store, learners) -> None:
        states = {n: lr.state() for n, lr in learners.items()}
        write_snapshot(Path(runs_dir) / job.name, plan.num_blocks - 1, {n: s["weights"] for n, s in states.items()},
                       {"job": job.name, "job_spec": job.to_dict(), "plan_id": plan.plan_id, "store": str(store.root),
                        "model_info": {n: {"num_users": s["num_users"], "num_items": s["num_items"]}
                                       for n, s in states.items()}})

    return write


@pytest.fixture
def same_as_local():
    """Check a Ray run against the same job run in-process (one torch thread, as a 1-CPU actor): every block's
    metrics, plasticity / stability and the KD terms each model trained with, to the digit — knowledge vectors,
    term state and the stages handled on the actors exactly as in one process. (job, ray_result) → the in-process
    run's block results."""
    import math

    import torch

    from continual_kd.continual import run_stream_local
    from continual_kd.data.sources import open_source

    def check(job, ray_result) -> list:
        store = open_source(job.source)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            local = run_stream_local(job, lambda k: store.read_blocks(ray_result.plan.plan_id, k),
                                     ray_result.plan.num_blocks)
        finally:
            torch.set_num_threads(threads)
        assert [r.block for r in local] == [r.block for r in ray_result.results]
        close = lambda a, b: (a is None and b is None) or (  # noqa: E731
            a is not None and b is not None and ((math.isnan(a) and math.isnan(b))
                                                 or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)))
        for a, b in zip(local, ray_result.results):
            assert set(a.metrics) == set(b.metrics)
            for model in a.metrics:
                for key, value in a.metrics[model].items():
                    assert close(value, b.metrics[model][key]), (a.block, model, key, value, b.metrics[model][key])
                for key, value in a.continual[model].items():
                    assert close(value, b.continual[model][key]), (a.block, model, key)
                assert a.updates[model].get("terms") == b.updates[model].get("terms")
                assert close(a.updates[model].get("kd_loss"), b.updates[model].get("kd_loss")), (a.block, model)
        return local

    return check
