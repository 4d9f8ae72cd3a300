"""Training engine: exact resume, DDP over gloo vs gradient accumulation, schedules, checkpoint hygiene."""
import functools
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from d2v.config import ConfigError, EMAConfig
from d2v.data import synthetic
from d2v.data2vec import CollapseError
from d2v.ema import init_share
from d2v.train import batches, checkpoint, pretrain, recipe
from d2v.train.distributed import World
from d2v.train.config import PretrainConfig, pretrain_config
from d2v.train.tasks import finetune_config
from d2v.train.logging import MetricsLog
from d2v.train.optim import DivergenceError, cosine_with_warmup, fp16_scaling, linear_with_warmup, schedule_fn, \
    tri_stage
from d2v.train.preemption import Interrupted
from d2v.train.pretrain import build_objective, run_pretrain, start_from

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(modality="speech", **kw) -> PretrainConfig:
    base = dict(modality=modality, preset="tiny", steps=6, seed=3, log_every=1, collapse_warmup=1.0,
                optim=dict(lr=1e-3, warmup_steps=2, clip_norm=1.0),
                data=dict(shards="unused", batch_size=2),
                ema=dict(tau_start=0.9, tau_end=0.99, tau_steps=6), checkpoint=dict(every=3, keep=2))
    base.update(kw)
    return PretrainConfig.model_validate(base)


def synthetic_stream(modality: str, seed: int = 0, rank: int = 0, world: int = 1, batch: int = 2):
    """Batch k of the global stream, split across ranks: rank r reads batches r, r+world, ..."""
    kw = {"image": dict(size=32), "speech": dict(seconds=0.5), "text": dict(length=24, vocab_size=64)}[modality]

    def stream(start: int):
        def gen():
            for k in itertools.count(start * world + rank, world):
                yield next(synthetic.batches(modality, np.random.default_rng([seed, k]), batch, **kw))
        return gen()
    return stream


def params_of(objective):
    return {k: v.clone() for k, v in objective.state_dict().items()}


@pytest.mark.parametrize("modality, objective", [("speech", "v1"), ("text", "v1"), ("image", "v1"),
                                                 ("speech", "v2"), ("text", "v2"), ("image", "v2")])
