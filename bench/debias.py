"""Learning that de-biases: every training option on biased logs with a known truth, and on MovieLens-100K.

    python bench/debias.py [jobs/stream.yaml] [--options none,ips,pda,popneg,mar] [--datasets sim,ml-100k]
                           [--blocks N] [--epochs small|job] [--uniform 10] [--json out.json]

Datasets: simulated streams (``data.simulate``: drifting tastes, item births, Zipf-like exposure) at three
exposure skews × two correlations of true quality with popularity, each ingested into a temporary store,
plus MovieLens-100K (no truth: the inverse-propensity and intervened estimates instead). Each is cut into a
base block and incremental blocks and run through the job's stages in this process
(``continual.loop.run_stream_local``, the code the Ray actors run) with the job's teachers, student,
distillation and continual settings, every model trained with SMALL epochs (``EPOCHS``) so the bench fits
in a few minutes on one core, or (``--epochs job``) with the job's own epochs and best-epoch choice.

Training options (applied to every model, teachers and student alike):
  none     the job's training (biased: learns what the log shows), calibration off (`calibrate: none`)
  ips      train.debias: ips — each positive pair weighted by 1/propensity of its item (clipped,
           self-normalised; Saito et al., WSDM'20); MultVAE: weights on its row's log-likelihood terms
  pda      train.debias: pda — trained on ELU'(f)·m^γ, scored by f (Zhang et al., SIGIR'21); MultVAE:
           γ·log m added to its training logits
  popneg   train.negatives: popularity — negatives drawn ∝ (count + 1)^0.5 (MultVAE draws no negatives:
           it is trained as with none)
  mar      calibrate: mar — trained as with none, then every model's ranking calibrated after each update on
           the stream's missing-at-random sample (UNIFORM_PER_USER items drawn uniformly per user, labelled
           by the truth, collected over the stream; continual/calibrate.py) — the default job's own setting.
           MovieLens-100K has no such sample: there it is none

After the last block, every model is scored on the pooled test pairs of all blocks (train + valid masked):
logged NDCG@20, average popularity and coverage of the top-20; with a truth, the share of the best
achievable true relevance in the top-20 (share@20) and NDCG@5 on 100 uniformly drawn items per user
labelled by the truth (tNDCG@5); on MovieLens, the self-normalised inverse-propensity NDCG@20 (ips@20) and
NDCG@20 on the intervened test split (iv@20). A "popularity" row ranks by training popularity, an "ensemble"
row by the teachers' uniform rank fusion (``continual.ensemble``: the ranking the student's knowledge is drawn
from, over every item). Then the student's ratios to the best teacher (t), to popularity (p) and to the
ensemble (e), and each option's change over none per model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from continual_kd.config import load_job, parse_job  # noqa: E402
from continual_kd.continual import make_learners, run_stream_local  # noqa: E402
from continual_kd.continual.ensemble import RankFusionEnsemble  # noqa: E402
from continual_kd.continual.snapshot_eval import _truth_figures, _truth_inputs, truth_index  # noqa: E402
from continual_kd.data.simulate import SimulationConfig, simulate, uniform_sample  # noqa: E402
from continual_kd.eval import evaluate_ranking  # noqa: E402
from continual_kd.eval.estimates import intervened_split, popularity_propensity  # noqa: E402
from continual_kd.eval.protocol import eval_sets, training_popularity  # noqa: E402
from continual_kd.sparse import UserItemSet  # noqa: E402
from continual_kd.stream.labelled import ingest_labelled_file  # noqa: E402
from continual_kd.stream.store import StreamStore  # noqa: E402
from continual_kd.types import TEST  # noqa: E402

OPTIONS = {"none": {}, "ips": {"debias": "ips"}, "pda": {"debias": "pda"}, "popneg": {"negatives": "popularity"},
           "mar": {}}
# options that are a model's setting, not its train's: every option but mar trains and ranks without the sample (the
# default job calibrates on one when the store has it: option none is the job with that turned off)
MODEL_OPTIONS = {"mar": {"calibrate": "mar"}}
NO_CALIBRATION = {"calibrate": "none"}
UNIFORM_PER_USER = 10  # the simulated streams' missing-at-random sample: items shown uniformly to each user
SKEWS = (0.6, 1.0, 1.4)  # Zipf exponent of the exposure propensity
CORRELATIONS = (0.0, 0.5)  # correlation of true quality with exposure popularity
SIM = dict(users=500, items=700, clicks=20_000)  # per simulated stream (6 periods, drift, births: defaults)
EPOCHS = {"multvae": (20, 5)}  # (base, block) epochs; every other backbone: DEFAULT_EPOCHS
DEFAULT_EPOCHS = (10, 3)
K = 20


class PopularityRanking(torch.nn.Module):
    """Ranks every item by its training popularity (the same list for every user)."""

    def __init__(self, counts: torch.Tensor):
        super().__init__()
        self.counts = counts.float()
        self.num_items = len(counts)

    def observe(self, users, items) -> None:
        """Nothing to observe: the counts are fixed."""

    def full_scores(self, users: torch.Tensor) -> torch.Tensor:
        return self.counts.unsqueeze(0).repeat(len(users), 1)  # (B, I), a tensor of its own (masked in place)


def variant_job(job_dict: dict, option: str, blocks: dict, name: str, epochs: str = "small"):
    """The job with ``option`` in every model's train settings, this bench's blocks, and ``epochs``: small
    (``EPOCHS``) or the job's own."""
    def with_option(model: dict) -> dict:
        train = {**model.get("train", {}), **OPTIONS[option]}
        if epochs == "small":
            train["epochs_base"], train["epochs_block"] = EPOCHS.get(model.get("backbone", "mf"), DEFAULT_EPOCHS)
        return {**model, **MODEL_OPTIONS.get(option, NO_CALIBRATION), "train": train}

    slug = "".join(c if c.isalnum() or c in "-." else "_" for c in name)
    spec = {**job_dict, "name": f"debias-{slug}-{option}", "blocks": blocks,
            "teachers": [with_option(t) for t in job_dict["teachers"]], "student": with_option(job_dict["student"])}
    return parse_job(spec, f"bench/debias.py [{name}, {option}]")


