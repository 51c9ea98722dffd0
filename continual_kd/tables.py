"""The CLI's result tables, built to fit a terminal: nothing is cut to an ellipsis.

A table is a few key columns (block, model, metric) and value columns (blocks, models, metrics).
``fit_tables`` splits the value columns over as many tables as needed so that each fits the width,
repeating the key columns; text that may be long (paths) folds onto further lines instead of being
cut. Model keys are shortened to labels (``teacher:lightgcn`` → ``lightgcn``) with a legend line.
``wide=True`` keeps everything in one table at its natural width (the terminal may wrap it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.table import Table

TEACHER_PREFIX = "teacher:"
DASH = "–"  # an undefined metric (as cli._fmt shows it)


@dataclass
class Column:
    header: str
    cells: list[str] = field(default_factory=list)
    justify: str = "right"
    fold: bool = False  # long free text (a path): may wrap onto several lines, never cut


def fmt(value, digits: int = 4) -> str:
    """A number for a table; None / NaN / missing as a dash."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return DASH
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return DASH
    return f"{value:.{digits}f}"


def model_labels(names) -> dict[str, str]:
    """Short labels: ``teacher:<name>`` → ``<name>`` unless that would collide with another model."""
    names = list(names)
    short = {n: n[len(TEACHER_PREFIX):] if n.startswith(TEACHER_PREFIX) else n for n in names}
    counts: dict[str, int] = {}
    for label in short.values():
        counts[label] = counts.get(label, 0) + 1
    return {n: (short[n] if counts[short[n]] == 1 and short[n] else n) for n in names}


def legend(labels: dict[str, str]) -> str | None:
    """One line naming what the short labels stand for (None when no label was shortened)."""
    pairs = [f"{label} = {name}" for name, label in labels.items() if label != name]
    return "models: " + ", ".join(pairs) if pairs else None


def order_models(names) -> list[str]:
    """Teachers first (in their order), the student last, anything else (an ensemble) in between."""
    names = list(names)
    return sorted(names, key=lambda n: (0 if n.startswith(TEACHER_PREFIX) else 2 if n == "student" else 1,
                                        names.index(n)))


def _table(title: str | None, keys: list[Column], values: list[Column], bold_last_row: bool) -> Table:
    t = Table(title=escape(title) if title else None, title_justify="left")
    for c in [*keys, *values]:
        if c.fold:
            t.add_column(escape(c.header), justify=c.justify, overflow="fold", min_width=8)
        else:
            t.add_column(escape(c.header), justify=c.justify, no_wrap=True)
    rows = max((len(c.cells) for c in [*keys, *values]), default=0)
    for i in range(rows):
        t.add_row(*[escape(c.cells[i]) if i < len(c.cells) else "" for c in [*keys, *values]],
                  style="bold" if bold_last_row and i == rows - 1 else None)
    return t


_MEASURE = Console(width=100_000, emoji=False, color_system=None)


def natural_width(table: Table) -> int:
    return _MEASURE.measure(table).maximum


def fit_tables(title: str | None, keys: list[Column], values: list[Column], width: int | None,
               bold_last_row: bool = False) -> list[Table]:
    """The value columns spread over tables that each fit ``width`` (None: one table, any width)."""
    if width is None or not values:
        return [_table(title, keys, values, bold_last_row)]
    def narrow(cols: list[Column]) -> list[Column]:  # a folding column needs only its minimum width
        return [Column(c.header[:8], [x[:8] for x in c.cells], c.justify) if c.fold else c for c in cols]

    groups: list[list[Column]] = [[]]
    for col in values:
        trial = [*groups[-1], col]
        if groups[-1] and natural_width(_table(None, narrow(keys), narrow(trial), False)) > width:
            groups.append([col])
        else:
            groups[-1] = trial
    if len(groups) == 1:
        return [_table(title, keys, values, bold_last_row)]
    return [_table(f"{title} ({i + 1}/{len(groups)})" if title else None, keys, g, bold_last_row)
            for i, g in enumerate(groups)]