def test_kill_and_resume_is_bit_identical(tmp_path, modality, objective):
    cfg = tiny_cfg(modality, objective=objective)
    straight = build_objective(cfg)
    run_pretrain(cfg, straight, synthetic_stream(modality), tmp_path / "a", progress=False)
    first = build_objective(cfg)
    run_pretrain(cfg, first, synthetic_stream(modality), tmp_path / "b", progress=False, stop_after=4)
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "b" / "checkpoints")] == ["step-00000003.pt"]
    del first  # "killed" after step 4: step 4 is lost, the checkpoint of step 3 remains
    resumed = build_objective(cfg.model_copy(update={"seed": cfg.seed}))
    with torch.no_grad():  # a fresh process would start from different weights; resume must overwrite them all
        for p in resumed.parameters():
            p.add_(1.0)
    run_pretrain(cfg, resumed, synthetic_stream(modality), tmp_path / "b", progress=False)
    a, b = params_of(straight), params_of(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    import pandas as pd
    log_a, log_b = pd.read_csv(tmp_path / "a" / "metrics.csv"), pd.read_csv(tmp_path / "b" / "metrics.csv")
    assert list(log_b["step"]) == list(range(1, 7))  # rows after the checkpoint were replaced, not duplicated
    np.testing.assert_array_equal(log_a["loss"].to_numpy(), log_b["loss"].to_numpy())
    assert (tmp_path / "b" / "final.pt").exists() and (tmp_path / "b" / "curves.png").stat().st_size > 1000


def cpu_fp16_autocast(device, precision, scaling=None, init_scale: float = 2.0 ** 16):
    """`pretrain.autocast` for fp16 tests on CPU: torch's CPU scaler (a GPU run gets the CUDA one), its scale growing
    at every step so that steps overflow within a few (the recipe's `scaling` is set aside)."""
    return (torch.autocast(device.type, dtype=torch.float16),
            torch.amp.GradScaler(device.type, init_scale=init_scale, growth_interval=1))


def scaling_recorder(seen: list):
    """`cpu_fp16_autocast` that records the scaler settings a loop asks `autocast` for in `seen`."""
    def recording(device, precision, scaling=None):
        seen.append(scaling)
        return cpu_fp16_autocast(device, precision)
    return recording


def nan_gradients_from(step: int, real_step):
    """`clip_and_step` that makes a gradient NaN at `step` and after: an fp16 run whose every step overflows."""
    def poisoned(optimizer, params, clip_norm, scaler=None):
        if poisoned.step >= step:
            next(p for p in params if p.grad is not None).grad.fill_(float("nan"))
        poisoned.step += 1
        return real_step(optimizer, params, clip_norm, scaler)
    poisoned.step = 1
    return poisoned


def test_an_fp16_run_whose_every_step_overflows_stops_when_its_loss_scale_falls_below_fairseqs_minimum(
        tmp_path, monkeypatch):
    """The scaler skips an overflowing step and halves its scale; a run where every step overflows would halve it to
    zero and then step on zero gradients. Below 1e-4 (fairseq's min_loss_scale) it has diverged: 2^-13 doubles to
    2^-12 over the finite step 1, NaN gradients from step 2 halve it to 2^-14 at step 3, a checkpoint step between
    log steps, so no checkpoint is written there."""
    monkeypatch.setattr(pretrain, "autocast", functools.partial(cpu_fp16_autocast, init_scale=2.0 ** -13))
    monkeypatch.setattr(pretrain, "clip_and_step", nan_gradients_from(2, pretrain.clip_and_step))
    cfg = tiny_cfg("text", precision="fp16", log_every=10)
    with pytest.raises(DivergenceError, match=r"diverged at step 3 \(fp16 loss scale=6.1e-05 < 0.0001\)"):
        run_pretrain(cfg, build_objective(cfg), synthetic_stream("text"), tmp_path, progress=False)
    assert not list((tmp_path / "checkpoints").glob("step-*.pt"))


@pytest.mark.parametrize("modality,objective,floor", [("image", "v2", 1e-6), ("speech", "v2", 1e-6),
                                                      ("text", "v2", 1e-4), ("image", "v1", 1e-4),
                                                      ("speech", "v1", 1e-4), ("text", "v1", 1e-4)])
def test_the_fp16_divergence_floor_is_the_one_fairseqs_config_for_the_recipe_sets(modality, objective, floor):
    """fairseq's v2 base_images_only_task and base_audio_only_task set common.min_loss_scale 1e-6; v2 text and the
    v1 configs keep its default 1e-4. A config's own value wins, and a run stopped at its floor resumes under a
    lower one."""
    cfg = tiny_cfg(modality, objective=objective)
    assert pretrain.min_loss_scale(cfg) == floor
    lower = cfg.model_copy(update={"min_loss_scale": 1e-8})
    assert pretrain.min_loss_scale(lower) == 1e-8
    saved = {"config": cfg.model_dump(mode="json"), "recipe": recipe.PRETRAIN}
    assert checkpoint.changed_since(saved, lower, recipe.PRETRAIN, pretrain.RESUMABLE_ACROSS) == []


def test_fp16_loss_scaling_is_fairseqs_dynamic_scaler():
    """fairseq starts at fp16_init_scale 2^7 and doubles after fp16_scale_window overflow-free updates, by default
    2^14 / (ranks · update_freq); an overflow halves the scale. Driven here through torch's CPU scaler."""
    assert fp16_scaling(None, None, 16, 1) == {"init_scale": 128.0, "growth_interval": 1024}
    assert fp16_scaling(None, None, 8, 4) == {"init_scale": 128.0, "growth_interval": 512}
    assert fp16_scaling(4.0, 128, 16, 1) == {"init_scale": 4.0, "growth_interval": 128}
    scaler = torch.amp.GradScaler("cpu", **fp16_scaling(None, 3, 1, 1))
    w = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([w], lr=0.0)
    scales = []
    for grad in (1.0, 1.0, 1.0, float("inf"), 1.0):
        optimizer.zero_grad()
        scaler.scale((w * torch.full((2,), grad)).sum()).backward()  # gradient: grad × the scale
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    assert scales == [128.0, 128.0, 256.0, 128.0, 128.0]


def test_pretraining_hands_its_fp16_scaler_settings_to_the_scaler(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(pretrain, "autocast", scaling_recorder(seen))
    cfg = tiny_cfg("text", precision="fp16", steps=2, fp16_scale_window=7)
    run_pretrain(cfg, build_objective(cfg), synthetic_stream("text"), tmp_path, progress=False)
    assert seen == [{"init_scale": 128.0, "growth_interval": 7}]


def test_an_fp16_run_resumes_at_the_loss_scale_it_had_reached(tmp_path, monkeypatch):
    """fp16's gradient scaler is training state: a resume that restarted it at its initial scale would take or skip
    other steps than the uninterrupted run. On CPU (torch's CPU scaler, in place of the CUDA one a GPU run gets) with
    the scale moving every step: it doubles to 2^19 by the checkpoint at step 3, step 4 overflows at 2^20 and is
    skipped; restarted at 2^16, step 4 would not be (this fails without the scaler's state in the checkpoint)."""
    monkeypatch.setattr(pretrain, "autocast", cpu_fp16_autocast)
    cfg = tiny_cfg("text", precision="fp16")
    straight = build_objective(cfg)
    run_pretrain(cfg, straight, synthetic_stream("text"), tmp_path / "a", progress=False)
    run_pretrain(cfg, build_objective(cfg), synthetic_stream("text"), tmp_path / "b", progress=False, stop_after=3)
    assert checkpoint.load(tmp_path / "b" / "checkpoints" / "last.pt")["scaler"]["scale"] == 2.0 ** 19
    resumed = build_objective(cfg)
    run_pretrain(cfg, resumed, synthetic_stream("text"), tmp_path / "b", progress=False)
    a, b = params_of(straight), params_of(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_runs_checkpoint_the_same_rng_state_whatever_the_process_drew_before(tmp_path):
    """Python's and NumPy's global generators start from OS entropy in every process; the checkpoints of two runs
    of one config must not carry that difference (a library drawing from them would repeat, and a resume restores
    what the uninterrupted run had)."""
    cfg = tiny_cfg("text", steps=3)
    states = []
    for noise in (1, 2):
        random.seed(noise)
        np.random.seed(noise)
        run_pretrain(cfg, build_objective(cfg), synthetic_stream("text"), tmp_path / str(noise), progress=False)
        states.append(checkpoint.load(tmp_path / str(noise) / "checkpoints" / "last.pt")["rng"])
    assert states[0]["python"] == states[1]["python"]
    np.testing.assert_array_equal(states[0]["numpy"][1], states[1]["numpy"][1])
    assert torch.equal(states[0]["torch"], states[1]["torch"])
    assert batches.step_rng(3, 2).random() == np.random.default_rng([3, 2]).random()  # the masks' key, unchanged


def signalling(stream, at: int, signum: int = signal.SIGTERM):
    """`stream`, sending this process `signum` as it hands out batch `at`: in the middle of a step, as a scheduler's
    signal comes."""
    def positioned(start: int):
        for k, batch in enumerate(stream(start), start):
            if k == at:
                os.kill(os.getpid(), signum)
            yield batch
    return positioned


@pytest.fixture
def ctrl_c_interrupts():
    """SIGINT as Python sets it up in a terminal: a test run in a script's background inherits it ignored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def with_sigint_default() -> None:
    """A child's SIGINT at its default, which Python turns into KeyboardInterrupt (a background job ignores it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=lambda s: s.name)
def test_a_stop_signal_checkpoints_the_step_it_came_in_and_the_run_resumes_bit_identical(tmp_path, signum,
                                                                                       ctrl_c_interrupts):
    """SLURM's SIGTERM (time limit, preemption), a site's SIGUSR1 or a first Ctrl-C in the first micro-batch of step
    4: the step finishes, a checkpoint of step 4 joins the periodic one of step 3, and the run stops with the signal's
    exit status instead of dying with the step-3 checkpoint as its last. Started again, it ends as the uninterrupted
    run, its log restored from the checkpoint where the pipeline deleted it."""
    cfg = tiny_cfg("speech", accum_steps=2)  # 6 steps, a checkpoint every 3
    straight = build_objective(cfg)
    run_pretrain(cfg, straight, synthetic_stream("speech"), tmp_path / "a", progress=False)
    before = signal.getsignal(signum)
    with pytest.raises(Interrupted, match=rf"stopped by {signum.name} after step 4; its checkpoint in \S+checkpoints "
                                          "resumes the run") as stopped:
        run_pretrain(cfg, build_objective(cfg), signalling(synthetic_stream("speech"), at=6, signum=signum),
                     tmp_path / "b", progress=False)  # batches 6 and 7 make step 4
    assert stopped.value.exit_code == 128 + signum and signal.getsignal(signum) is before
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "b" / "checkpoints")] == ["step-00000003.pt",
                                                                                       "step-00000004.pt"]
    stop_state = checkpoint.load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert stop_state["batches"] == 8 and stop_state["seconds"] > 0
    assert not (tmp_path / "b" / "final.pt").exists()
    (tmp_path / "b" / "metrics.csv").unlink()  # Snakemake and DVC delete a failed job's outputs: the checkpoint has it
    torch.save({**stop_state, "seconds": 1000.0}, tmp_path / "b" / "checkpoints" / "last.pt")  # as if 1000 s before
    resumed, start = build_objective(cfg), time.perf_counter()
    summary = run_pretrain(cfg, resumed, synthetic_stream("speech"), tmp_path / "b", progress=False)
    assert 1000.0 <= summary["seconds"] <= 1000.0 + time.perf_counter() - start + 0.1  # the whole run's time
    for k, v in params_of(straight).items():
        assert torch.equal(resumed.state_dict()[k], v), k
    log_a, log_b = pd.read_csv(tmp_path / "a" / "metrics.csv"), pd.read_csv(tmp_path / "b" / "metrics.csv")
    assert list(log_b["step"]) == list(range(1, 7))
    np.testing.assert_array_equal(log_a["loss"].to_numpy(), log_b["loss"].to_numpy())


def test_a_second_ctrl_c_aborts_the_step_at_once_and_an_ignored_one_changes_nothing(tmp_path, ctrl_c_interrupts,
                                                                                      capfd):
    """The first Ctrl-C asks for a stop after the step and says so; a second, in the same step, is KeyboardInterrupt
    as without d2v (a way out of a long step), leaving the periodic checkpoint the last. A process that ignores
    SIGINT (a script's background job) trains on through it."""
    cfg = tiny_cfg("speech", accum_steps=2)  # 6 steps, a checkpoint every 3
    twice = signalling(signalling(synthetic_stream("speech"), at=6, signum=signal.SIGINT), at=7, signum=signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(cfg, build_objective(cfg), twice, tmp_path / "a", progress=False)
    assert "Ctrl-C: stopping after this step, with a checkpoint (Ctrl-C again: at once, without)" in \
        capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "a" / "checkpoints")] == ["step-00000003.pt"]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    summary = run_pretrain(cfg, build_objective(cfg), signalling(synthetic_stream("speech"), at=6,
                                                                 signum=signal.SIGINT), tmp_path / "b", progress=False)
    assert summary["steps"] == 6 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def _loader_worker(main_pid: int) -> None:
    from d2v.processes import leave_stop_signals_to

    with_sigint_default()  # as a DataLoader worker forked from a terminal's process has it
    leave_stop_signals_to(main_pid)
    time.sleep(60)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=lambda s: s.name)
