"""Training on several processes (torchrun, gloo, FSDP2, expert parallelism) against one process:
the same loss trajectory at worlds 2 and 4, with and without EP (2 x 2: FSDP over pairs of EP
groups), sharded checkpoints that resume exactly at the same world size and across world sizes
(2 -> 1, 1 -> 2), and `dsv2 export` of a sharded (and an expert-parallel) checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv2.checkpoint import load_model

from .test_train import data_dir  # noqa: F401 - the tiny corpus fixture

STEPS = 10
ROOT = Path(__file__).resolve().parents[1]


def _config(tmp: Path, data: Path) -> Path:
    path = tmp / "dist.toml"
    path.write_text("\n".join([
        'model = "dsv2-tiny"', f'data = "{data}"', "seq_len = 32", f"max_tokens = {32 * 8 * STEPS}",
        "batch_start = 8", "batch_end = 8", "micro_batch = 2", "lr = 3e-3", "warmup_steps = 5",
        "decay_at = []", "log_every = 1", "eval_every = 5", "eval_batches = 2", "checkpoint_every = 5",
        "progress = false", "init_std = 0.02", 'device = "cpu"', "keep_checkpoints = 5", "capacity_factor = 1.0",
        # two expert groups, one per EP rank at ep = 2, a token's experts in one of them (M = 1)
        "[model_overrides]", "vocab_size = 320", "n_group = 2", "topk_group = 1"]))
    return path


def _train(config: Path, out: Path, world: int, *extra: str) -> None:
    launcher = [sys.executable, "-m", "dsv2"] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
        "-m", "dsv2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, "train", "--config", str(config), f"out={json.dumps(str(out))}", *extra],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _metrics(run: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def _close(a: dict[int, dict], b: dict[int, dict], steps) -> None:
    """fp32 summation order apart: losses to 1e-5, the gradient norm (a sum of squares over every
    gradient, each reduced in its own order) to 1e-4; measured ~1e-7 and ~3e-6."""
    for s in steps:
        for key, rel in (("loss", 1e-5), ("ce", 1e-5), ("device", 1e-5), ("comm", 1e-5), ("grad_norm", 1e-4),
                         ("dropped_fraction", 1e-5)):
            assert abs(a[s][key] - b[s][key]) <= rel * abs(a[s][key]), (s, key, a[s][key], b[s][key])


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("dist")
    config = _config(tmp, data_dir)
    out = {}
    for world, ep in ((1, 1), (2, 1), (4, 1), (2, 2), (4, 2)):
        out[world, ep] = tmp / f"world{world}-ep{ep}"
        _train(config, out[world, ep], world, *([f"parallel.ep={ep}"] if ep > 1 else []))
    out[1] = out[1, 1]
    return config, out


@pytest.mark.parametrize("world, ep", [(2, 1), (4, 1), (2, 2), (4, 2)])
def test_several_processes_follow_one(runs, world, ep):
    """The same micro-batches dealt to 2 or 4 ranks, gradients averaged by FSDP2, the routed experts
    split over EP ranks (tokens exchanged by all-to-all): the single-process losses, balance losses,
    dropped fractions and gradient norms up to fp32 summation order."""
    _, out = runs
    one = _metrics(out[1])
    assert sorted(one) == list(range(1, STEPS + 1))
    many = _metrics(out[world, ep])
    assert sorted(many) == sorted(one)
    _close(one, many, one)
    assert (out[world, ep] / "checkpoints" / "step-00000010" / "dcp").is_dir()  # sharded
    assert (out[1] / "checkpoints" / "step-00000010" / "model").is_dir()  # one process: HF format


def _resume_from_step_5(run: Path, copy: Path) -> None:
    """`copy` is `run` as a kill -9 right after step 5's checkpoint would have left it."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-00000010")


@pytest.mark.parametrize("source, world", [
    ((2, 2), (2, 2)),  # the same layout (FSDP2 and EP): bit-exact
    ((2, 1), (1, 1)), ((1, 1), (2, 1)),  # DCP reshards; a single-process checkpoint's optimizer by name
    ((2, 2), (2, 1)), ((1, 1), (2, 2)),  # expert parts regrouped for another ep
])
def test_resume_on_the_same_or_another_layout(runs, tmp_path, source, world):
    """(world, ep) -> (world, ep): a run killed after step 5's checkpoint resumed on another layout."""
    config, out = runs
    resumed = tmp_path / f"from{source}to{world}"
    _resume_from_step_5(out[source], resumed)
    _train(config, resumed, world[0], *([f"parallel.ep={world[1]}"] if world[1] > 1 else []), "--resume")
    a, b = _metrics(out[source]), _metrics(resumed)
    assert sorted(b) == list(range(1, STEPS + 1))
    if source == world:  # the same sums in the same order: bit-exact, as one process resumes
        assert all(a[s]["loss"] == b[s]["loss"] and a[s]["grad_norm"] == b[s]["grad_norm"] for s in a)
    else:  # DCP reshards the weights and optimizer state; only the summation order changes
        _close(a, b, range(6, STEPS + 1))