def simulated_store(root: Path, skew: float, correlation: float, uniform: int = UNIFORM_PER_USER):
    """A temporary store holding one simulated stream and its missing-at-random sample (``uniform`` items
    shown uniformly to each user, labelled by the truth: what ``calibrate: mar`` learns from), and its truth."""
    table, truth = simulate(SimulationConfig(**SIM, exposure_skew=skew, quality_popularity=correlation, seed=0))
    store = StreamStore.open(root, create=True)
    store.ingest_table(table, source=f"simulate skew={skew} rho={correlation}")
    if uniform > 0:
        path = root / "uniform.parquet"
        pq.write_table(uniform_sample(truth, uniform, seed=0), path)
        ingest_labelled_file(store, path)
    return store, truth


def movielens_store(root: Path):
    from continual_kd.data.movielens import load_movielens_100k

    store = StreamStore.open(root, create=True)
    store.ingest_table(load_movielens_100k(), source="movielens-100k")
    return store, None


def past_the_log(model, seen, spec, seed: int) -> dict:
    """Pooled inverse-propensity NDCG@K and NDCG@K on the intervened test split (``eval.estimates``)."""
    popularity = training_popularity(seen)
    weight = 1.0 / popularity_propensity(popularity, spec.ips_exponent, spec.ips_clip)
    relevant, exclude = eval_sets(seen, None, TEST, "cpu", spec.mask)
    keep = torch.as_tensor(intervened_split(relevant.users.numpy(), relevant.items.numpy(),
                                            spec.intervened_per_item, seed))
    iv = UserItemSet(relevant.users[keep].numpy(), relevant.items[keep].numpy(), seen.num_users, seen.num_items)
    ips = evaluate_ranking(model, relevant, exclude, (K,), spec.chunk_size, "cpu", item_weight=weight)
    return {f"ips@{K}": ips[f"ips_ndcg@{K}"], f"iv@{K}": evaluate_ranking(model, iv, exclude, (K,))[f"ndcg@{K}"]}