def test_a_loader_worker_outlives_a_stop_signal_from_anyone_but_its_main_process(signum):
    """A scheduler's signal (or a terminal's Ctrl-C, from the kernel) reaches the worker beside its main process:
    the worker must go on serving the step the main process finishes. Only its main process ends it."""
    import multiprocessing

    worker = multiprocessing.get_context("fork").Process(target=_loader_worker, args=(os.getpid(),), daemon=True)
    worker.start()
    time.sleep(0.5)  # its hook installed
    subprocess.run(["kill", f"-{signum.name[3:]}", str(worker.pid)], check=True)  # another process's signal
    worker.join(1.0)
    assert worker.is_alive(), f"the worker died of {signum.name} from another process"
    os.kill(worker.pid, signum)
    worker.join(10)
    assert worker.exitcode == 128 + signum


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_the_cli_stops_on_a_signal_to_its_process_group_and_the_same_command_resumes(tmp_path, signum):
    """SLURM and torchrun signal the whole process group, DataLoader workers included, as a terminal's Ctrl-C does its
    foreground. The worker ignores it and keeps serving the step the main process finishes (a worker dead of SIGTERM,
    or ended by KeyboardInterrupt, would fail that step); `d2v pretrain` writes the checkpoint, says how to go on
    and exits with 128 + the signal; the same command resumes there and finishes."""
    from conftest import _image_shards

    _image_shards(tmp_path)
    image = dict(size=32, channels=1, mean=[0.5], std=[0.5], min_scale=0.3)
    config = dict(preset="tiny", steps=60, seed=3, log_every=1, stream_resume="seek", checkpoint=dict(every=100),
                  optim=dict(lr=1e-3, warmup_steps=2), ema=dict(tau_start=0.9, tau_end=0.99, tau_steps=6),
                  data=dict(shards=str(tmp_path / "shards" / "toy" / "train"), batch_size=4, image=image,
                            num_workers=1))
    (tmp_path / "cfg.yaml").write_text(json.dumps(config))
    command = [sys.executable, "-m", "d2v.cli", "pretrain", "image", "--config", str(tmp_path / "cfg.yaml"),
               "--out", str(tmp_path / "run"), "--quiet"]
    temp = tmp_path / "temp"  # multiprocessing's temp dirs (pymp-*)
    temp.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(temp)}
    run = subprocess.Popen(command, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           preexec_fn=with_sigint_default)
    metrics, deadline = tmp_path / "run" / "metrics.csv", time.monotonic() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 4) and run.poll() is None:
        assert time.monotonic() < deadline, "no training steps logged within 2 minutes"
        time.sleep(0.05)
    os.killpg(run.pid, signum)  # the main process and its loader worker
    err = run.communicate(timeout=120)[1]
    assert run.returncode == 128 + signum, err
    stopped = int(re.search(rf"pretrain image: stopped by {signum.name} after step (\d+); its checkpoint in \S+ "
                            "resumes", err).group(1))
    assert 3 <= stopped < 60
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "run" / "checkpoints")] == [f"step-{stopped:08d}.pt"]
    finished = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / f'step-{stopped:08d}.pt'} at step {stopped}" in \
        finished.stderr
    assert pd.read_csv(metrics)["step"].tolist() == list(range(1, 61))
    assert torch.load(tmp_path / "run" / "final.pt", weights_only=False)["steps"] == 60
    # the worker, stopped by its main process at the end of either run, had its socket in the main process's temp
    # dir, which that process's exit removed
    assert list(temp.glob("pymp-*")) == []


def test_a_finished_pretraining_without_its_checkpoints_is_not_trained_over(tmp_path, capsys, monkeypatch):
    """Its final.pt may already be fine-tuned from: started again with the checkpoints deleted, the same config does
    nothing; another config is refused by name, or trained again with restart_on_change (pipeline stages)."""
    cfg, run = tiny_cfg("text", steps=3), tmp_path / "run"
    first = run_pretrain(cfg, build_objective(cfg), synthetic_stream("text"), run, progress=False)
    shutil.rmtree(run / "checkpoints")
    final = (run / "final.pt").stat().st_mtime_ns
    assert run_pretrain(cfg, build_objective(cfg), synthetic_stream("text"), run, progress=False) == \
        json.loads((run / "summary.json").read_text()) and first["steps"] == 3
    assert f"{run}: finished already under this config; nothing to do" in capsys.readouterr().err
    assert (run / "final.pt").stat().st_mtime_ns == final and not (run / "checkpoints").exists()
    # the CLI's entry answers before it builds a model or indexes shards; another rank reads alike and says nothing
    monkeypatch.setattr(pretrain, "build_objective", lambda cfg: pytest.fail("built a model for a finished run"))
    summary = json.loads((run / "summary.json").read_text())
    assert pretrain.pretrain_main(cfg, run, progress=False) == summary
    assert checkpoint.finished_run(run, cfg, "pretrain", (), None, False, World(rank=1, size=2)) == summary
    assert capsys.readouterr().err.count("nothing to do") == 1
    other = tiny_cfg("text", steps=3, seed=4)
    with pytest.raises(ValueError, match=r"run: holds a finished run of another config, data or recipe "
                                         r"\(seed changed\)"):
        run_pretrain(other, build_objective(other), synthetic_stream("text"), run, progress=False)
    run_pretrain(other, build_objective(other), synthetic_stream("text"), run, progress=False, restart_on_change=True)
    assert json.loads((run / "config.json").read_text())["seed"] == 4


def poisoned(stream, at: int):
    """The stream with batch `at` (0-based) turned to NaN, as a corrupt input or an overflow would."""
    import dataclasses

    def start(k: int):
        for i, batch in enumerate(stream(k), start=k):
            yield dataclasses.replace(batch, source=batch.source * float("nan")) if i == at else batch
    return start


@pytest.mark.parametrize("log_every, caught", [(1, r"step 5 \(loss=nan, grad_norm=nan\)"),
                                                (100, r"step 6 \(grad_norm=nan\)")])
