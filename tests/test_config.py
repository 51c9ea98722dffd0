from pathlib import Path

import pytest

from continual_kd.config import load_job, parse_job
from continual_kd.errors import CkdError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("job", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_job_files_parse(job):
    spec = load_job(job)
    assert spec.name and spec.student.dim >= 1


def test_default_job_is_the_documented_one():
    spec = load_job(ROOT / "jobs" / "stream.yaml")
    assert spec.source.dataset == "movielens-100k"
    assert (spec.blocks.base_fraction, spec.blocks.incremental) == (0.5, 5)
    assert sorted(t.backbone for t in spec.teachers) == ["lightgcn", "mf", "multvae"]
    assert spec.student.backbone == "mf" and spec.student.dim <= max(t.dim for t in spec.teachers) // 8
    assert (spec.distill.method, spec.distill.fusion) == ("rrd", "rank") and spec.distill.unkd.weight > 0
    single = load_job(ROOT / "jobs" / "rrd-mf.yaml")  # the single-teacher RRD job of the skeleton
    assert [(t.backbone, t.dim) for t in single.teachers] == [("mf", 128)]
    assert (single.student.dim, single.distill.method) == (16, "rrd")


@pytest.mark.parametrize("data, needle", [
    ({"teachers": [{"name": "t", "dim": -3}]}, "teachers[0].dim: must be a positive integer"),
    ({"colour": "red"}, "unknown top-level key 'colour'"),
    ({"student": {"dims": 8}}, "student: unknown key 'dims'"),
    ({"teachers": "mf"}, "teachers: expected a list"),
    ({"blocks": {"split": [0.5, 0.5]}}, "blocks.split: expected a list of 3 values"),
    ({"blocks": {"split": [0.5, 0.3, 0.1]}}, "blocks.split: three non-negative fractions"),
    ({"blocks": {"base_fraction": 1.5}}, "blocks.base_fraction: must be between 0 and 1"),
    ({"eval": {"ks": [10, "a"]}}, "eval.ks[1]: expected an integer"),
    ({"seed": 1.5}, "seed: expected an integer"),
    ({"teachers": [{"name": "t", "backbone": "xgboost"}]}, "teachers[0].backbone: unknown backbone 'xgboost'"),
    ({"distill": {"method": "rrd"}}, "needs at least one teacher"),
    ({"teachers": [{"name": "t"}], "distill": {"k": 50, "pool": 10}}, "distill.pool: must be ≥ k"),
    ({"teachers": [{"name": "t", "train": {"lr": 0}}]}, "teachers[0].train.lr: must be positive"),
    ({"teachers": [{"name": "student"}]}, "model names must be unique"),
    ({"source": {"dataset": "netflix"}}, "source.dataset: unknown dataset 'netflix'"),
])
def test_bad_job_specs_name_the_field(data, needle):
    with pytest.raises(CkdError) as e:
        parse_job(data, "job.yaml")
    assert str(e.value).startswith("job.yaml: ")
    assert needle in str(e.value)


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


def test_config_hash_ignores_where_it_runs():
    a = parse_job({"teachers": [{"name": "t"}]})
    b = parse_job({"teachers": [{"name": "t", "resources": {"num_cpus": 0.5}}], "runtime": {"num_cpus": 8},
                   "snapshots": {"dir": "elsewhere"}})
    c = parse_job({"teachers": [{"name": "t", "dim": 32}]})
    assert a.config_hash() == b.config_hash() != c.config_hash()