# ------------------------------------------------------------------------------------ the CLI's tables


def history_tables(history: list[dict], width: int | None, wide: bool = False, k: int = 20,
                   masked: str = "train + valid masked") -> tuple[list, str | None]:
    """``ckd submit``: NDCG@k of every model per block (+ seconds); wide adds Recall@k, H-mean NDCG@k
    and seconds per stage. Returns (tables, legend)."""
    models = order_models(history[0]["metrics"]) if history else []
    keys = {key for h in history for m in h["metrics"].values() for key in m}
    if f"ndcg@{k}" not in keys:  # the job's eval.ks lacks k: its first K
        k = min((int(key[5:]) for key in keys if key.startswith("ndcg@") and key[5:].isdigit()), default=k)
    labels = model_labels(models)
    blocks = [str(h["block"]) for h in history]
    incr = [h for h in history if h["block"] > 0]
    tables = []
    metrics = [(f"ndcg@{k}", f"NDCG@{k} on each block's test part (full ranking, {masked})", "metrics")]
    if wide:
        metrics += [(f"recall@{k}", f"Recall@{k} on each block's test part", "metrics"),
                    (f"hmean/ndcg@{k}", f"H-mean of plasticity and stability, NDCG@{k}", "continual")]
    for key, title, part in metrics:
        def value(h, m):
            return ((h.get(part) or {}).get(m) or {}).get(key)

        cols = [Column(labels[m], [fmt(value(h, m)) for h in history]) for m in models]
        if key.startswith("ndcg") and incr:  # the mean over incremental blocks: the continual figure
            for m, c in zip(models, cols):
                vals = [value(h, m) for h in incr if isinstance(value(h, m), (int, float))]
                c.cells.append(fmt(sum(vals) / len(vals)) if vals else DASH)
        key_col = Column("block", [*blocks, *(["mean 1.."] if key.startswith("ndcg") and incr else [])], "right")
        if key.startswith("ndcg"):
            cols.append(Column("seconds", [fmt(h.get("seconds"), 1) for h in history] + ([""] if incr else [])))
            if any("users_of" in (m or {}) for h in history for m in h["metrics"].values()):  # eval.sample_users
                cols.append(Column("test users", [_sampled(h["metrics"].get(models[0])) for h in history]
                                   + ([""] if incr else [])))
        tables += fit_tables(title, [key_col], cols, None if wide else width,
                             bold_last_row=key.startswith("ndcg") and bool(incr))
    if wide:
        stages = list(dict.fromkeys(s for h in history for s in (h.get("stages") or {})))
        if stages:
            cols = [Column(s, [fmt((h.get("stages") or {}).get(s), 2) for h in history]) for s in stages]
            tables += fit_tables("seconds per stage", [Column("block", blocks)], cols, None)
    return tables, legend(labels)


def _sampled(metrics: dict | None) -> str:
    """'sampled/of' test users of a block (eval.sample_users), or how many there were."""
    m = metrics or {}
    if m.get("users_of") is not None and m.get("users") is not None:
        return f"{int(m['users']):,}/{int(m['users_of']):,}"
    return fmt(m.get("users"), 0)


