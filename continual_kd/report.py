"""``ckd report``: how a job's models moved block after block, as PNG plots and one HTML page.

The numbers come from the newest snapshot's manifest (its ``history``: every committed block's test
metrics, plasticity / stability / H-mean, seconds per stage). The teachers' rank-fusion ensemble is
not trained, so it is scored here from each block's snapshot that is still on disk (a reference the
student is compared with). The HTML embeds the PNGs (base64), so it opens without a server and
without the PNG files next to it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from .tables import model_labels, order_models

ENSEMBLE = "ensemble"
PLOTS = ("accuracy", "continual", "bias", "seconds")


@dataclass
class Report:
    html: Path
    pngs: dict[str, Path]
    notes: list[str] = field(default_factory=list)
    series: dict = field(default_factory=dict)  # what was plotted: metric → model → [value per block]


def _number(v) -> float | None:
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if math.isnan(v) or math.isinf(v) else float(v)


def ensemble_history(job_dir: Path, manifest: dict, blocks: list[int], device: str = "cpu") -> tuple[dict, list[str]]:
    """block → {"metrics": test metrics, "continual": ...} of the teachers' ensemble, for every block
    whose snapshot is still on disk; and notes on what could not be scored."""
    from .continual.ensemble import evaluate_ensemble
    from .continual.snapshot_eval import learners_from_snapshot
    from .config import parse_job
    from .errors import CkdError
    from .manifest import block_manifest_problem
    from .snapshots import block_dir_name, damaged_snapshots, list_snapshots, resolve_snapshot
    from .stream import StreamStore

    teachers = [n for n in manifest.get("model_info", {}) if n.startswith("teacher:")]
    if len(teachers) < 2:
        return {}, [f"no ensemble: the job has {len(teachers)} teacher(s); a rank-fusion ensemble needs two or more"]
    try:
        store = StreamStore.open(manifest["store"])
    except CkdError as e:
        return {}, [f"no ensemble: {e}"]
    job = parse_job(manifest["job_spec"], f"{job_dir}/manifest.json")
    on_disk = set(list_snapshots(job_dir))
    lost = damaged_snapshots(job_dir)  # folders that lost their manifest: damaged, not pruned
    out, notes, pruned = {}, [], []
    for k in blocks:
        if k not in on_disk:
            if k in lost:
                notes.append(f"ensemble at block {k} skipped: its snapshot {block_dir_name(k)} has no manifest "
                             f"(damaged)")
            else:
                pruned.append(k)
            continue
        try:
            snap, _ = resolve_snapshot(job_dir, k, check=block_manifest_problem)
        except CkdError as e:
            notes.append(f"ensemble at block {k} skipped: {e}")
            continue
        ours, final = snap.manifest.get("config_hash"), manifest.get("config_hash")
        if ours != final and not (job.is_lineage(ours) and job.is_lineage(final)):
            notes.append(f"ensemble at block {k} skipped: its snapshot is of another configuration")
            continue
        learners = learners_from_snapshot(snap, device)
        seen = store.read_blocks(snap.manifest["plan_id"], k)
        res = evaluate_ensemble([learners[n] for n in teachers], seen, k, job.eval)
        out[k] = {"metrics": res["test"], "continual": res["continual"]}
    if pruned and len(pruned) < len(blocks):
        notes.append(f"ensemble not scored for block(s) {', '.join(map(str, pruned))}: their snapshots were pruned "
                     f"(snapshots.keep_last)")
    elif pruned:
        notes.append("ensemble not scored: no snapshot of the job's blocks is on disk")
    return out, notes


def _series(history: list[dict], ensemble: dict, part: str, key: str) -> dict[str, list[float | None]]:
    """model → value per block (None where undefined), the ensemble included when scored."""
    models = order_models(history[-1].get(part, {})) if history else []
    out = {m: [_number(((h.get(part) or {}).get(m) or {}).get(key)) for h in history] for m in models}
    if ensemble:
        out[ENSEMBLE] = [_number((ensemble.get(h["block"], {}).get(part) or {}).get(key)) for h in history]
    return out


def _plot_lines(ax, blocks: list[int], series: dict[str, list[float | None]], labels: dict[str, str], title: str):
    for model, values in series.items():
        xs = [b for b, v in zip(blocks, values) if v is not None]
        ys = [v for v in values if v is not None]
        if not ys:
            continue
        style = dict(color="black", linestyle="--") if model == ENSEMBLE else {}
        ax.plot(xs, ys, marker="o", label=labels.get(model, model), **style)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("block")
    ax.set_xticks(blocks)
    ax.grid(alpha=0.3)


def _figure(ncols: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6 * ncols, 3.6), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _legend(fig, axes) -> None:
    handles, names = [], []
    for ax in axes:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncols=min(len(names), 6), fontsize=9)


def _stage_order(history: list[dict], job_spec: dict) -> list[str]:
    """Stage names in the order a block runs them (manifests store them sorted by name)."""
    from .config import parse_job
    from .continual.stages import block_stages
    from .errors import CkdError

    names = list(dict.fromkeys(s for h in history for s in (h.get("stages") or {})))
    try:
        job = parse_job(job_spec, "manifest.json")
        run_order = [n for b in (history[-1]["block"], 0) for n, _ in block_stages(job, b)]
    except CkdError:  # a spec this version no longer reads: keep the names' own order
        return names
    rank = {n: i for i, n in reversed(list(enumerate(run_order)))}
    return sorted(names, key=lambda n: rank.get(n, len(rank)))


def _plots(history: list[dict], ensemble: dict, k: int, job_spec: dict) -> tuple[dict[str, bytes], dict]:
    blocks = [h["block"] for h in history]
    names = list(order_models(history[-1].get("metrics", {}))) + ([ENSEMBLE] if ensemble else [])
    labels = {**model_labels(names), ENSEMBLE: "teachers' ensemble (rank fusion)"}
    pngs, series = {}, {}

    def panel_set(name: str, panels: list[tuple[str, str, str]], ylabels: list[str] | None = None):
        fig, axes = _figure(len(panels))
        for i, (ax, (part, key, title)) in enumerate(zip(axes, panels)):
            s = _series(history, ensemble, part, key)
            series[f"{part}/{key}" if part != "metrics" else key] = s
            _plot_lines(ax, blocks, s, labels, title)
            if ylabels:
                ax.set_ylabel(ylabels[i])
        _legend(fig, axes)
        pngs[name] = _png(fig)

    panel_set("accuracy", [("metrics", f"ndcg@{k}", f"NDCG@{k}, test part of block k"),
                           ("metrics", f"recall@{k}", f"Recall@{k}, test part of block k")])
    panel_set("continual", [("continual", f"plasticity/ndcg@{k}", f"plasticity: NDCG@{k} on block k"),
                            ("continual", f"stability/ndcg@{k}", f"stability: NDCG@{k} on blocks < k"),
                            ("continual", f"hmean/ndcg@{k}", "H-mean of plasticity and stability")])
    panel_set("bias", [("metrics", f"recall@{k}/tail", f"Recall@{k} of tail items"),
                       ("metrics", f"avgpop@{k}", f"average popularity of the top {k}"),
                       ("metrics", f"coverage@{k}", f"coverage@{k} (share of items shown)")],
              ["recall", "training interactions", "fraction of items"])

    fig, (ax_stage, ax_model) = _figure(2)
    stages = _stage_order(history, job_spec)
    bottom = [0.0] * len(blocks)
    if stages:
        for s in stages:
            vals = [_number((h.get("stages") or {}).get(s)) or 0.0 for h in history]
            ax_stage.bar(blocks, vals, bottom=bottom, label=s)
            bottom = [a + b for a, b in zip(bottom, vals)]
        series["seconds/stage"] = {s: [_number((h.get("stages") or {}).get(s)) for h in history] for s in stages}
        ax_stage.legend(fontsize=8)
    else:  # manifests written before per-stage times were recorded
        ax_stage.bar(blocks, [_number(h.get("seconds")) or 0.0 for h in history], label="block", color="grey")
    ax_stage.set_title("seconds per stage (wall clock)", fontsize=10)
    ax_stage.set_xlabel("block")
    ax_stage.set_ylabel("seconds")
    ax_stage.set_xticks(blocks)
    update = {m: [_number((h.get("updates") or {}).get(m)) for h in history] for m in names if m != ENSEMBLE}
    series["seconds/update"] = update
    _plot_lines(ax_model, blocks, update, labels, "seconds of each model's update")
    ax_model.set_ylabel("seconds")
    ax_model.legend(fontsize=8)
    pngs["seconds"] = _png(fig)
    return pngs, series


def _cell(v, digits: int = 4) -> str:
    n = _number(v)
    return "—" if n is None else f"{n:.{digits}f}"


CHOICES = (  # (history choice key, row label, how a value is shown): what validation decided in each update
    ("best_epoch", "best epoch / run", lambda v, c: f"{v} / {c.get('epochs', '?')}"),
    ("valid_ndcg@20", "validation NDCG@20", lambda v, c: _cell(v)),
    ("fusion_popularity_beta", "fusion popularity β", lambda v, c: f"{v:.4f}" + ("" if c.get("fusion_popularity_used")
                                                                                   else " (unused)")),
    ("fusion_popularity_scale", "fusion popularity target ×", lambda v, c: f"{v:.3f}"),
    ("teachers_left_out", "teachers left out", lambda v, c: f"{int(v)}"),
    ("weight_power", "fusion weight power", lambda v, c: "∞" if v == -1 else f"{v:g}"),
)


def choices_rows(history: list[dict], models: list[str], labels: dict[str, str]) -> list[list[str]]:
    """[model label, what, one cell per block] for each choice some update of the model recorded (the snapshot
    history's ``choice``: ``manifest.update_choice``); a block whose update did not record it shows —."""
    rows = []
    for m in models:
        picks = [(h.get("choice") or {}).get(m) or {} for h in history]
        for key, what, show in CHOICES:
            if not any(c.get(key) is not None for c in picks):
                continue
            rows.append([labels.get(m, m), what, *(show(c[key], c) if c.get(key) is not None else "—" for c in picks)])
    return rows


def _html(manifest: dict, history: list[dict], ensemble: dict, k: int, pngs: dict[str, bytes],
          files: dict[str, Path], notes: list[str]) -> str:
    e = html.escape
    last = history[-1]
    models = order_models(last.get("metrics", {}))
    labels = model_labels(models)
    params = {m: (manifest.get("model_info", {}).get(m) or {}).get("parameters") for m in models}
    rows = []
    for m in [*models, *([ENSEMBLE] if last["block"] in ensemble else [])]:
        src = ensemble[last["block"]] if m == ENSEMBLE else {"metrics": last["metrics"].get(m, {}),
                                                              "continual": last.get("continual", {}).get(m, {})}
        met, cont = src["metrics"] or {}, src["continual"] or {}
        p = params.get(m)
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in [
            e(labels.get(m, "teachers' ensemble")), e(m), f"{p:,}" if isinstance(p, int) else "—",
            _cell(met.get(f"ndcg@{k}")), _cell(met.get(f"recall@{k}")), _cell(cont.get(f"plasticity/ndcg@{k}")),
            _cell(cont.get(f"stability/ndcg@{k}")), _cell(cont.get(f"hmean/ndcg@{k}")),
            _cell(met.get(f"recall@{k}/tail")), _cell(met.get(f"avgpop@{k}"), 1), _cell(met.get(f"coverage@{k}"))]) +
            "</tr>")
    header = "".join(f"<th>{h}</th>" for h in ["label", "model", "parameters", f"NDCG@{k}", f"Recall@{k}",
                                                "plasticity", "stability", "H-mean", "tail Recall",
                                                "avg popularity", "coverage"])
    per_block_head = "".join(f"<th>b{h['block']}</th>" for h in history)
    per_block = []
    for m in models:
        cells = "".join(f"<td>{_cell((h.get('metrics', {}).get(m) or {}).get(f'ndcg@{k}'))}</td>" for h in history)
        per_block.append(f"<tr><td>{e(labels[m])}</td>{cells}</tr>")
    if ensemble:
        cells = "".join(f"<td>{_cell((ensemble.get(h['block'], {}).get('metrics') or {}).get(f'ndcg@{k}'))}</td>"
                        for h in history)
        per_block.append(f"<tr><td>teachers' ensemble</td>{cells}</tr>")
    choices = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>"
                      for row in choices_rows(history, models, labels))
    if choices:
        choices = (f"<h2>What each update chose on validation</h2><table><tr><th>model</th><th>choice</th>"
                   f"{per_block_head}</tr>{choices}</table>")
    captions = {
        "accuracy": f"NDCG@{k} and Recall@{k} of every model on each block's test part (full ranking), "
                    "the teachers' rank-fusion ensemble dashed.",
        "continual": f"Plasticity (block k), stability (mean over the blocks before k) and their harmonic mean, "
                     f"NDCG@{k}. Block 0 has no stability.",
        "bias": f"Popularity bias: Recall@{k} on tail items, the mean training popularity of the top-{k} lists, "
                f"and the share of items recommended to at least one user.",
        "seconds": "Wall-clock seconds of each stage of a block (stacked) and of each model's update.",
    }
    figures = "\n".join(
        f'<figure><img alt="{e(name)}" src="data:image/png;base64,{base64.b64encode(pngs[name]).decode()}">'
        f"<figcaption>{e(captions[name])} <small>({e(files[name].name)})</small></figcaption></figure>"
        for name in PLOTS if name in pngs)
    spec = yaml.safe_dump(manifest.get("job_spec", {}), sort_keys=False, allow_unicode=True, default_flow_style=None,
                          width=100)
    note_html = "".join(f"<li>{e(n)}</li>" for n in notes)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>ckd report: {e(manifest['job'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th:first-child, td:first-child, .models th:nth-child(2), .models td:nth-child(2) {{ text-align: left; }}
figure {{ margin: 1em 0 2em; }} img {{ max-width: 100%; }}
figcaption {{ color: #555; font-size: 0.9em; }} pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; }}
.meta {{ color: #555; }}
</style></head><body>
<h1>continual-kd report: {e(manifest['job'])}</h1>
<p class="meta">blocks 0..{last['block']} of {manifest.get('num_blocks', '?')} committed · configuration
{e(str(manifest.get('config_hash', '')))} · plan {e(str(manifest.get('plan_id', '')))} ·
store {e(str(manifest.get('store', '')))} · generated {generated}</p>
<h2>After block {last['block']}</h2>
<table class="models"><tr>{header}</tr>{''.join(rows)}</table>
<h2>NDCG@{k} per block</h2>
<table><tr><th>model</th>{per_block_head}</tr>{''.join(per_block)}</table>
{f'<ul class="meta">{note_html}</ul>' if notes else ''}
{choices}
{figures}
<h2>Settings</h2>
<pre>{e(spec)}</pre>
</body></html>
"""


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def output_paths(out: Path) -> tuple[Path, dict[str, Path]]:
    """``out`` ending in .html: that page and ``<stem>-<plot>.png`` beside it; otherwise a folder with
    ``report.html`` and ``<plot>.png``."""
    if out.suffix.lower() in (".html", ".htm"):
        return out, {p: out.with_name(f"{out.stem}-{p}.png") for p in PLOTS}
    return out / "report.html", {p: out / f"{p}.png" for p in PLOTS}


def write_report(job_dir: Path, out: Path, ensemble: bool = True, device: str = "cpu") -> Report:
    """Read the newest snapshot of ``job_dir``, draw the plots, write the PNGs and the HTML page."""
    from .errors import CkdError
    from .manifest import block_manifest_problem
    from .snapshots import resolve_snapshot

    snap, warnings = resolve_snapshot(job_dir, "latest", check=block_manifest_problem)
    manifest = snap.manifest
    history = list(manifest.get("history") or [])
    if not history:
        raise CkdError(f"{snap.path}/manifest.json: has no metric history; run `ckd submit` for the job again")
    ks = list((manifest.get("job_spec", {}).get("eval") or {}).get("ks") or [20])
    k = 20 if 20 in ks else ks[0]
    notes = list(warnings)
    ens: dict = {}
    if ensemble:
        ens, more = ensemble_history(job_dir, manifest, [h["block"] for h in history], device)
        notes += more
    pngs, series = _plots(history, ens, k, manifest.get("job_spec") or {})
    html_path, files = output_paths(out)
    for name, data in pngs.items():
        _write(files[name], data)
    _write(html_path, _html(manifest, history, ens, k, pngs, files, notes).encode())
    series["ks"] = [k]
    return Report(html_path, {n: files[n] for n in pngs}, notes, json.loads(json.dumps(series)))
