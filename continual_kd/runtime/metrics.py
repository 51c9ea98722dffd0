"""A job's metrics in the Ray dashboard (Metrics tab) and on the Prometheus endpoint of the driver's node.

The driver exports them after every committed block, so they live as long as the driver (an
actor's process, and its gauges, end with the job or with a retried block) and show exactly the
committed numbers. Per model (``MetricGauges``, tags ``job``, ``model``, ``group``): every test metric
of the block (``ckd_ndcg_at_20``, ``ckd_recall_at_20`` with ``group`` all / head / mid / tail,
``ckd_avgpop_at_20``, ``ckd_coverage_at_20``, …), plasticity / stability / H-mean
(``ckd_plasticity_ndcg_at_20``, ``ckd_stability_ndcg_at_20``, ``ckd_hmean_ndcg_at_20``, …), the last
epoch's losses (``ckd_loss_base``, ``ckd_loss_kd``) and ``ckd_update_seconds``. Per job (tag ``job``):

| name | kind | what |
| --- | --- | --- |
| ``ckd_interactions_consumed`` | counter | interactions of the blocks run so far (resumed blocks count once) |
| ``ckd_current_block`` | gauge | the block being run (the last one once the job is done) |
| ``ckd_stage_seconds`` | gauge, tag ``stage`` | seconds of each stage of the last block |
| ``ckd_block_seconds`` | gauge | seconds of the last block |
| ``ckd_snapshot_timestamp_seconds`` | gauge | Unix time of the last snapshot written |
| ``ckd_snapshot_age_seconds`` | gauge | seconds since the last snapshot (refreshed every ``refresh_s``) |

Ray's exporter prefixes every name with ``ray_`` on the Prometheus endpoint (``ray_ckd_current_block``).
Ray 2.60 sends a gauge to its node's agent only when it is set, and the agent drops a value that was
not refreshed for two export intervals, so the driver sets every gauge again with its last value
twice per export interval (``metrics_report_interval_ms``) for as long as it runs: the last block's
numbers stay on the endpoint after the job until the driver process (or its Ray) ends.
"""

from __future__ import annotations

import math
import re
import threading
import time

JOB_METRICS = ("ckd_interactions_consumed", "ckd_current_block", "ckd_stage_seconds", "ckd_block_seconds",
               "ckd_snapshot_timestamp_seconds", "ckd_snapshot_age_seconds")


def gauge_name(key: str) -> tuple[str, str]:
    """A metric key → (valid Prometheus gauge name, ``group`` tag).

    The part with ``@`` and the parts before it name the gauge; parts after it are the group:
    ``"recall@20/head"`` → ``("ckd_recall_at_20", "head")``, ``"ndcg@20"`` → ``("ckd_ndcg_at_20", "all")``,
    ``"plasticity/ndcg@20"`` → ``("ckd_plasticity_ndcg_at_20", "all")``.
    """
    parts = [p for p in key.split("/") if p]
    at = next((i for i, p in enumerate(parts) if "@" in p), len(parts) - 1)
    metric = "_".join(parts[: at + 1]).replace("@", "_at_")
    name = re.sub(r"[^a-z0-9_]+", "_", metric.lower()).strip("_")
    group = "/".join(parts[at + 1:]) or "all"
    return f"ckd_{name}", group


class MetricGauges:
    """One Ray gauge per metric name (tags ``model``, ``group`` and ``job``), created on first use;
    ``refresh()`` sets every one again with its last value."""

    def __init__(self, job: str = ""):
        self._gauges: dict = {}
        self._latest: dict[tuple, float] = {}  # (gauge name, model, group) → last value
        self.job = job

    def refresh(self) -> None:
        for (name, model, group), value in list(self._latest.items()):
            self._gauges[name].set(value, tags={"model": model, "group": group, "job": self.job})

    def report(self, model: str, metrics: dict) -> list[tuple[str, str, float]]:
        """Set every finite numeric metric; returns the (name, group, value) set (NaN/None are skipped)."""
        from ray.util.metrics import Gauge

        done = []
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            name, group = gauge_name(key)
            gauge = self._gauges.get(name)
            if gauge is None:
                metric = key if group == "all" else key[: -len(group) - 1]
                gauge = self._gauges[name] = Gauge(name, description=f"{metric} of the last block, per model and group",
                                                   tag_keys=("model", "group", "job"))
            gauge.set(float(value), tags={"model": model, "group": group, "job": self.job})
            self._latest[(name, model, group)] = float(value)
            done.append((name, group, float(value)))
        return done