@pytest.mark.parametrize("world, ep", [(2, 1), (4, 2)])
def test_export_writes_the_model_load_model_reads(runs, tmp_path, world, ep):
    """A sharded checkpoint (with EP, each layer's expert parts joined in rank order) as the HF-format
    model: the single-process run's weights after the same steps, summation order apart."""
    from dsv2.cli import main

    _, out = runs
    step = out[world, ep] / "checkpoints" / "step-00000010"
    assert main(["export", str(step), str(tmp_path / "model")]) == 0
    assert main(["export", str(step), str(tmp_path / "model")]) == 1  # exists
    exported = load_model(tmp_path / "model").state_dict()
    single = load_model(out[1] / "checkpoints" / "step-00000010" / "model").state_dict()
    assert exported.keys() == single.keys()
    for k in exported:
        torch.testing.assert_close(exported[k], single[k], rtol=1e-4, atol=1e-5)


def test_expert_parallel_settings_are_checked(data_dir, tmp_path):  # noqa: F811
    from dsv2.train.config import TrainConfig
    from dsv2.train.loop import Trainer

    config = _config(tmp_path, data_dir)
    cfg = TrainConfig.load(config, [f"out={json.dumps(str(tmp_path / 'one'))}", "parallel.ep=2"])
    with pytest.raises(ValueError, match="parallel.ep = 2 needs that many processes"):
        Trainer(cfg)
    cfg = TrainConfig.load(config, [f"out={json.dumps(str(tmp_path / 'two'))}", "parallel.cpu_offload=true"])
    with pytest.raises(ValueError, match="parallel.cpu_offload is FSDP2's: run under torchrun"):
        Trainer(cfg)


def test_batch_must_split_into_whole_micro_batches_per_rank(data_dir, tmp_path):  # noqa: F811
    config = _config(tmp_path, data_dir)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                "-m", "dsv2", "train", "--config", str(config), f"out={json.dumps(str(tmp_path / 'run'))}"]
    proc = subprocess.run(launcher, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "must be a multiple of micro_batch x processes (2 x 3)" in proc.stderr


def test_parallel_table_errors_name_the_key():
    from dsv2.train.config import TrainConfig

    assert TrainConfig.load(None, ["parallel.cpu_offload=true"]).parallel == {"cpu_offload": True}
    with pytest.raises(ValueError, match=r"unknown \[parallel\] key\(s\): bogus"):
        TrainConfig.load(None, ["parallel.bogus=1"])
    with pytest.raises(ValueError, match="parallel.mixed_precision = 'fp4'"):
        TrainConfig.load(None, ["parallel.mixed_precision=fp4"])
    with pytest.raises(ValueError, match="parallel.cpu_offload = 3: expected bool"):
        TrainConfig.load(None, ["parallel.cpu_offload=3"])


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc (Linux)")
def test_a_dead_worker_stops_the_run_without_orphans(data_dir, tmp_path):  # noqa: F811
    """kill -9 of one rank mid-run: torchrun stops the other and exits non-zero within seconds."""
    import signal
    import time

    config = _config(tmp_path, data_dir)
    run = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dsv2",
         "train", "--config", str(config), f"out={json.dumps(str(run))}", f"max_tokens={32 * 8 * 100_000}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not ((run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) > 3):
            assert time.time() < deadline and launcher.poll() is None, "the run did not start"
            time.sleep(0.2)
        workers = _children(launcher.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        start = time.time()
        assert launcher.wait(timeout=60) != 0
        assert time.time() - start < 30
        time.sleep(1)
        assert not [w for w in workers if _alive(w)], "a worker outlived the run"
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_background_checkpoints_are_the_synchronous_ones(runs, tmp_path):
    """parallel.async_checkpoint: DCP's async_save while training goes on, each checkpoint sealed
    before the next starts and at the end; the same training and the same checkpoint tensors."""
    from dsv2.train import checkpoint as ckpt

    config, out = runs
    run = tmp_path / "async"
    _train(config, run, 2, "parallel.async_checkpoint=true")
    a, b = _metrics(out[2, 1]), _metrics(run)
    assert all(a[s]["loss"] == b[s]["loss"] and a[s]["grad_norm"] == b[s]["grad_norm"] for s in a)
    for step in ("step-00000005", "step-00000010"):
        assert ckpt.verify(run / "checkpoints" / step) is None
        want, got = (ckpt._read_all(r / "checkpoints" / step, "") for r in (out[2, 1], run))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