def run_one(job_dict: dict, name: str, option: str, store, truth, blocks: dict, n_blocks: int | None,
            epochs: str = "small") -> dict:
    job = variant_job(job_dict, option, blocks, name, epochs)
    b = job.blocks
    plan = store.ensure_plan(b.base_fraction, b.incremental, b.plan_split, job.seed)
    n = plan.num_blocks if n_blocks is None else min(n_blocks, plan.num_blocks)
    t0 = time.perf_counter()
    learners = make_learners(job)
    results = run_stream_local(job, lambda k: store.read_blocks(plan.plan_id, k), n, learners=learners)
    seen = store.read_blocks(plan.plan_id, n - 1)
    for learner in learners.values():
        learner.observe(seen)  # every non-test pair: graph / input rows for scoring
    models = {key: lr.model for key, lr in learners.items()}
    counts = training_popularity(seen)
    models["popularity"] = PopularityRanking(counts)
    relevant, exclude = eval_sets(seen, None, TEST, "cpu", job.eval.mask)
    models["ensemble"] = RankFusionEnsemble([lr.model for key, lr in learners.items() if key != "student"],
                                            exclude=exclude)
    truth_set = None
    if truth is not None:
        ti = truth_index(truth, store.external_ids("user", np.arange(seen.num_users)),
                         store.external_ids("item", np.arange(seen.num_items)))
        truth_set = _truth_inputs(ti, seen, job.eval, "cpu", job.seed)
    rows = {}
    for key, model in models.items():
        logged = evaluate_ranking(model, relevant, exclude, (K,), item_popularity=counts)
        row = {"ndcg": logged[f"ndcg@{K}"], "avgpop": logged[f"avgpop@{K}"], "coverage": logged[f"coverage@{K}"]}
        if truth_set is not None:
            t = _truth_figures(model, truth_set, (K,), (5, K), job.eval.chunk_size)
            row.update({"share": t[f"truth_share@{K}"], "tndcg5": t["truth_ndcg@5"]})
        else:
            est = past_the_log(model, seen, job.eval, job.seed)
            row.update({"ips": est[f"ips@{K}"], "iv": est[f"iv@{K}"]})
        rows[key] = row
    stages: dict[str, float] = {}
    for r in results:
        for stage, sec in r.stages.items():
            stages[stage] = stages.get(stage, 0.0) + sec
    return {"rows": rows, "seconds": time.perf_counter() - t0, "blocks": n, "stages": stages,
            "update_seconds": {k: sum(r.updates[k].get("seconds") or 0.0 for r in results) for k in learners}}


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) and not math.isnan(b) else float("nan")


def student_ratios(rows: dict, metrics: list[str]) -> dict:
    teachers = [k for k in rows if k.startswith("teacher:")]
    out = {}
    for m in metrics:
        best = max(rows[t][m] for t in teachers) if teachers else float("nan")
        out[m] = {"to_best_teacher": _ratio(rows["student"][m], best),
                  "to_popularity": _ratio(rows["student"][m], rows["popularity"][m]),
                  "to_ensemble": _ratio(rows["student"][m], rows["ensemble"][m]) if "ensemble" in rows else math.nan}
    return out


def _short(model: str) -> str:
    return model.split(":", 1)[-1]


def print_dataset(name: str, by_option: dict, truth: bool) -> None:
    cols = ["ndcg", "share", "tndcg5"] if truth else ["ndcg", "ips", "iv"]
    heads = {"ndcg": f"NDCG@{K}", "share": f"share@{K}", "tndcg5": "tNDCG@5", "ips": f"ips@{K}", "iv": f"iv@{K}"}
    print(f"\n{name}  (pooled test of every block, train + valid masked; "
          + ("truth: share of best true relevance, NDCG@5 on uniform labels)" if truth
             else "estimates: self-normalised IPS NDCG, intervened-split NDCG)"))
    head = f"{'option':<7} {'model':<10} " + " ".join(f"{heads[c]:>9}" for c in cols) + f" {'avgpop':>7} {'cover':>6}"
    print(head)
    print("-" * len(head))
    for option, rep in by_option.items():
        for model, row in rep["rows"].items():
            print(f"{option:<7} {_short(model):<10} " + " ".join(f"{row[c]:>9.4f}" for c in cols)
                  + f" {row['avgpop']:>7.1f} {row['coverage']:>6.3f}")
        ratios = student_ratios(rep["rows"], cols)
        print(f"{option:<7} {'student/':<10} " + " ".join(f"{ratios[c]['to_best_teacher']:>8.2f}t" for c in cols)
              + f"   ({rep['seconds']:.0f}s)")
        print(f"{'':<7} {'':<10} " + " ".join(f"{ratios[c]['to_popularity']:>8.2f}p" for c in cols))
        print(f"{'':<7} {'':<10} " + " ".join(f"{ratios[c]['to_ensemble']:>8.2f}e" for c in cols))