def evaluate_tables(res: dict, job: str, block: int, width: int | None, wide: bool = False) -> tuple[list, str | None]:
    """``ckd evaluate``: models (label, parameters); Recall/NDCG@20 per block (wide: every K); means
    over blocks; popularity bias; plasticity / stability / H-mean. Returns (tables, legend)."""
    ks = list(res["ks"])
    k_main = 20 if 20 in ks else ks[0]
    models = order_models(res["models"])
    labels = model_labels(models)
    width = None if wide else width
    tables = fit_tables(f"{job} snapshot block-{block:04d}: models",
                        [Column("label", [labels[m] for m in models], "left")],
                        [Column("model", list(models), "left", fold=True),
                         Column("parameters", [f"{res['models'][m]['parameters']:,}" for m in models])], width)

    blocks = sorted({int(b) for m in models for b in res["models"][m]["blocks"]})
    metric_keys = [f"{name}@{k}" for k in (ks if wide else [k_main]) for name in ("recall", "ndcg")]
    masked = res.get("mask_label", "every seen pair masked")  # a result from before masks were named

    def per_block_table(keys: list[str], part: str, note: str = "", prefix: str = "") -> list:
        """One row per model × metric (``prefix`` + key), one column per block, and the mean over blocks."""
        rows = [(m, prefix + key) for m in models for key in keys]

        def cell(m, b, key):
            blocks_of = res["models"][m]["blocks"]
            return fmt(blocks_of.get(b, blocks_of.get(str(b), {})).get(key))

        cols = [Column(f"b{b}", [cell(m, b, key) for m, key in rows]) for b in blocks]
        cols.append(Column("mean", [mean_cell(res["models"][m], key, len(blocks)) for m, key in rows]))
        return fit_tables(f"{part} ({note}full ranking, {masked}; mean over blocks 0..{block})",
                          [Column("model", [labels[m] for m, _ in rows], "left"),
                           Column("metric", [_metric_label(key.removeprefix(prefix)) for _, key in rows], "left")],
                          cols, width)

    tables += per_block_table(metric_keys, "test part of each block")

    cols = [Column(_metric_label(f"{name}@{k}"), [mean_cell(res["models"][m], f"{name}@{k}", len(blocks))
                                                   for m in models]) for k in ks for name in ("recall", "ndcg")]
    tables += fit_tables(f"mean over blocks 0..{block} ({masked})", [Column("model", [labels[m] for m in models], "left")],
                         cols, width)

    bias = [(f"recall@{k_main}/head", "Recall head"), (f"recall@{k_main}/mid", "Recall mid"),
            (f"recall@{k_main}/tail", "Recall tail"), (f"avgpop@{k_main}", "avg pop"),
            (f"coverage@{k_main}", "coverage")]
    cols = [Column(label, [mean_cell(res["models"][m], key, len(blocks), 1 if key.startswith("avgpop") else 4)
                           for m in models]) for key, label in bias]
    tables += fit_tables(f"popularity bias at {k_main} (mean over blocks, {masked}; groups by training popularity)",
                         [Column("model", [labels[m] for m in models], "left")], cols, width)
    eq = sorted({key.rsplit("/", 1)[1] for m in models for key in res["models"][m]["mean"]
                 if key.startswith(f"recall@{k_main}/eq")})
    if eq:
        cols = [Column(f"Recall {g}", [mean_cell(res["models"][m], f"recall@{k_main}/{g}", len(blocks))
                                       for m in models]) for g in eq]
        tables += fit_tables(f"Recall@{k_main} by UnKD's equal-interaction groups (eq0 = most popular; mean over "
                             f"blocks)", [Column("model", [labels[m] for m in models], "left")], cols, width)
    if any(f"holdout_ndcg@{k_main}" in res["models"][m]["mean"] for m in models):  # blocks.holdout
        tables += per_block_table([f"recall@{k_main}", f"ndcg@{k_main}"], "held-out part of each block",
                                  "blocks.holdout: never trained on nor chosen on; ", prefix="holdout_")
    tables += _past_the_log_tables(res, models, labels, k_main, blocks, masked, width)

    rows = [(m, key) for m in models for key in (f"ndcg@{k_main}", f"recall@{k_main}")]
    cols = [Column(header, [fmt((res["models"][m].get("continual") or {}).get(f"{part}/{key}")) for m, key in rows])
            for part, header in (("plasticity", "plasticity"), ("stability", "stability"), ("hmean", "H-mean"))]
    tables += fit_tables(f"plasticity (block {block}) and stability (blocks < {block}), test part",
                         [Column("model", [labels[m] for m, _ in rows], "left"),
                          Column("metric", [_metric_label(key) for _, key in rows], "left")], cols, width)
    return tables, legend(labels)


