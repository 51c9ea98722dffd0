import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from continual_kd.config import (BACKBONE_NAMES, TERM_NAMES, ContinualSpec, DistillSpec, HetCompTermSpec,
                                 KeepTermSpec,
                                 JobSpec, ProxySpec, RRDTermSpec, SyntheticSpec, UnKDTermSpec, load_job, parse_job)
from continual_kd.errors import CkdError

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
T = [{"name": "t"}]  # one default teacher, so that KD terms are allowed
OLD_FORM = ("distill.method: the one-method form was replaced by a list of terms (got method: 'rrd'); "
            "write e.g. distill: {terms: [{name: rrd, weight: 0.01, k: 40}, {name: unkd, weight: 0.05}]}")


def _error(data) -> str:
    with pytest.raises(CkdError) as e:
        parse_job(data, "job.yaml")
    assert e.value.exit_code == 2
    return str(e.value)


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_shipped_job_files_parse_and_round_trip(job):
    spec = load_job(job)
    assert spec.name == job.stem and spec.distill.terms
    assert parse_job(spec.to_dict()) == spec
    again = parse_job(json.loads(json.dumps(spec.to_dict())), "manifest.json")  # as a snapshot manifest holds it
    assert again == spec and again.config_hash() == spec.config_hash()


def test_job_files_keep_their_settings_in_the_terms_form():
    stream = load_job(ROOT / "jobs" / "stream.yaml")
    assert stream.source.dataset == "movielens-100k"
    assert (stream.blocks.base_fraction, stream.blocks.incremental) == (0.5, 5)
    assert sorted(t.backbone for t in stream.teachers) == ["lightgcn", "mf", "multvae"]
    assert stream.student.backbone == "mf" and stream.student.dim <= max(t.dim for t in stream.teachers) // 8
    assert stream.distill.terms == (
        RRDTermSpec(weight=0.01, k=40, pool=500, uninteresting=40),
        UnKDTermSpec(weight=0.05, groups=4, pairs=32, per_group=200, temperature=20.0))
    assert (stream.distill.fusion, stream.distill.teacher_weights) == ("rank", "uniform")
    assert (stream.distill.fusion_popularity, stream.distill.fusion_popularity_tolerance) == ("least_teacher", 0.05)
    assert [t.name for t in stream.distill.feedback] == ["bd", "keep"]
    assert stream.distill.feedback[1] == KeepTermSpec(weight=0.001, k=40, uninteresting=40, users="absent",
                                                      models=("lightgcn",))
    assert stream.continual == ContinualSpec(strategy="warm", order="teachers_first", proxies=None, replay=2.0,
                                             knowledge_users="all")
    vae = next(t for t in stream.teachers if t.backbone == "multvae").train  # its warm start chosen per update
    assert (vae.grid_block, vae.perturb_block, vae.shrink_block) == ({"shrink_block": (1.0, 0.7)}, 0.01, None)
    assert vae.grid_block_probe == 3  # raced: only the better start after 3 epochs trains on
    by_name = {t.backbone: t.train for t in stream.teachers}  # hard negatives (DNS) or not, chosen on validation
    assert by_name["mf"].grid == {"weight_decay": (0.0001, 0.001, 0.01), "hard_negatives": (1, 4)}
    assert by_name["lightgcn"].grid == {"hard_negatives": (1, 4)} and stream.student.train.hard_negatives == 1
    # every model calibrated on a missing-at-random sample when the store holds one (MovieLens-100K: none)
    assert [m.calibrate for m in (*stream.teachers, stream.student)] == ["mar"] * 4
    synthetic = load_job(ROOT / "jobs" / "synthetic-stream.yaml")  # the stream of issue 19's bench: the same models
    assert [t.model_dump() for t in synthetic.teachers] == [t.model_dump() for t in stream.teachers]
    assert synthetic.distill == stream.distill and synthetic.continual == stream.continual  # kept in step

    het = load_job(ROOT / "jobs" / "hetcomp.yaml")
    assert het.distill.terms == (HetCompTermSpec(weight=1.0, checkpoints=4, k=50, observed=10, early_weight=0.01,
                                                 late_weight=0.005, dkc_every=5, with_bpr=False),)
    assert het.distill.fusion == "importance"

    unkd = load_job(ROOT / "jobs" / "unkd.yaml")
    assert [t.name for t in unkd.distill.terms] == ["unkd"] and unkd.distill.term("rrd") is None

    single = load_job(ROOT / "jobs" / "rrd-mf.yaml")  # the single-teacher RRD job of the skeleton
    assert [(t.backbone, t.dim) for t in single.teachers] == [("mf", 128)]
    assert single.student.dim == 16 and single.distill.term("rrd") == RRDTermSpec(mode="direct")

    small = load_job(ROOT / "jobs" / "synthetic-small.yaml")
    assert small.distill.term("rrd") == RRDTermSpec(k=20, pool=50, uninteresting=20)
    assert (small.source.synthetic.users, small.source.synthetic.items) == (300, 200)