def test_a_diverged_pretraining_stops_before_it_writes_nan_weights(tmp_path, log_every, caught):
    """A NaN loss at step 5 stops the run at its next log step, or at a checkpoint between log steps (6), which is
    then not written; the step-3 checkpoint is kept, finite, and no final.pt is made."""
    from d2v.train.optim import DivergenceError

    cfg = tiny_cfg("speech", steps=8, log_every=log_every)
    with pytest.raises(DivergenceError, match=rf"training diverged at {caught}; no checkpoint is written from here"):
        run_pretrain(cfg, build_objective(cfg), poisoned(synthetic_stream("speech"), at=4), tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.pt")) == ["step-00000003.pt"]
    kept = checkpoint.load(tmp_path / "checkpoints" / "step-00000003.pt")["model"]
    assert all(torch.isfinite(v).all() for v in kept.values() if v.is_floating_point())
    assert not (tmp_path / "final.pt").exists() and not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("objective", ["v1", "v2"])
def test_a_second_stage_continues_the_student_with_the_teacher_reset_and_the_schedule_restarted(tmp_path, objective,
                                                                                               monkeypatch):
    first = tiny_cfg("image", objective=objective)
    run_pretrain(first, build_objective(first), synthetic_stream("image"), tmp_path / "one", progress=False)
    final = torch.load(tmp_path / "one" / "final.pt", weights_only=False)
    assert any(not torch.equal(final["teacher"][k], v) for k, v in final["encoder"].items())  # τ < 1: they differ
    second = tiny_cfg("image", objective=objective, seed=4, steps=4, init_from=str(tmp_path / "one" / "final.pt"),
                      ema=dict(tau_start=0.9999, tau_end=0.9999, tau_steps=0))
    continued = build_objective(second)
    start_from(continued, second)
    state = continued.state_dict()
    for k, v in final["encoder"].items():  # the student goes on; the teacher starts again from it, not from its own
        assert torch.equal(state[f"student.{k}"], v) and torch.equal(state[f"ema.model.{k}"], v), k
    assert final["predictor"] and all(torch.equal(state[k], v) for k, v in final["predictor"].items())
    from d2v.train import pretrain

    started = []  # a fresh second stage starts from the first; resumed, from its own checkpoint
    monkeypatch.setattr(pretrain, "start_from", lambda obj, cfg: started.append(cfg.init_from) or start_from(obj, cfg))
    run_pretrain(second, build_objective(second), synthetic_stream("image", seed=1), tmp_path / "two", progress=False,
                 stop_after=3)
    run_pretrain(second, build_objective(second), synthetic_stream("image", seed=1), tmp_path / "two", progress=False)
    assert started == [second.init_from]
    one, two = (pd.read_csv(tmp_path / run / "metrics.csv") for run in ("one", "two"))
    assert two["lr"].iloc[0] == one["lr"].iloc[0] < one["lr"].max()  # the warm-up again, from step 1
    assert list(two["step"]) == [1, 2, 3, 4] and set(two["tau"]) == {0.9999}
    # what it cannot continue, by name
    with pytest.raises(FileNotFoundError, match="pretrain.image.init_from: .*missing.pt' does not exist; expected a "
                                                "pretraining"):
        start_from(continued, second.model_copy(update={"init_from": str(tmp_path / "missing.pt")}))
    torch.save({**final, "modality": "text"}, tmp_path / "text.pt")
    with pytest.raises(ValueError, match=f"the encoder text/tiny/{objective}, pretrain.image.init_from needs image"):
        start_from(continued, second.model_copy(update={"init_from": str(tmp_path / "text.pt")}))
    torch.save({k: v for k, v in final.items() if k != "predictor"}, tmp_path / "imported.pt")
    with pytest.raises(ValueError, match="no predictor .* an imported encoder"):
        start_from(continued, second.model_copy(update={"init_from": str(tmp_path / "imported.pt")}))


@pytest.mark.parametrize("modality, resume, reads", [("image", "replay", 6 * 4), ("image", "seek", 3 * 4),
                                                      ("text", "seek", 3 * 4)])
def test_pretraining_from_shards_resumes_bit_for_bit(tmp_path, monkeypatch, modality, resume, reads):
    """The real streams. Image, with random-resized crops, flips and colour jitter: `replay` reads shards through a
    shuffle buffer with draws from torch's RNG, and decodes the batches consumed before the step-3 checkpoint again
    before the first resumed step seeds its RNG, not inside it; `seek` keys the draws by each sample's place. Text
    `seek`: fairseq's blocks in a per-epoch order. A seekable resume reads only its own three batches."""
    from conftest import _image_shards
    from fixtures import token_shards
    from d2v.data import loaders, seekable
    from d2v.train.batches import pretrain_stream

    if modality == "image":
        _image_shards(tmp_path)
        image = dict(size=32, channels=1, mean=(0.5,), std=(0.5,), min_scale=0.3, color_jitter=0.4)
        data = dict(shards=str(tmp_path / "shards" / "toy" / "train"), batch_size=4, image=image)
        owner, name = loaders, "_decode_image"
    else:
        ids = np.random.default_rng(0).integers(4, 60, size=24 * 40)  # the tiny preset's 64 ids; 0-3 are special
        token_shards(tmp_path / "text", np.split(ids, 24), per_shard=10)  # 24 chunks of 40 ids: 64 blocks of 15
        data = dict(shards=str(tmp_path / "text"), batch_size=4, block_tokens=16)
        owner, name = seekable.TokenBlocks, "__getitem__"
    cfg = tiny_cfg(modality, stream_resume=resume, data=data)
    stream = pretrain_stream(modality, cfg.data, cfg.seed, cfg.stream_resume)
    run_pretrain(cfg, build_objective(cfg), stream, tmp_path / "a", progress=False)
    run_pretrain(cfg, build_objective(cfg), stream, tmp_path / "b", progress=False, stop_after=4)
    counted, read = [], getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a: counted.append(1) or read(*a))
    run_pretrain(cfg, build_objective(cfg), stream, tmp_path / "b", progress=False)
    assert len(counted) == reads
    log_a, log_b = pd.read_csv(tmp_path / "a" / "metrics.csv"), pd.read_csv(tmp_path / "b" / "metrics.csv")
    np.testing.assert_array_equal(log_a["loss"].to_numpy(), log_b["loss"].to_numpy())
    a, b = (torch.load(tmp_path / run / "final.pt", weights_only=False)["encoder"] for run in ("a", "b"))
    for k, v in a.items():
        assert torch.equal(b[k], v), k


def test_a_reseeded_resume_starts_a_fresh_stream_instead_of_decoding_the_consumed_batches(tmp_path, monkeypatch):
    """`stream_resume: reseed`: resuming at batch k decodes one batch,
    from the stream of `resumed_seed(seed, k)`, where `replay` decodes k + 1. A resumed run then continues to the end
    on other batches than the uninterrupted run."""
    from conftest import _image_shards
    from d2v.data import loaders
    from d2v.train.batches import pretrain_stream, resumed_seed

    _image_shards(tmp_path)
    image = dict(size=32, channels=1, mean=(0.5,), std=(0.5,), min_scale=0.3)
    data = PretrainConfig.model_fields["data"].annotation.model_validate(
        dict(shards=str(tmp_path / "shards" / "toy" / "train"), batch_size=4, image=image))
    decoded = []
    decode = loaders._decode_image
    monkeypatch.setattr(loaders, "_decode_image", lambda *a: decoded.append(1) or decode(*a))

    def first(stream, start):
        decoded.clear()
        torch.manual_seed(0)  # the crops draw from the main process's RNG (no workers)
        return next(stream(start)).source, len(decoded)

    replayed, replay_cost = first(pretrain_stream("image", data, 3), 10)
    fresh, fresh_cost = first(pretrain_stream("image", data, 3, "reseed"), 10)
    assert (replay_cost, fresh_cost) == (44, 4)
    assert torch.equal(fresh, first(pretrain_stream("image", data, resumed_seed(3, 10)), 0)[0])
    assert not torch.equal(fresh, replayed)
    assert torch.equal(first(pretrain_stream("image", data, 3, "reseed"), 0)[0],
                       first(pretrain_stream("image", data, 3), 0)[0])  # a fresh run is the same either way
    import pandas as pd

    losses = {}
    for run, resume in (("straight", None), ("reseed", "reseed"), ("replay", "replay")):
        cfg = tiny_cfg("image", data=data.model_dump(), stream_resume=resume or "reseed")
        stream = pretrain_stream("image", cfg.data, cfg.seed, cfg.stream_resume)
        if resume:  # stopped after step 4, the step-3 checkpoint on disk; the switch may change across a resume
            run_pretrain(tiny_cfg("image", data=data.model_dump()), build_objective(cfg), stream, tmp_path / run,
                         progress=False, stop_after=4)
        run_pretrain(cfg, build_objective(cfg), stream, tmp_path / run, progress=False)
        losses[run] = pd.read_csv(tmp_path / run / "metrics.csv")["loss"].to_numpy()
    np.testing.assert_array_equal(losses["replay"], losses["straight"])
    np.testing.assert_array_equal(losses["reseed"][:3], losses["straight"][:3])
    assert len(losses["reseed"]) == 6 and not np.array_equal(losses["reseed"][3:], losses["straight"][3:])