def _past_the_log_tables(res: dict, models: list[str], labels: dict, k: int, blocks: list, masked: str,
                         width: int | None) -> list:
    """``ckd evaluate``: the pooled test set, the inverse-propensity and intervened estimates, and (when
    given) the truth and the missing-at-random figures. Every column says which figure it is."""
    tables = []
    figures = [(f"recall@{k}", f"Recall@{k}"), (f"ndcg@{k}", f"NDCG@{k}"), (f"ips_recall@{k}", f"IPS Recall@{k}"),
               (f"ips_ndcg@{k}", f"IPS NDCG@{k}"), (f"iv_recall@{k}", f"interv. Recall@{k}"),
               (f"iv_ndcg@{k}", f"interv. NDCG@{k}")]
    if any(res["models"][m].get("pooled") for m in models):
        cols = [Column(label, [fmt((res["models"][m].get("pooled") or {}).get(key)) for m in models])
                for key, label in figures]
        tables += fit_tables(f"pooled: every block's test pairs as one test set ({masked})",
                             [Column("model", [labels[m] for m in models], "left")], cols, width)
    if any(f"ips_ndcg@{k}" in res["models"][m]["mean"] for m in models):
        est = res.get("estimates") or {}
        cols = [Column(label, [mean_cell(res["models"][m], key, len(blocks)) for m in models])
                for key, label in figures[2:]]
        tables += fit_tables(f"past the log, mean over blocks: inverse-propensity (propensity = (pop / max)^"
                             f"{est.get('ips_exponent')}, clipped at {est.get('ips_clip')}) and intervened test "
                             f"split ({est.get('intervened_per_item')} test pair(s) per item)",
                             [Column("model", [labels[m] for m in models], "left")], cols, width)
    for part, title in (("truth", "against the truth (simulator): share of the best true relevance in the top-K; "
                                  "NDCG/Recall on uniformly drawn items labelled by the truth"),
                        ("mar", "missing-at-random test set: NDCG/Recall of ranking each user's labelled items")):
        rows = [res["models"][m].get(part) for m in models]
        if not any(rows):
            continue
        keys = [key for key in rows[0] if not key.endswith("users")]
        cols = [Column(_metric_label(key.replace("truth_share", "share").replace("truth_", "").replace("mar_", "")),
                       [fmt((r or {}).get(key)) for r in rows]) for key in keys]
        cols.append(Column("users", [fmt((r or {}).get(f"{part}_users"), 0) for r in rows]))
        tables += fit_tables(title, [Column("model", [labels[m] for m in models], "left")], cols, width)
    return tables


def mean_cell(model: dict, key: str, blocks: int, digits: int = 4) -> str:
    """A mean over blocks; where the metric is undefined in some blocks (a popularity group without a test
    user) the mean skips them and says over how many blocks it runs: "0.1234 (2/3)"."""
    value, over = model["mean"].get(key), (model.get("mean_blocks") or {}).get(key)
    if value is None or over is None or over >= blocks:
        return fmt(value, digits)
    return f"{fmt(value, digits)} ({over}/{blocks})"


def _metric_label(key: str) -> str:
    name, _, k = key.partition("@")
    return {"ndcg": "NDCG", "recall": "Recall"}.get(name, name) + (f"@{k}" if k else "")


def segment_tables(segments: list[dict], width: int | None, wide: bool = False) -> list[Table]:
    """``ckd status``: one row per segment; the source path folds, the content hash is cut to 12 hex
    digits unless ``wide``."""
    cols = [Column("id", [str(s["id"]) for s in segments]),
            Column("source", [str(s["source"]) for s in segments], "left", fold=True),
            Column("rows", [f"{s['rows']:,}" for s in segments]),
            Column("first ts", [str(s["ts_min"]) for s in segments]),
            Column("last ts", [str(s["ts_max"]) for s in segments]),
            Column("content", [str(s["content_hash"]) if wide else str(s["content_hash"])[:12] for s in segments],
                   "left", fold=wide)]
    return [_table("segments", cols, [], False)]