def model_metrics(res) -> dict[str, dict]:
    """A block's numbers per model as gauges take them: test metrics, plasticity / stability / H-mean, the
    update's last-epoch losses and seconds (``res`` is a ``continual.BlockResult``)."""
    out = {}
    for model, metrics in res.metrics.items():
        update = res.updates.get(model) or {}
        out[model] = {**metrics, **(res.continual.get(model) or {}),
                      "loss/base": update.get("base_loss"), "loss/kd": update.get("kd_loss"),
                      "update_seconds": update.get("seconds")}
    return out


_ACTIVE: dict[str, "JobMetrics"] = {}  # job name → its metrics in this driver process
_ACTIVE_LOCK = threading.Lock()


def job_metrics(job: str) -> "JobMetrics":
    """The job's metrics in this process (one per job name and Ray session; kept after the job ends)."""
    import ray

    session = ray.get_runtime_context().gcs_address
    with _ACTIVE_LOCK:
        m = _ACTIVE.get(job)
        if m is None or m.session != session or not m.alive():
            if m is not None:
                m.close()
            m = _ACTIVE[job] = JobMetrics(job)
            m.session = session
        return m


class JobMetrics:
    """Metrics of one job in its driver; a thread refreshes the gauges until ``close()`` or Ray shuts down."""

    session: str | None = None

    def __init__(self, job: str, refresh_s: float | None = None):
        from ray.util.metrics import Counter, Gauge

        if refresh_s is None:  # half the agent's lifetime of an unrefreshed gauge (two export intervals)
            import ray

            refresh_s = min(5.0, max(1000, ray._config.metrics_report_interval_ms()) / 2000)

        self.tags = {"job": job}
        self.models = MetricGauges(job)
        keys = ("job",)
        self.consumed = Counter("ckd_interactions_consumed", description="interactions of the blocks run so far",
                                tag_keys=keys)
        self.block = Gauge("ckd_current_block", description="the block being run", tag_keys=keys)
        self.stage = Gauge("ckd_stage_seconds", description="seconds of each stage of the last block",
                           tag_keys=(*keys, "stage"))
        self.block_seconds = Gauge("ckd_block_seconds", description="seconds of the last block", tag_keys=keys)
        self.snapshot_ts = Gauge("ckd_snapshot_timestamp_seconds", description="Unix time of the last snapshot",
                                 tag_keys=keys)
        self.snapshot_age = Gauge("ckd_snapshot_age_seconds", description="seconds since the last snapshot",
                                  tag_keys=keys)
        self._last_snapshot: float | None = None
        self._latest: dict[tuple, tuple] = {}  # (gauge attribute, tag items) → last value
        self._stop = threading.Event()
        self._refresher = threading.Thread(target=self._refresh, args=(refresh_s,), daemon=True,
                                           name="ckd-snapshot-age")
        self._refresher.start()

    def alive(self) -> bool:
        return self._refresher.is_alive()

    def _refresh(self, every: float) -> None:
        import ray

        while not self._stop.wait(every):
            if not ray.is_initialized():  # the session ended: nothing to export to
                return
            for (attr, tags), value in list(self._latest.items()):
                getattr(self, attr).set(value, tags=dict(tags))
            self.models.refresh()
            self._set_age()

    def _set(self, attr: str, value: float, tags: dict) -> None:
        getattr(self, attr).set(value, tags=tags)
        self._latest[(attr, tuple(sorted(tags.items())))] = value

    def _set_age(self) -> None:
        if self._last_snapshot is not None:
            self.snapshot_age.set(max(0.0, time.time() - self._last_snapshot), tags=self.tags)

    def block_started(self, k: int) -> None:
        self._set("block", k, self.tags)

    def block_done(self, k: int, rows: int, seconds: float, stages: dict[str, float], snapshot_time: float,
                   models: dict[str, dict] | None = None) -> None:
        for model, metrics in (models or {}).items():
            self.models.report(model, metrics)
        if rows > 0:
            self.consumed.inc(rows, tags=self.tags)
        self._set("block", k, self.tags)
        self._set("block_seconds", seconds, self.tags)
        for stage, s in stages.items():
            self._set("stage", s, {**self.tags, "stage": stage})
        self._last_snapshot = snapshot_time
        self._set("snapshot_ts", snapshot_time, self.tags)
        self._set_age()

    def resumed(self, last_snapshot_time: float | None) -> None:
        """A resumed job's age counts from the snapshot it continues after."""
        if last_snapshot_time is not None:
            self._last_snapshot = last_snapshot_time
            self._set("snapshot_ts", last_snapshot_time, self.tags)
            self._set_age()

    def close(self) -> None:
        self._stop.set()
        self._refresher.join(timeout=5)