def print_changes(report: dict) -> None:
    """Per option and model: mean over the simulated streams of share@20 relative to none, and the change of
    logged NDCG@20 on MovieLens-100K relative to none."""
    sims = [n for n in report if n.startswith("sim")]
    options = [o for o in next(iter(report.values())) if o != "none"]
    models = list(next(iter(next(iter(report.values())).values()))["rows"])
    print("\nchange over none: share@20 (mean over the simulated streams, min–max) | logged NDCG@20 and iv@20 on "
          "MovieLens-100K")
    for option in options:
        for model in models:
            cells = []
            rel = [report[n][option]["rows"][model]["share"] / report[n]["none"]["rows"][model]["share"] - 1
                   for n in sims if "none" in report[n] and option in report[n]]
            if rel:  # (without option none in the run there is nothing to compare with)
                cells.append(f"share {np.mean(rel):+.1%} ({min(rel):+.1%}…{max(rel):+.1%})")
            if "ml-100k" in report and "none" in report["ml-100k"] and option in report["ml-100k"]:
                a, b = report["ml-100k"][option]["rows"][model], report["ml-100k"]["none"]["rows"][model]
                cells.append(f"ML NDCG@20 {a['ndcg'] / b['ndcg'] - 1:+.1%}  iv@20 {a['iv'] / b['iv'] - 1:+.1%}")
            print(f"  {option:<7} {_short(model):<10} " + "  |  ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", nargs="?", default="jobs/stream.yaml")
    ap.add_argument("--options", default=",".join(OPTIONS))
    ap.add_argument("--datasets", default="sim,ml-100k", help="sim (3 skews × 2 correlations), ml-100k")
    ap.add_argument("--sims", default=None, help="only these simulated settings, e.g. 1.0:0.5,1.4:0.0 (skew:correlation)")
    ap.add_argument("--merge", type=Path, nargs="*", default=None,
                    help="print the tables of --json files written by earlier runs (parts of one bench), no training")
    ap.add_argument("--incremental", type=int, default=2, help="incremental blocks after the 50%% base block")
    ap.add_argument("--blocks", type=int, default=None, help="run only the first N blocks")
    ap.add_argument("--epochs", choices=("small", "job"), default="small",
                    help="small: 10 base / 3 per block (MultVAE 20 / 5), fast; job: the job's own epochs")
    ap.add_argument("--uniform", type=int, default=UNIFORM_PER_USER,
                    help="items shown uniformly to each simulated user: the missing-at-random sample option mar "
                         "learns from (Yahoo!R3 has 10 per user, Coat 16)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    job_dict = load_job(args.job).to_dict()
    st, cont = job_dict["student"], job_dict["continual"]
    print(f"{args.job}: student {st['backbone']} dim {st['dim']}, teachers "
          f"{', '.join(t['name'] for t in job_dict['teachers'])}, terms "
          f"{', '.join(t['name'] for t in job_dict['distill']['terms'])}, feedback "
          f"{', '.join(t['name'] for t in job_dict['distill']['feedback']) or '-'}, replay {cont.get('replay', 0)}",
          flush=True)
    blocks = {"base_fraction": 0.5, "incremental": args.incremental, "split": [0.8, 0.1, 0.1]}
    options = args.options.split(",")
    datasets = args.datasets.split(",")
    t_start = time.perf_counter()
    report: dict = {}
    if args.merge:
        for path in args.merge:
            report.update(json.loads(path.read_text())["datasets"])
        for name, by_option in report.items():
            print_dataset(name, by_option, "share" in next(iter(by_option.values()))["rows"]["student"])
        print_changes(report)
        print(f"seconds of training + evaluation: {sum(r['seconds'] for d in report.values() for r in d.values()):.0f}")
        return
    with tempfile.TemporaryDirectory(prefix="ckd-debias-") as tmp:
        todo = []
        if "sim" in datasets:
            sims = ([tuple(float(x) for x in p.split(":")) for p in args.sims.split(",")] if args.sims
                    else [(s, c) for s in SKEWS for c in CORRELATIONS])
            todo += [(f"sim skew={s} rho={c}", (s, c)) for s, c in sims]
        if "ml-100k" in datasets:
            todo.append(("ml-100k", None))
        for i, (name, params) in enumerate(todo):
            root = Path(tmp) / f"store-{i}"
            store, truth = simulated_store(root, *params, uniform=args.uniform) if params else movielens_store(root)
            report[name] = {}
            for option in options:
                report[name][option] = run_one(job_dict, name, option, store, truth, blocks, args.blocks, args.epochs)
                print(f"  {name} {option}: {report[name][option]['seconds']:.0f}s", flush=True)
            print_dataset(name, report[name], truth is not None)
    print_changes(report)
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")
    print(f"reproduce: python bench/debias.py {args.job} --options {args.options} --datasets {args.datasets} "
          f"--incremental {args.incremental} --epochs {args.epochs} --uniform {args.uniform}"
          + (f" --blocks {args.blocks}" if args.blocks else ""))
    if args.json:
        args.json.write_text(json.dumps({"job": args.job, "job_spec": job_dict,
                                         "epochs": {"default": DEFAULT_EPOCHS, **EPOCHS} if args.epochs == "small" else "job",
                                         "simulation": SIM, "uniform_per_user": args.uniform, "datasets": report},
                                        indent=2, default=str))


if __name__ == "__main__":
    main()