def test_terms_parse_with_their_defaults_and_lookup():
    job = parse_job({"teachers": T, "distill": {
        "terms": [{"name": "rrd", "score_clamp": 10}, {"name": "unkd"}, {"name": "rrd", "k": 5, "pool": 5}],
        "feedback": [{"name": "bd"}, {"name": "replay", "source": "peers"}, {"name": "keep"}]}})
    d = job.distill
    assert d.needs_teachers and d.term("rrd").score_clamp == 10.0 and d.term("rrd").k == 40  # the first one
    assert [t.name for t in d.terms] == ["rrd", "unkd", "rrd"]
    bd, replay, keep = d.feedback
    assert (bd.weight, bd.temperature, bd.eps_teacher, bd.eps_student, bd.sign, bd.refresh) == (0.5, 5.0, 1e-4, 1e-2,
                                                                                              "code", 10)
    assert (replay.weight, replay.decay, replay.top, replay.eps, replay.every, replay.per_user) == (0.5, 10.0, 50,
                                                                                                  1e-4, 5, 10)
    assert (keep.weight, keep.k, keep.uninteresting) == (0.01, 40, 40)
    assert d.term("bd") is None  # term() looks at the teacher → student terms only
    het = parse_job({"teachers": T, "distill": {"terms": [{"name": "hetcomp"}, {"name": "ir_rrd"}]}}).distill
    assert (het.terms[0].weight, het.terms[0].checkpoints, het.terms[0].k, het.terms[0].dkc_every) == (1.0, 4, 100, 10)
    assert (het.terms[1].k, het.terms[1].pool, het.terms[1].uninteresting) == (40, 500, 40)
    assert not DistillSpec().needs_teachers and parse_job({}).distill.terms == ()
    from continual_kd.distill import TERMS

    # every spec has its term and every term of the package its spec (tests may register probe terms)
    assert set(TERM_NAMES) == {n for n, cls in TERMS.items() if cls.__module__.startswith("continual_kd.")}
    assert {"rrd", "ir_rrd", "unkd", "hetcomp", "bd", "replay", "keep", "rd", "cd", "de"} <= set(TERM_NAMES)


def test_continual_section():
    job = parse_job({"teachers": T, "continual": {"strategy": "scratch", "order": "student_first", "proxies": {}},
                     "distill": {"terms": [{"name": "replay"}]}})
    assert job.continual == ContinualSpec(strategy="scratch", order="student_first",
                                          proxies=ProxySpec(stability=0.9, plasticity=0.1))
    assert parse_job({}).continual == ContinualSpec(strategy="warm", order="teachers_first", proxies=None)


def test_strict_types_but_integers_are_numbers():
    job = parse_job({"teachers": [{"name": "t", "train": {"lr": 1}}], "distill": {"terms": [{"name": "rrd", "weight": 1}]}})
    assert type(job.teachers[0].train.lr) is float and job.teachers[0].train.lr == 1.0
    assert type(job.distill.terms[0].weight) is float
    assert type(job.teachers) is tuple and type(job.eval.ks) is tuple and type(job.blocks.split) is tuple
    with pytest.raises(ValidationError):  # frozen
        job.seed = 3  # type: ignore[misc]


