"""CPU training takes the cores that are really free: the affinity mask, the cgroup quota and the
load average decide torch's thread count (unless the environment sets one), and the choice is
printed by `validate` and recorded in metrics.json. Timings are in scripts/bench_threads.py."""

from __future__ import annotations

import pytest
from helpers import base_recipe, read_json, write_recipe

from peftcli.model.device import CpuFacts, cgroup_cpu_quota
from peftcli.model.speed import cpu_threads


@pytest.mark.parametrize(
    ("facts", "threads"),
    [
        (CpuFacts(cores=2, affinity=2, load=0.0), 2),  # idle: every core
        (CpuFacts(cores=2, affinity=2, load=4.0), 1),  # four busy processes beside us: one thread
        (CpuFacts(cores=16, affinity=16, load=8.0), 8),  # half the machine is busy
        (CpuFacts(cores=64, affinity=4, load=0.0), 4),  # pinned to 4 cores
        (CpuFacts(cores=64, affinity=64, quota=2.5, load=0.0), 2),  # a container allowed 2.5 CPUs
        (CpuFacts(cores=8, affinity=8, quota=0.5, load=0.0), 1),  # never fewer than one
        (CpuFacts(cores=8, affinity=8, load=0.0, processes=4), 2),  # four training processes share them
        (CpuFacts(cores=8, affinity=None, load=None), 8),  # nothing known but the core count
    ],
)
def test_threads_follow_the_cores_that_are_free(facts, threads):
    chosen, why = cpu_threads(facts)
    assert chosen == threads and why.startswith("auto: ")


def test_threads_set_in_the_environment_are_kept():
    chosen, why = cpu_threads(CpuFacts(cores=2, affinity=2, load=9.0, user_threads=("OMP_NUM_THREADS", "3")))
    assert chosen is None and "OMP_NUM_THREADS=3" in why


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(v1) is None


def test_validate_prints_the_thread_choice(cli, tmp_path, tiny_model, monkeypatch):
    path = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, tmp_path / "run"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    result = cli("validate", path)
    assert result.code == 0, result.err
    assert "cpu threads: " in result.err and "cores in the affinity mask" in result.err
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert "cpu threads: default (OMP_NUM_THREADS=1 set in the environment, kept)" in cli("validate", path).err


@pytest.mark.slow
def test_training_uses_and_records_the_thread_choice(cli, tmp_path, tiny_model, monkeypatch):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    recipe = base_recipe(tiny_model, tmp_path / "run", training={"max_steps": 2, "save_steps": 2})
    try:
        result = cli("train", write_recipe(tmp_path / "r.yaml", recipe))
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert result.code == 0, result.err
    settings = read_json(tmp_path / "run" / "metrics.json")["settings"]
    assert settings["cpu_threads"] == used >= 1
    assert settings["cpu_threads_reason"].startswith("auto: ") and "load average" in settings["cpu_threads_reason"]
    assert settings["model_shape"].startswith("from ") and "config.json" in settings["model_shape"]