def test_checkpoints_keep_the_newest_k_and_last_points_at_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, {"x": step}, keep=2)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-00000003.pt", "step-00000004.pt"]
    assert checkpoint.load(tmp_path / "last.pt")["x"] == 4
    (tmp_path / "step-00000005.pt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="step-00000005.pt: unreadable checkpoint"):
        checkpoint.load(checkpoint.latest(tmp_path))


def test_a_checkpoint_of_other_ranks_resumes_only_at_its_global_batch(tmp_path, capsys):
    """Written by 4 ranks × accum 2 at step 5 (10 micro-batches a rank); read by 8 ranks it needs accum 1, by 2
    ranks accum 4 (then 20 micro-batches a rank consumed), and 3 ranks cannot split it. Refused, never discarded,
    even where another config would be; another config with it is discarded as before."""
    from d2v.train.distributed import World

    config = {"accum_steps": 2, "lr": 1.0}
    checkpoint.save(tmp_path, 5, {"config": config, "batches": 10, "ranks": 4})
    resume = lambda world, accum: checkpoint.resume_point(  # noqa: E731
        tmp_path, {**config, "accum_steps": accum}, 1, (), 100, restart_on_change=True, world=world)
    assert resume(World(size=4), 2)[1]["batches"] == 10
    assert resume(World(size=8), 1)[1]["batches"] == 5
    assert resume(World(size=2), 4)[1]["batches"] == 20
    assert "written by 4 ranks × accum_steps 2, continued by 2 × 4 at the same global batch" in capsys.readouterr().err
    with pytest.raises(ValueError, match="on 2 ranks set accum_steps to 4 to continue at the same global batch"):
        resume(World(size=2), 2)
    with pytest.raises(ValueError, match="which 3 ranks cannot split evenly; resume it on a divisor of 8 ranks"):
        resume(World(size=3), 3)
    assert checkpoint.latest(tmp_path) is not None
    assert checkpoint.resume_point(tmp_path, {**config, "lr": 2.0}, 1, (), 100, restart_on_change=True,
                                   world=World(size=1)) == (None, None)  # another recipe: a pipeline stage restarts
    assert checkpoint.latest(tmp_path) is None
    legacy = tmp_path / "legacy"  # written before checkpoints recorded their ranks: taken as this run's
    checkpoint.save(legacy, 5, {"config": config, "batches": 10})
    assert checkpoint.resume_point(legacy, config, 1, (), 100, world=World(size=8))[1]["batches"] == 10


def test_a_config_key_added_since_the_checkpoint_is_no_change_at_its_default_only():
    """A checkpoint written before `weights` and `optim.tri_stage_phases` existed resumes under today's config at their
    defaults (read through the model); not from a plain dict, not at another value, not past a key removed since."""
    cfg = finetune_config("fashion_mnist")
    saved = cfg.model_dump(mode="json")
    del saved["weights"], saved["optim"]["tri_stage_phases"]
    assert checkpoint.changed_since({"config": saved}, cfg, 1, ()) == []
    assert checkpoint.changed_since({"config": saved}, cfg.model_dump(mode="json"), 1, ()) == ["optim", "weights"]
    assert checkpoint.changed_since({"config": saved}, cfg.model_copy(update={"stream_resume": "reseed"}), 1,
                                    ()) == ["stream_resume"]
    assert checkpoint.changed_since({"config": {**saved, "retired": 1}}, cfg, 2, ()) == ["optim", "retired", "weights",
                                                                                         "recipe"]


def test_a_finished_run_under_other_shards_is_refused_and_an_older_summary_is_taken_on_trust(tmp_path):
    cfg, run = tiny_cfg("text"), tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    (run / "final.pt").write_bytes(b"")
    recipe.stamp(run, "pretrain")
    (run / "summary.json").write_text(json.dumps({"steps": 6, "data_digest": "abc"}))
    finished = lambda digest: checkpoint.finished_run(run, cfg, "pretrain", (), digest, False)  # noqa: E731
    assert finished("abc")["steps"] == 6
    with pytest.raises(ValueError, match=r"another config, data or recipe \(data changed\)"):
        finished("def")
    (run / "summary.json").write_text(json.dumps({"steps": 6}))  # written before summaries named their data
    assert finished("def")["steps"] == 6
    (run / "checkpoints").mkdir()
    checkpoint.save(run / "checkpoints", 6, {"config": cfg.model_dump(mode="json")})
    assert finished("def") is None  # a checkpoint is left: resume_point decides


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_train import tiny_cfg, synthetic_stream
from d2v.train.distributed import init, shutdown
from d2v.train.pretrain import build_objective, run_pretrain, start_from
world = init("cpu")
cfg = tiny_cfg("speech", steps=4)
objective = build_objective(cfg)
run_pretrain(cfg, objective, synthetic_stream("speech", rank=world.rank, world=world.size), {out!r}, world,
             progress=False)
if world.is_main:
    torch.save(objective.state_dict(), {out!r} + "/state.pt")
    import pathlib, shutil  # the step-3 checkpoint, for a resume on one process
    pathlib.Path({out!r} + "-one/checkpoints").mkdir(parents=True)
    shutil.copy({out!r} + "/checkpoints/step-00000003.pt", {out!r} + "-one/checkpoints/")
# another config over the finished run, as a pipeline stage: every rank reads the checkpoint before rank 0 discards it
longer = cfg.model_copy(update=dict(steps=5))
run_pretrain(longer, build_objective(longer), synthetic_stream("speech", rank=world.rank, world=world.size), {out!r},
             world, progress=False, stop_after=1, restart_on_change=True)
shutdown()
"""


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_one_process_with_accumulation(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path / "ddp")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script)], check=True, env=env, cwd=ROOT, timeout=300)
    cfg = tiny_cfg("speech", steps=4, accum_steps=2)
    single = build_objective(cfg)
    run_pretrain(cfg, single, synthetic_stream("speech"), tmp_path / "single", progress=False)
    ddp = torch.load(tmp_path / "ddp" / "state.pt")
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6, msg=k)
    import pandas as pd  # the restart under another config discarded the checkpoints on both ranks, then ran a step

    assert not (tmp_path / "ddp" / "checkpoints").exists()
    assert pd.read_csv(tmp_path / "ddp" / "metrics.csv")["step"].tolist() == [1]
    # the 2-rank step-3 checkpoint continues on one process only at the same global batch, then as the 2 ranks did
    with pytest.raises(ValueError, match="2 ranks × accum_steps 1; on 1 ranks set accum_steps to 2"):
        run_pretrain(tiny_cfg("speech", steps=4), build_objective(cfg), synthetic_stream("speech"),
                     tmp_path / "ddp-one", progress=False, restart_on_change=True)
    one = build_objective(cfg)
    run_pretrain(cfg, one, synthetic_stream("speech"), tmp_path / "ddp-one", progress=False)
    # the copied checkpoint brought the 2 ranks' log up to its step 3
    assert pd.read_csv(tmp_path / "ddp-one" / "metrics.csv")["step"].tolist() == [1, 2, 3, 4]
    for k, v in single.state_dict().items():
        torch.testing.assert_close(one.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


STOP_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from test_train import signalling, synthetic_stream, tiny_cfg
from d2v.train.distributed import barrier, init, shutdown
from d2v.train.preemption import Interrupted
from d2v.train.pretrain import build_objective, run_pretrain
world = init("cpu")
cfg = tiny_cfg("speech")  # 6 steps, a checkpoint every 3
stream = synthetic_stream("speech", rank=world.rank, world=world.size)
run_pretrain(cfg, build_objective(cfg), stream, {out!r} + "/straight", world, progress=False)
try:  # the signal reaches rank 1 alone, in step 4 (its batch 3)
    run_pretrain(cfg, build_objective(cfg), signalling(stream, at=3) if world.rank == 1 else stream,
                 {out!r} + "/stopped", world, progress=False)
except Interrupted as err:
    json.dump([err.step, err.signum], open({out!r} + f"/rank{{world.rank}}.json", "w"))
barrier(world)
run_pretrain(cfg, build_objective(cfg), stream, {out!r} + "/stopped", world, progress=False)
shutdown()
"""


@pytest.mark.slow
def test_under_torchrun_every_rank_stops_at_the_step_one_rank_was_signalled_in(tmp_path):
    """SIGTERM reaches one rank of two (the writer learns of it from the other): both finish step 4, rank 0 writes
    its checkpoint, both stop; the relaunch resumes there and ends bit-identical to the uninterrupted 2-rank run."""
    script = tmp_path / "stop.py"
    script.write_text(STOP_SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script)], check=True, env=env, cwd=ROOT, timeout=300)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [[4, signal.SIGTERM]] * 2
    assert (tmp_path / "stopped" / "checkpoints" / "step-00000004.pt").is_file()
    a, b = (torch.load(tmp_path / run / "final.pt", weights_only=False) for run in ("straight", "stopped"))
    for part in ("encoder", "teacher"):
        for k, v in a[part].items():
            assert torch.equal(b[part][k], v), (part, k)


FSDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_train import tiny_cfg, synthetic_stream
from d2v.train.distributed import barrier, init, shutdown
from d2v.train.pretrain import build_objective, run_pretrain, start_from
world = init("cpu")
cfg = tiny_cfg({modality!r}, objective={objective!r}, steps=4, parallel="fsdp")
stream = synthetic_stream({modality!r}, rank=world.rank, world=world.size)
run_pretrain(cfg, build_objective(cfg), stream, {out!r} + "/straight", world, progress=False)
run_pretrain(cfg, build_objective(cfg), stream, {out!r} + "/resumed", world, progress=False, stop_after=3)
barrier(world)  # rank 0 has written the step-3 checkpoint that every rank resumes from
run_pretrain(cfg, build_objective(cfg), stream, {out!r} + "/resumed", world, progress=False)  # from step 3
# one process × accum 2 wrote this step-3 checkpoint: 2 sharded ranks × accum 1 continue it
run_pretrain(cfg, build_objective(cfg), stream, {out!r} + "/from-one", world, progress=False)
if {layerdrop}:  # a block one rank skipped and another ran would leave their collectives unmatched
    objective = build_objective(cfg)
    objective.student.cfg = objective.student.cfg.model_copy(update=dict(layerdrop={layerdrop}))
    run_pretrain(cfg, objective, stream, {out!r} + "/layerdrop", world, progress=False)
shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("modality, objective", [("speech", "v1"), ("image", "v2")])
def test_two_process_gloo_fsdp_matches_one_process_and_resumes_exactly(tmp_path, modality, objective):
    """FSDP shards student, teacher and AdamW states; the update, the EMA step and the checkpoints (full state,
    single-process layout) match one process with 2 micro-batches, and a run stopped after its step-3 checkpoint
    resumes to the uninterrupted run's weights bit for bit. The rank count may change across a resume at the same
    global batch, both ways: one process's checkpoint continues on 2 sharded ranks, theirs in one process."""
    cfg = tiny_cfg(modality, objective=objective, steps=4, accum_steps=2)
    single = build_objective(cfg)
    run_pretrain(cfg, single, synthetic_stream(modality), tmp_path / "single", progress=False)
    from_one = tmp_path / "fsdp" / "from-one" / "checkpoints"
    from_one.mkdir(parents=True)
    shutil.copy(tmp_path / "single" / "checkpoints" / "step-00000003.pt", from_one)
    script = tmp_path / "fsdp.py"
    layerdrop = 0.5 if modality == "speech" else 0.0
    script.write_text(FSDP_SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path / "fsdp"), modality=modality,
                                         objective=objective, layerdrop=layerdrop))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script)], check=True, env=env, cwd=ROOT, timeout=300)
    sharded = checkpoint.load(tmp_path / "fsdp" / "straight" / "checkpoints" / "last.pt")
    one = checkpoint.load(tmp_path / "single" / "checkpoints" / "last.pt")
    assert sharded["model"].keys() == one["model"].keys()
    for k, v in one["model"].items():
        torch.testing.assert_close(sharded["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert sharded["optimizer"]["param_groups"] == one["optimizer"]["param_groups"]  # the same layout
    torch.testing.assert_close(sharded["optimizer"]["state"], one["optimizer"]["state"], rtol=1e-5, atol=1e-6)
    final = torch.load(tmp_path / "fsdp" / "straight" / "final.pt", weights_only=False)
    for k, v in single.teacher.state_dict().items():
        torch.testing.assert_close(final["teacher"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    resumed = checkpoint.load(tmp_path / "fsdp" / "resumed" / "checkpoints" / "last.pt")
    for k, v in sharded["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    assert resumed["optimizer"]["state"].keys() == sharded["optimizer"]["state"].keys()  # no state for v2's mask token
    (tmp_path / "one" / "checkpoints").mkdir(parents=True)  # the 2 ranks' step 3, continued in one process
    shutil.copy(tmp_path / "fsdp" / "straight" / "checkpoints" / "step-00000003.pt", tmp_path / "one" / "checkpoints")
    run_pretrain(tiny_cfg(modality, objective=objective, steps=4, accum_steps=2, parallel="fsdp"),
                 build_objective(cfg), synthetic_stream(modality), tmp_path / "one", progress=False)
    for name in ("one", "fsdp/from-one"):
        continued = checkpoint.load(tmp_path / name / "checkpoints" / "last.pt")
        assert continued["step"] == 4 and continued["ranks"] == (1 if name == "one" else 2)
        for k, v in one["model"].items():
            torch.testing.assert_close(continued["model"][k], v, rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
        torch.testing.assert_close(continued["optimizer"]["state"], one["optimizer"]["state"], rtol=1e-5, atol=1e-6)
    if layerdrop:  # the run finished, and its shared draws did skip blocks
        from d2v.train.fsdp import share_layerdrop

        assert (tmp_path / "fsdp" / "layerdrop" / "final.pt").is_file()
        skipped = 0
        for step in range(1, 5):
            share_layerdrop(single.student, cfg.seed, step, 0)
            skipped += sum(bool(torch.rand((), generator=single.student.layerdrop_generator) < layerdrop)
                           for _ in single.student.blocks)
        assert skipped > 0


FSDP_BF16_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from test_train import tiny_cfg, synthetic_stream
from d2v.train.distributed import init, shutdown
from d2v.train.pretrain import build_objective, run_pretrain, start_from
world = init("cpu")
cfg = tiny_cfg("image", objective="v2", steps=2, parallel="fsdp", precision="bf16")
objective = build_objective(cfg)
gathered = []  # the dtype of the parameters a block computes with, inside its FSDP unit
for encoder in (objective.student, objective.teacher):
    encoder.blocks[0].attn.register_forward_pre_hook(lambda m, a: gathered.append(str(next(m.parameters()).dtype)))
run_pretrain(cfg, objective, synthetic_stream("image", rank=world.rank, world=world.size), {out!r}, world,
             progress=False)
if world.is_main:
    json.dump(gathered, open({out!r} + "/gathered.json", "w"))
shutdown()
"""


@pytest.mark.slow
def test_two_process_fsdp_bf16_gathers_bf16_parameters_and_computes_as_one_process_autocast(tmp_path):
    """Under bf16 the FSDP units all-gather bf16 parameters for student and teacher, keep fp32 masters (the
    checkpoint), and leave the op dtypes to autocast: the first loss is the one-process bf16 autocast loss."""
    script = tmp_path / "fsdp_bf16.py"
    script.write_text(FSDP_BF16_SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path / "fsdp")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script)], check=True, env=env, cwd=ROOT, timeout=300)
    import json

    gathered = json.loads((tmp_path / "fsdp" / "gathered.json").read_text())
    assert gathered and set(gathered) == {"torch.bfloat16"}  # student and teacher, every forward
    cfg = tiny_cfg("image", objective="v2", steps=2, accum_steps=2, precision="bf16")
    single = build_objective(cfg)
    run_pretrain(cfg, single, synthetic_stream("image"), tmp_path / "single", progress=False)
    sharded = checkpoint.load(tmp_path / "fsdp" / "checkpoints" / "last.pt")["model"]
    for k, v in single.state_dict().items():
        assert sharded[k].dtype == v.dtype, k  # fp32 masters
        torch.testing.assert_close(sharded[k], v, rtol=0, atol=2e-3, msg=k)  # bf16 noise through 2 AdamW steps
    first = [pd.read_csv(d / "metrics.csv")["loss"][0] for d in (tmp_path / "fsdp", tmp_path / "single")]
    assert first[0] == pytest.approx(first[1], rel=1e-5)  # the same forward as one process under autocast


FP16_SCRIPT = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
from test_train import cpu_fp16_autocast, tiny_cfg, synthetic_stream
from d2v.train import pretrain
from d2v.train.distributed import barrier, init, shutdown
scales = []  # the loss scale after each optimizer step, this rank's
update = torch.amp.GradScaler.update
def recorded_update(scaler, *args):
    update(scaler, *args)
    scales.append(scaler.get_scale())
torch.amp.GradScaler.update = recorded_update
pretrain.autocast = cpu_fp16_autocast
world = init("cpu")
stream = synthetic_stream("text", rank=world.rank, world=world.size)
for parallel in ("ddp", "fsdp"):
    cfg = tiny_cfg("text", precision="fp16", parallel=parallel)
    pretrain.run_pretrain(cfg, pretrain.build_objective(cfg), stream, {out!r} + "/" + parallel, world, progress=False)
pretrain.run_pretrain(cfg, pretrain.build_objective(cfg), stream, {out!r} + "/resumed", world, progress=False,
                      stop_after=4)
barrier(world)  # rank 0 has written the step-3 checkpoint
pretrain.run_pretrain(cfg, pretrain.build_objective(cfg), stream, {out!r} + "/resumed", world, progress=False)
json.dump(scales, open({out!r} + f"/scales{{world.rank}}.json", "w"))
shutdown()
"""


@pytest.mark.slow
def test_two_process_fp16_ranks_skip_the_same_steps_under_ddp_and_fsdp_and_resume_exactly(tmp_path):
    """fp16's scaler decides on every rank whether a step overflowed; under FSDP each rank holds a shard of the
    gradients, so the ranks must still agree, or their shards and loss scales part. 2 gloo ranks, the CPU scaler
    (growth every step, so steps overflow): both ranks follow one loss scale through an overflow, FSDP ends on DDP's
    weights, and an FSDP run stopped after its step-3 checkpoint resumes to them bit for bit."""
    script = tmp_path / "fp16.py"
    script.write_text(FP16_SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script)], check=True, env=env, cwd=ROOT, timeout=300)
    ranks = [json.loads((tmp_path / f"scales{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    ddp, fsdp = ranks[0][:6], ranks[0][6:12]
    assert fsdp == ddp and any(later < earlier for earlier, later in zip(ddp, ddp[1:]))  # an overflow, halved
    final = {run: torch.load(tmp_path / run / "final.pt", weights_only=False) for run in ("ddp", "fsdp", "resumed")}
    for k, v in final["ddp"]["encoder"].items():
        assert torch.equal(final["fsdp"]["encoder"][k], v), k
        assert torch.equal(final["resumed"]["encoder"][k], v), k


@pytest.mark.parametrize("signal", ["target_var", "target_rank"])
def test_collapse_guard_stops_the_run_and_keeps_a_checkpoint(tmp_path, signal):
    cfg = tiny_cfg("text", collapse_warmup=0.0)
    objective = build_objective(cfg)
    objective.cfg = objective.cfg.model_copy(update={"collapse": objective.cfg.collapse.model_copy(
        update={"min_target_var": 0.0, "min_pred_var": 0.0, f"min_{signal}": 1e9})})
    with pytest.raises(CollapseError, match=signal):
        run_pretrain(cfg, objective, synthetic_stream("text"), tmp_path, progress=False)
    assert checkpoint.latest(tmp_path / "checkpoints").name == "step-00000001.pt"
    logged = pd.read_csv(tmp_path / "metrics.csv").iloc[0]  # effective ranks are logged at log steps
    dim = objective.student.dim
    for probe in ("target", "pred", "local"):
        assert 1.0 <= logged[f"{probe}_rank"] <= dim


def test_front_end_gradient_scale_and_freeze():
    """local_grad_mult scales only the gradient reaching the speech front end (fairseq feature_grad_mult); 0 freezes
    it and takes it out of the optimizer, so weight decay cannot move it either."""
    batch = next(synthetic_stream("speech")(0))
    grads = {}
    for mult in (1.0, 0.25):
        objective = build_objective(tiny_cfg(local_grad_mult=mult))
        objective(batch, np.random.default_rng(0)).loss.backward()
        grads[mult] = {n: p.grad.clone() for n, p in objective.student.named_parameters() if p.grad is not None}
    for name, grad in grads[1.0].items():
        scale = 0.25 if name.startswith("feature_extractor.") else 1.0
        torch.testing.assert_close(grads[0.25][name], grad * scale, rtol=1e-4, atol=1e-7, msg=name)
    assert any(n.startswith("feature_extractor.") for n in grads[1.0])
    frozen = build_objective(tiny_cfg(local_grad_mult=0.0))
    front_end = set(map(id, frozen.student.feature_extractor.parameters()))
    assert front_end and not front_end & set(map(id, frozen.student_parameters()))
    local = build_objective(tiny_cfg(freeze_local_encoder=True))
    trained = set(map(id, local.student_parameters()))
    for module in (local.student.feature_extractor, local.student.feature_norm, local.student.feature_proj):
        assert not set(map(id, module.parameters())) & trained
    assert set(map(id, local.student.blocks.parameters())) <= trained
    with pytest.raises(ValueError, match="pretrain.text.local_grad_mult: TextEncoder has no front end"):
        build_objective(tiny_cfg("text", local_grad_mult=0.5))


def test_frozen_text_embeddings_stay_put_while_the_blocks_train(tmp_path):
    """freeze_local_encoder on text: embeddings and their LayerNorm leave the optimizer and end pretraining where
    they started (teacher and student alike); the blocks move. Image has no such switch and says which key."""
    cfg = tiny_cfg("text", freeze_local_encoder=True)
    objective = build_objective(cfg)
    student = objective.student
    local = ("embed_tokens.", "embed_positions.", "embed_norm.")
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    assert not {n for n, p in student.named_parameters() if n.startswith(local) and p.requires_grad}
    run_pretrain(cfg, objective, synthetic_stream("text"), tmp_path, progress=False)
    teacher = dict(objective.ema.model.named_parameters())
    for name, param in student.named_parameters():
        if name.startswith(local):
            torch.testing.assert_close(param, start[name], rtol=0, atol=0, msg=name)
            torch.testing.assert_close(teacher[name], start[name], rtol=0, atol=0, msg=name)
    assert all(not torch.equal(p, start[f"blocks.{n}"]) for n, p in student.blocks.named_parameters())
    with pytest.raises(ValueError, match="pretrain.image.freeze_local_encoder: ImageEncoder has no switch"):
        build_objective(tiny_cfg("image", freeze_local_encoder=True))


def test_schedules():
    assert cosine_with_warmup(0, 100, 10) == pytest.approx(0.1)
    assert cosine_with_warmup(10, 100, 10) == pytest.approx(1.0)
    assert cosine_with_warmup(100, 100, 10) == pytest.approx(0.0)
    assert tri_stage(0, 100) == pytest.approx(0.01)
    assert tri_stage(10, 100) == pytest.approx(1.0) and tri_stage(49, 100) == pytest.approx(1.0)
    assert tri_stage(100, 100) == pytest.approx(0.05)
    assert tri_stage(75, 100) == pytest.approx(0.05 ** 0.5)  # exponential decay: geometric midpoint
    ctc = finetune_config("speech_1h")  # the recipe ends at 0.05 of the peak LR (spec §9.2), not near 0
    assert schedule_fn("tri_stage", ctc.steps, 0, ctc.optim.final_lr_scale)(ctc.steps) == pytest.approx(0.05)
    with pytest.raises(ConfigError, match=r"finetune.speech_1h.optim.final_lr_scale: tri_stage decays exponentially"):
        finetune_config("speech_1h", {"optim": {"final_lr_scale": 0.0}})
    with pytest.raises(ConfigError, match=r"pretrain.speech.optim.final_lr_scale"):
        pretrain_config("speech", {"optim": {"schedule": "tri_stage"}})
    # fairseq polynomial_decay (power 1) as in RoBERTa's GLUE configs: 6 % warm-up, then a straight line to 0
    assert linear_with_warmup(5, 100, 6) == pytest.approx(1.0) and linear_with_warmup(53, 100, 6) == pytest.approx(0.5)
    assert linear_with_warmup(100, 100, 6) == pytest.approx(0.0)


def test_target_layers_and_text_masking_can_be_overridden_per_run():
    span = {"prob": 0.35, "length": 4, "leave_unmasked_prob": 0.0, "random_token_prob": 0.0}
    text = build_objective(pretrain_config("text", {"top_k": 2, "text_mask": span}))
    assert text.cfg.top_k == 2 and text.modality.mask_cfg.length == 4  # the released span variant
    assert build_objective(pretrain_config("text", {"center_targets": "position"})).cfg.center_targets == "position"
    assert build_objective(pretrain_config("text")).cfg.center_targets == "none"  # the papers' targets by default
    rng = np.random.default_rng(0)
    views = text.modality.make_views(synthetic.batches("text", rng, 4, length=64, vocab_size=8000).__next__(), rng)
    assert 0.2 < views.loss_mask.float().mean() < 0.5  # 35 % of the tokens in spans of 4, minus overlaps
    assert build_objective(pretrain_config("text")).cfg.top_k == 4  # the recipe's 10, capped at the depth
    with pytest.raises(ValueError, match="pretrain.text.top_k: 5 layers asked for, the embedded encoder has 4"):
        build_objective(pretrain_config("text", {"top_k": 5}))
    with pytest.raises(ValueError, match="pretrain.image.text_mask: only data2vec 1.0 text"):
        build_objective(pretrain_config("image", {"text_mask": span}))


def test_embedded_defaults_validate_and_errors_name_the_key():
    cfg = pretrain_config("speech", {"optim": {"lr": 1e-4}})
    assert cfg.optim.lr == 1e-4 and cfg.data.batch_size == 8
    with pytest.raises(ValueError, match=r"pretrain.image.optim.lr: Input should be greater than 0"):
        pretrain_config("image", {"optim": {"lr": -1}})
    with pytest.raises(ValueError, match=r"pretrain.text.stepz: Extra inputs are not permitted"):
        pretrain_config("text", {"stepz": 3})
    assert EMAConfig.constant(0.5).tau_steps == 0


def test_paper_size_presets_take_no_embedded_defaults():
    """The CPU recipe once filled what a GPU profile left out (Fashion-MNIST's statistics reached ImageNet): base and
    large start from the typed defaults, which are the papers' values, and None means the modality recipe's."""
    from d2v.modalities.registry import ENCODERS
    from d2v.train.config import PAPER_PRESETS

    for presets, _ in ENCODERS.values():  # the paper sizes are exactly the presets at BERT-base width or wider
        assert {name for name, cfg in presets.items() if cfg.dim >= 768} == PAPER_PRESETS & set(presets)
    given = {"steps": 10, "optim": {"lr": 1e-3}, "data": {"shards": "s", "batch_size": 4, "image": {"size": 224}}}
    for objective in ("v1", "v2"):
        base = pretrain_config("image", {"preset": "base", "objective": objective, **given})
        assert (base.data.image.channels, base.data.image.mean, base.data.image.crop_pct) == \
            (3, (0.485, 0.456, 0.406), 0.875)
        assert (base.ema, base.clones, base.optim.clip_norm, base.optim.warmup_steps) == (None, None, None, 0)
        embedded = pretrain_config("image", {"objective": objective, **given})  # the same overrides, CPU size
        assert (embedded.data.image.channels, embedded.ema.tau_steps, embedded.optim.clip_norm) == \
            (1, 1500 if objective == "v1" else 600, 3.0 if objective == "v1" else 4.0)
        assert embedded.clones == (8 if objective == "v2" else None)
    with pytest.raises(ConfigError, match=r"(?s)pretrain.speech.optim: Field required.*'large' is a paper size"):
        pretrain_config("speech", {"preset": "large", "steps": 10, "data": {"shards": "s", "batch_size": 4}})


def test_a_checkpoint_from_another_config_or_data_is_never_resumed_silently(tmp_path, capsys, monkeypatch):
    cfg = tiny_cfg("text")
    run_pretrain(cfg, build_objective(cfg), synthetic_stream("text"), tmp_path, progress=False, stop_after=4,
                 data_digest="aaa")
    changed = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": 5e-4})})
    with pytest.raises(ValueError, match=r"step-00000003.pt: written under a different config or data \(optim"):
        run_pretrain(changed, build_objective(changed), synthetic_stream("text"), tmp_path, progress=False,
                     data_digest="aaa")
    with pytest.raises(ValueError, match=r"\(data changed\)"):
        run_pretrain(cfg, build_objective(cfg), synthetic_stream("text"), tmp_path, progress=False, data_digest="bbb")
    with monkeypatch.context() as m:  # the code's pretraining recipe moved on since the checkpoint was written
        m.setattr(recipe, "PRETRAIN", recipe.PRETRAIN + 1)
        with pytest.raises(ValueError, match=r"\(recipe changed\)"):
            run_pretrain(cfg, build_objective(cfg), synthetic_stream("text"), tmp_path, progress=False,
                         data_digest="aaa")
    # only the logging cadence differs: resumes at step 3
    resumable = cfg.model_copy(update={"log_every": 2})
    run_pretrain(resumable, build_objective(resumable), synthetic_stream("text"), tmp_path, progress=False,
                 data_digest="aaa", stop_after=5)
    assert "resumed from" in capsys.readouterr().err
    # pipeline mode: stale checkpoints are discarded and the run starts from step 0; so is a finished run
    summary = run_pretrain(changed, build_objective(changed), synthetic_stream("text"), tmp_path, progress=False,
                           data_digest="aaa", restart_on_change=True)
    assert "discarded (optim); starting afresh" in capsys.readouterr().err and summary["step"] == 6
    objective = build_objective(changed)  # what the summary says is left of the teacher's init: its schedule's
    assert summary["teacher_init_share"] == pytest.approx(init_share(objective.ema.cfg, 6))
    assert 0.0 < summary["teacher_init_share"] < 1.0
    rows = pd.read_csv(tmp_path / "metrics.csv")
    assert rows["step"].tolist() == list(range(1, 7))
    run_pretrain(changed, build_objective(changed), synthetic_stream("text"), tmp_path, progress=False,
                 data_digest="aaa", restart_on_change=True)
    assert "discarded (finished run)" in capsys.readouterr().err


def test_metrics_log_widens_its_header_when_a_column_appears_later(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv")
    log.write({"step": 1, "loss": 0.9})
    log.write({"step": 2, "loss": 0.8, "dev_accuracy": 0.6})  # the first evaluation
    log.write({"step": 3, "loss": 0.7})
    df = log.frame()
    assert list(df.columns) == ["step", "loss", "dev_accuracy"] and df["step"].tolist() == [1, 2, 3]
    assert df["dev_accuracy"].iloc[1] == 0.6 and df["dev_accuracy"].isna().tolist() == [True, False, True]
    assert df["loss"].tolist() == [0.9, 0.8, 0.7]