# (data, the whole message after "job.yaml: ")
BAD = [
    ({"teachers": [{"name": "t", "dim": -3}]}, "teachers[0].dim: must be a positive integer (got -3); use a value ≥ 1"),
    ({"colour": "red"}, "colour: unknown top-level key (got 'red'); the top-level keys are name, seed, source, "
                        "blocks, teachers, student, distill, continual, eval, snapshots, runtime, tune"),
    ({"student": {"dims": 8}}, "student.dims: unknown key (got 8); the keys of student are name, backbone, dim, "
                               "layers, hidden, dropout, beta, init, rank_penalty, rank_penalty_tolerance, calibrate, "
                               "calibrate_l2, train, resources, workers"),
    ({"teachers": T, "distill": {"terms": [{"name": "unkd", "pair": 3}]}},
     "distill.terms[0].pair: unknown key (got 3); the keys of distill.terms[0] are name, weight, groups, pairs, "
     "per_group, temperature, models"),
    ({"continual": {"proxy": None}}, "continual.proxy: unknown key (got null); the keys of continual are strategy, "
                                     "replay, replay_by, knowledge_users, order, proxies"),
    ({"teachers": "mf"}, "teachers: must be a list (got 'mf'); write a YAML list: [a, b] or one '- ' line per element"),
    ({"teachers": ["mf"]}, "teachers[0]: must be a mapping (got 'mf'); write key: value pairs (name, backbone, dim, "
                           "layers, hidden, dropout, beta, init, rank_penalty, rank_penalty_tolerance, calibrate, "
                           "calibrate_l2, train, resources, workers)"),
    ({"blocks": {"split": [0.5, 0.5]}}, "blocks.split: needs 3 values (train, valid, test) (got [0.5, 0.5]); "
                                        "write e.g. [0.8, 0.1, 0.1]"),
    ({"blocks": {"split": [0.5, 0.3, 0.1]}}, "blocks.split: three non-negative fractions (train, valid, test) summing "
                                             "to 1, train > 0 (got [0.5, 0.3, 0.1]); e.g. [0.8, 0.1, 0.1]"),
    ({"blocks": {"base_fraction": 1.5}}, "blocks.base_fraction: must be < 1 (got 1.5); use a value < 1"),
    ({"eval": {"ks": [10, "a"]}}, "eval.ks[1]: must be an integer (got 'a'); write a whole number without quotes"),
    ({"eval": {"ks": []}}, "eval.ks: needs at least 1 value(s) (got []); add values"),
    ({"seed": 1.5}, "seed: must be an integer (got 1.5); write a whole number without quotes"),
    ({"seed": "3"}, "seed: must be an integer (got '3'); write a whole number without quotes"),
    ({"seed": True}, "seed: must be an integer (got true); write a whole number without quotes"),
    ({"seed": -1}, "seed: must be ≥ 0 (got -1); use a value ≥ 0"),
    ({"student": {"resources": {"num_cpus": -1}}}, "student.resources.num_cpus: must be ≥ 0 (got -1); use a value ≥ 0"),
    ({"teachers": [{"name": "t", "train": {"weight_decay": "1e-4"}}]},
     "teachers[0].train.weight_decay: must be a number (got '1e-4'); write the exponent with a decimal point, "
     "e.g. 1.0e-4 (YAML reads 1e-4 as text)"),
    ({"teachers": [{"name": "t", "train": {"lr": 0}}]}, "teachers[0].train.lr: must be > 0 (got 0); use a value > 0"),
    ({"student": {"dropout": float("nan")}}, "student.dropout: must be a finite number (got nan); "
                                              "write an ordinary number"),
    ({"student": {"train": {"epochs_base": "many"}}}, "student.train.epochs_base: must be an integer (got 'many'); "
                                                      "write a whole number without quotes"),
    ({"teachers": [{"name": "t", "backbone": "xgboost"}]},
     "teachers[0].backbone: not one of the choices (got 'xgboost'); use one of 'mf', 'lightgcn', 'multvae' or 'pathrec'"),
    ({"teachers": [{"name": "student"}]},
     "student.name: model names must be unique, teachers[0] has it too (got 'student'); rename one of them"),
    ({"teachers": [{"name": "a/b"}]}, "teachers[0].name: not a safe name (got 'a/b'); use 1-64 letters, digits, "
                                      "'_', '-' or '.', starting with a letter or digit, without '..'"),
    ({"source": {"dataset": "netflix"}},
     "source.dataset: not one of the choices (got 'netflix'); use one of 'movielens-100k', 'synthetic', 'store' or 'files'"),
    ({"runtime": {"num_cpus": 0}}, "runtime.num_cpus: must be a positive integer (got 0); use a value ≥ 1"),
    ({"runtime": {"device": "tpu"}}, "runtime.device: not one of the choices (got 'tpu'); use one of 'auto', 'cpu' "
                                     "or 'cuda'"),
    ({"snapshots": {"keep": [-1]}}, "snapshots.keep[0]: must be ≥ 0 (got -1); use a value ≥ 0"),
    # job names are path components (runs/<name>)
    *[({"name": n}, f"name: not a safe name (got {n!r}); use 1-64 letters, digits, '_', '-' or '.', starting with "
                    "a letter or digit, without '..'") for n in ["..", ".", "a/b", ".hidden", "", "a b", "x..y",
                                                                 "a\\b", "n" * 65, "a\n"]],
    ({"name": 5}, "name: must be a string (got 5); quote it"),
    # source.synthetic
    ({"source": {"synthetic": {"users": 1}}}, "source.synthetic.users: must be ≥ 2 (got 1); use a value ≥ 2"),
    ({"source": {"synthetic": {"drift": 1.5}}}, "source.synthetic.drift: must be ≤ 1 (got 1.5); use a value ≤ 1"),
    ({"source": {"synthetic": {"new_item_fraction": 1}}},
     "source.synthetic.new_item_fraction: must be < 1 (got 1); use a value < 1"),
    ({"source": {"synthetic": {"temperature": 0}}}, "source.synthetic.temperature: must be > 0 (got 0); "
                                                    "use a value > 0"),
    ({"source": {"synthetic": {"periods": 1}}},
     "source.synthetic.new_user_fraction: must be 0 when periods is 1 (nothing can arrive later) (got 0.3); "
     "set periods ≥ 2 or the fraction to 0"),
    ({"source": {"synthetic": {"users": 100, "interactions": 50}}},
     "source.synthetic.interactions: every user interacts at least once, so it must be ≥ users (100) (got 50); "
     "raise interactions or lower users"),
    ({"source": {"synthetic": {"users": 10, "items": 10, "interactions": 51}}},
     "source.synthetic.interactions: must be ≤ users·items/2 (50) (got 51); lower interactions or add users/items"),
    ({"source": {"synthetic": {"seed": "0"}}}, "source.synthetic.seed: must be an integer (got '0'); "
                                               "write a whole number without quotes"),
    # KD terms
    ({"teachers": T, "distill": {"terms": [{"name": "unkd"}, {"name": "rrd", "temperature": -1}]}},
     "distill.terms[1].temperature: must be > 0 (got -1); use a value > 0"),
    ({"teachers": T, "distill": {"terms": [{"name": "rrd", "score_clamp": -5}]}},
     "distill.terms[0].score_clamp: must be > 0 (got -5); use a value > 0"),
    ({"teachers": T, "distill": {"terms": [{"name": "ir_rrd", "score_clamp": 0}]}},
     "distill.terms[0].score_clamp: must be > 0 (got 0); use a value > 0"),
    ({"teachers": T, "distill": {"terms": [{"name": "rrd", "k": 50, "pool": 10}]}},
     "distill.terms[0].pool: must be ≥ k (50) (got 10); raise pool or lower k"),
    ({"teachers": T, "distill": {"terms": [{"name": "rrd", "mode": "random"}]}},
     "distill.terms[0].mode: not one of the choices (got 'random'); use one of 'direct' or 'sample'"),
    ({"teachers": T, "distill": {"terms": [{"name": "unkd", "groups": 8, "pairs": 4}]}},
     "distill.terms[0].pairs: at least one pair per group is needed, so it must be ≥ groups (8) (got 4); "
     "raise pairs or lower groups"),
    ({"teachers": T, "distill": {"terms": [{"name": "unkd", "per_group": 1}]}},
     "distill.terms[0].per_group: must be ≥ 2 (got 1); use a value ≥ 2"),
    ({"teachers": T, "distill": {"terms": [{"name": "rrd", "weight": -0.1}]}},
     "distill.terms[0].weight: must be ≥ 0 (got -0.1); use a value ≥ 0"),
    ({"teachers": T, "distill": {"terms": [{"name": "hetcomp", "with_bpr": "no"}]}},
     "distill.terms[0].with_bpr: must be true or false (got 'no'); write true or false"),
    ({"teachers": T, "distill": {"feedback": [{"name": "bd", "sign": "minus"}]}},
     "distill.feedback[0].sign: not one of the choices (got 'minus'); use one of 'code' or 'paper'"),
    ({"teachers": T, "distill": {"feedback": [{"name": "replay", "decay": 0}]}},
     "distill.feedback[0].decay: must be > 0 (got 0); use a value > 0"),
    ({"teachers": T, "distill": {"terms": [{"weight": 0.01}]}},
     f"distill.terms[0].name: a term needs a name (got no name); use one of {', '.join(TERM_NAMES)}"),
    ({"teachers": T, "distill": {"terms": [{"name": "rdx"}]}},
     f"distill.terms[0].name: unknown term (got 'rdx'); use one of {', '.join(TERM_NAMES)}"),
    ({"teachers": T, "distill": {"terms": ["rrd"]}},
     "distill.terms[0]: a term is a mapping with a name (got 'rrd'); write e.g. {name: rrd, weight: 0.01}"),
    ({"teachers": T, "distill": {"terms": {"name": "rrd"}}},
     "distill.terms: must be a list (got {'name': 'rrd'}); write a YAML list: [a, b] or one '- ' line per element"),
    ({"teachers": T, "distill": {"fusion": "vote"}},
     "distill.fusion: not one of the choices (got 'vote'); use one of 'rank' or 'importance'"),
    # cross-section checks
    ({"distill": {"terms": [{"name": "rrd"}, {"name": "unkd"}]}},
     "teachers: distill.terms (rrd, unkd) needs at least one teacher (got no teachers); "
     "add a teacher or remove distill.terms"),
    ({"distill": {"feedback": [{"name": "bd"}]}},
     "teachers: distill.feedback (bd) needs at least one teacher (got no teachers); "
     "add a teacher or remove distill.feedback"),
    ({"teachers": [{"name": "a"}, {"name": "b", "train": {"epochs_base": 6, "epochs_block": 3}}],
      "distill": {"terms": [{"name": "hetcomp", "checkpoints": 4}]}},
     "distill.terms[0].checkpoints: must be ≤ the epochs of every update (teachers[1].train.epochs_block is 3) "
     "(got 4); lower checkpoints to 3 or raise teachers[1].train.epochs_block"),
    ({"teachers": T, "student": {"train": {"epochs_base": 2}},
      "distill": {"feedback": [{"name": "hetcomp", "checkpoints": 3}]}},
     "distill.feedback[0].checkpoints: must be ≤ the epochs of every update (student.train.epochs_base is 2) "
     "(got 3); lower checkpoints to 2 or raise student.train.epochs_base"),
    ({"teachers": T, "distill": {"feedback": [{"name": "bd"}, {"name": "keep", "models": ["t", "gcn"]}]}},
     "distill.feedback[1].models: names no teacher of this job (got 'gcn'); use names from t"),
    ({"teachers": T, "distill": {"terms": [{"name": "rrd", "models": ["t"]}]}},
     "distill.terms[0].models: chooses teachers, which only feedback terms train (distill.terms train the student) "
     "(got ['t']); drop models, or move the term to distill.feedback"),
    ({"teachers": T, "distill": {"terms": [{"name": "replay"}]}},
     "distill.terms[0].source: replays the student's proxies, which are off (got 'proxies'); set continual.proxies "
     "(e.g. {stability: 0.9, plasticity: 0.1}) or use source: peers"),
    ({"continual": {"proxies": {"stability": 1.5}}},
     "continual.proxies.stability: must be ≤ 1 (got 1.5); use a value ≤ 1"),
    ({"continual": {"order": "both"}},
     "continual.order: not one of the choices (got 'both'); use one of 'teachers_first' or 'student_first'"),
    # the replaced one-method form
    ({"teachers": T, "distill": {"method": "rrd", "weight": 0.01, "k": 40}}, OLD_FORM),
    ({"distill": {"unkd": {"weight": 0.05}}},
     "distill.unkd: the one-method form was replaced by a list of terms (got unkd: {'weight': 0.05}); "
     "write e.g. distill: {terms: [{name: rrd, weight: 0.01, k: 40}, {name: unkd, weight: 0.05}]}"),
]


@pytest.mark.parametrize("data, message", BAD, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(BAD)])
def test_bad_job_specs_name_file_field_value_and_fix(data, message):
    text = _error(data)
    assert text == f"job.yaml: {message}"
    assert re.fullmatch(r"job\.yaml: [^ ]+: .+ \(got .+\); .+", text)  # <file>: <path>: <problem> (got <v>); <fix>


def test_old_distill_form_in_a_job_file(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text("name: old\nteachers: [{name: t}]\ndistill: {method: rrd, weight: 0.01, k: 10}\n")
    with pytest.raises(CkdError) as e:
        load_job(p)
    assert str(e.value) == f"{p}: {OLD_FORM}"


def test_bad_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nteachers: [\n  - oops: : :\n")
    with pytest.raises(CkdError, match=r"bad.yaml: not valid YAML at line \d+"):
        load_job(p)
    with pytest.raises(CkdError, match="job file not found"):
        load_job(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(CkdError, match="must be a YAML mapping"):
        load_job(tmp_path / "list.yaml")


def test_conftest_tiny_job_is_the_terms_form():
    from conftest import TINY_JOB

    job = parse_job(yaml.safe_load(TINY_JOB.format(name="tiny", seed=0, store="stores/tiny")), "tiny.yaml")
    assert job.distill.terms == (RRDTermSpec(weight=0.01, k=10, pool=30, uninteresting=10),)


def test_round_trip_of_a_job_using_every_section():
    job = parse_job({
        "name": "all-1.x", "seed": 7, "source": {"dataset": "synthetic", "synthetic": {"users": 50, "items": 40,
                                                                                       "interactions": 500}},
        "blocks": {"split": [0.7, 0.2, 0.1]}, "teachers": [{"name": "g", "backbone": "lightgcn", "layers": 3}],
        "student": {"dim": 4, "resources": {"num_gpus": 0.5}},
        "distill": {"terms": [{"name": "rrd", "score_clamp": 10}, {"name": "hetcomp", "checkpoints": 2}],
                    "feedback": [{"name": "replay", "source": "proxies"}], "teacher_weights": "valid_ndcg"},
        "continual": {"order": "student_first", "proxies": {"stability": 1, "plasticity": 0}},
        "eval": {"ks": [5]}, "snapshots": {"keep": [0, 2]}, "runtime": {"num_cpus": 2, "device": "cpu"}})
    assert parse_job(job.to_dict()) == job
    assert parse_job(json.loads(json.dumps(job.to_dict()))) == job
    assert job.snapshot_dir == Path("runs/all-1.x")
    assert parse_job({"snapshots": {"dir": "elsewhere"}}).snapshot_dir == Path("elsewhere")
    assert job.teachers[0].backbone_params() == {"dim": 16, "layers": 3}
    assert JobSpec().to_dict() == parse_job({}).to_dict()


def test_config_hash_ignores_where_it_runs():
    base = {"teachers": T, "distill": {"terms": [{"name": "rrd"}]}}
    a = parse_job(base)
    b = parse_job({**base, "teachers": [{"name": "t", "resources": {"num_cpus": 0.5, "num_gpus": 1}}],
                   "student": {"resources": {"num_cpus": 3}}, "runtime": {"num_cpus": 8, "max_restarts": 0},
                   "snapshots": {"dir": "elsewhere", "keep_last": 2}})
    assert a.config_hash() == b.config_hash()
    changed = [
        {**base, "teachers": [{"name": "t", "dim": 32}]},
        {**base, "distill": {"terms": [{"name": "rrd", "k": 41}]}},
        {**base, "distill": {"terms": [{"name": "rrd"}, {"name": "unkd"}]}},
        {**base, "distill": {"terms": [{"name": "rrd"}], "feedback": [{"name": "keep"}]}},
        {**base, "continual": {"strategy": "scratch"}},
        {**base, "seed": 1},
    ]
    hashes = {a.config_hash(), *(parse_job(c).config_hash() for c in changed)}
    assert len(hashes) == 1 + len(changed)
    assert re.fullmatch(r"[0-9a-f]{16}", a.config_hash())


@pytest.mark.parametrize("fields", [
    {}, {"users": 2, "items": 2, "interactions": 2, "periods": 1, "new_user_fraction": 0, "new_item_fraction": 0},
    {"users": 1}, {"items": 1}, {"interactions": 0}, {"periods": 0}, {"periods": 1},
    {"periods": 1, "new_user_fraction": 0, "new_item_fraction": 0}, {"popularity_exponent": -0.5},
    {"popularity_exponent": 0}, {"drift": 0}, {"drift": 1}, {"drift": -0.1}, {"new_user_fraction": 0.99},
    {"new_user_fraction": 1.0}, {"new_item_fraction": -0.1}, {"latent_dim": 0}, {"latent_dim": 1},
    {"temperature": 0}, {"temperature": 1e-3}, {"seed": -1}, {"users": 100, "items": 10, "interactions": 99},
    {"users": 100, "items": 10, "interactions": 500}, {"users": 100, "items": 10, "interactions": 501},
])
def test_synthetic_spec_and_the_generator_agree(fields):
    """Whatever the spec admits the generator's SyntheticConfig accepts; what it refuses the spec refuses
    (the spec is stricter only where it says so: users/items ≥ 2, drift ≤ 1)."""
    from continual_kd.data.synthetic import SyntheticConfig

    try:
        spec = parse_job({"source": {"synthetic": fields}}).source.synthetic
    except CkdError:
        spec = None
    try:
        SyntheticConfig(**{**SyntheticSpec().model_dump(), **fields})
        generator_ok = True
    except CkdError:
        generator_ok = False
    if spec is not None:
        assert generator_ok and SyntheticConfig(**spec.model_dump()).users == spec.users
    stricter = fields.get("users") == 1 or fields.get("items") == 1 or fields.get("drift", 0) > 1
    if not generator_ok or not stricter:
        assert (spec is not None) == generator_ok


def test_config_imports_neither_torch_nor_ray():
    code = "import sys, continual_kd.config; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_backbone_names_are_the_literal_choices():
    assert BACKBONE_NAMES == ("mf", "lightgcn", "multvae", "pathrec")
    for name in BACKBONE_NAMES:
        assert parse_job({"student": {"backbone": name}}).student.backbone == name


def _flat(value, prefix: str = "") -> dict:
    """{"a.b.c": leaf} of nested dicts (lists, tuples and empty dicts are leaves)."""
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def _spec_defaults() -> dict:
    """Every job-spec class that has defaults for all its fields → its defaults (nested ones included)."""
    import inspect

    import continual_kd.config as config

    out = {}
    for name, cls in inspect.getmembers(config, inspect.isclass):
        if issubclass(cls, config._Spec) and cls.__module__ == config.__name__ and not name.startswith("_"):
            try:
                out[name] = cls().model_dump(mode="json")
            except ValidationError:  # a required field (the tune search space): nothing to default
                continue
    return out


def test_defaults_are_recorded_so_a_changed_default_bumps_the_lineage():
    """config_hash hashes only non-default settings, so a changed default would silently continue lineages
    trained under the old one: every default is recorded here, and changing (or removing) one needs
    DEFAULTS_VERSION bumped and the record rewritten; new settings may be added without either. Settings outside
    the identity (``eval.memory_mb``: how many users are scored at once) only need the record rewritten."""
    from continual_kd.config import DEFAULTS_VERSION, EVAL_SPEED_FIELDS

    record = json.loads((Path(__file__).parent / "data" / "config_defaults.json").read_text())
    if record["version"] != DEFAULTS_VERSION:
        pytest.fail(f"DEFAULTS_VERSION is {DEFAULTS_VERSION}, the record {record['version']}: rewrite "
                    "tests/data/config_defaults.json with the current defaults (_spec_defaults)")
    recorded, current = _flat(record["specs"]), _flat(_spec_defaults())
    changed = sorted(k for k, v in recorded.items() if (k not in current or current[k] != v)
                     and k.split(".")[-2:] not in [[p, f] for p in ("EvalSpec", "eval") for f in EVAL_SPEED_FIELDS])
    assert not changed, (f"defaults changed: {changed}; bump config.DEFAULTS_VERSION and rewrite "
                         "tests/data/config_defaults.json (lineages relying on them must start anew)")
    assert "ProxySpec.stability" in recorded and "TrainSpec.grid" in recorded  # optional and empty ones too
def test_a_setting_left_at_its_default_does_not_change_the_lineage():
    """Written out or left out, a default is the same job: an upgrade that adds an option keeps every lineage."""
    base = {"teachers": T, "distill": {"terms": [{"name": "rrd"}], "feedback": [{"name": "keep"}]}}
    spelled = {"teachers": [{"name": "t", "backbone": "mf", "train": {"lr_block": None, "warmup_block": 0.0}}],
               "distill": {"terms": [{"name": "rrd", "weight": 0.01}], "feedback": [{"name": "keep", "models": []}],
                           "fusion": "rank"}, "student": {"name": "student", "rank_penalty": []}}
    assert parse_job(base).config_hash() == parse_job(spelled).config_hash()
    # a term at all its defaults is still told apart by its kind, a model by its name
    assert parse_job({"teachers": T, "distill": {"terms": [{"name": "unkd"}]}}).config_hash() != \
        parse_job({"teachers": T, "distill": {"terms": [{"name": "rrd"}]}}).config_hash()
    assert parse_job({"teachers": [{"name": "a"}]}).config_hash() != parse_job({"teachers": [{"name": "b"}]}).config_hash()
    # how many users are scored at once changes speed and memory, never a figure: the same lineage
    assert parse_job({"teachers": T, "eval": {"memory_mb": 64, "chunk_size": 10}}).config_hash() == \
        parse_job({"teachers": T}).config_hash()
    assert parse_job({"teachers": T, "eval": {"ks": [5]}}).config_hash() != parse_job({"teachers": T}).config_hash()
    # ... and a stream committed before that rule (eval.memory_mb / chunk_size hashed when set) names the job's lineage
    for ev in ({"memory_mb": 512}, {"chunk_size": 10}):
        job = parse_job({"teachers": T, "eval": ev})
        assert job._digest(speed=True) != job.config_hash() and job.is_lineage(job._digest(speed=True))
    # the release before session 21 hashed under DEFAULTS_VERSION 1 (these hashes computed with its code): since
    # version 2 (init: neighbor_capped) every lineage that relied on the old defaults starts anew
    for ev, before in (({"memory_mb": 512}, "4607450852386237"), ({"chunk_size": 10}, "bcdae64349ab6708"),
                       ({}, "5473b95655ee8743"), ({"memory_mb": 256}, "5473b95655ee8743")):
        assert not parse_job({"teachers": T, "eval": ev}).is_lineage(before)


def test_the_job_file_offers_exactly_the_growth_rules_the_models_know():
    """``init`` in a job file is checked by the config's Literal; the models check theirs against
    ``models.base.INITS``: one list, so a rule added to one side only fails here, not mid-stream."""
    import typing

    from continual_kd.config import ModelSpec
    from continual_kd.models.base import INITS

    assert set(typing.get_args(ModelSpec.model_fields["init"].annotation)) == set(INITS)
