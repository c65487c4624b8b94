"""The trainer's loop: schedule, exact resume, a resume that accepts only its own run, divergence guard, DDP."""
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from iconv import ConvFlow, ConvNet, NotInvertibleError
from iconv.losses import classification_loss, flow_loss
from iconv.train import (GlobalBatches, History, ResumeError, TrainConfig, TrainingDiverged, fit,
                         load_checkpoint, lr_factor, read_checkpoint)

REPO = Path(__file__).resolve().parents[1]


def tiny_data(n=48, shape=(1, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)


def tiny_flow(dtype=torch.float32, **kw):
    torch.manual_seed(1)
    return ConvFlow((1, 4, 4), depth=2, **kw).to(dtype)


def config(**kw):
    base = dict(steps=6, batch_size=8, lr=1e-2, warmup=2, clip=10.0, device="cpu", seed=3)
    base.update(kw)
    return TrainConfig(**base)


def params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def untimed(rows):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def test_lr_schedule():
    c = TrainConfig(steps=10, warmup=2, lr=1.0)
    assert [lr_factor(s, c) for s in range(2)] == [0.5, 1.0]
    assert lr_factor(2, c) == pytest.approx(1.0)
    assert lr_factor(6, c) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(10, c) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(7, TrainConfig(steps=10, schedule="constant")) == 1.0


def test_config_validation():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")


def test_global_batches_are_stateless_epochs():
    order = GlobalBatches(10, 3, seed=0)
    epoch0 = torch.cat([order(s) for s in range(3)])
    assert len(set(epoch0.tolist())) == 9  # no repeats inside an epoch; the short batch is dropped
    again = GlobalBatches(10, 3, seed=0)
    assert torch.equal(again(4), order(4)) and torch.equal(again(1), order(1))
    assert not torch.equal(order(0), order(3))  # a new permutation each epoch
    with pytest.raises(ValueError, match="fewer than one batch"):
        GlobalBatches(2, 3, 0)


def test_fit_lowers_the_loss_and_records_history():
    images = tiny_data(64)
    model = tiny_flow()
    h = fit(model, flow_loss, images, config=config(steps=20, batch_size=16, eval_every=10),
            evaluate=lambda m: {"bpd": float(m.bits_per_dim(images[:16]).mean())}, progress=False)
    assert isinstance(h, History) and h.steps == 20 and h.stopped == "completed"
    first, last = h.train[0]["bits/dim"], sum(r["bits/dim"] for r in h.train[-5:]) / 5
    assert last < first
    assert [r["step"] for r in h.eval] == [10, 20]
    assert set(h.train[0]) >= {"step", "loss", "lr", "grad_norm", "seconds", "bits/dim"}
    assert History.from_dict(json.loads(json.dumps(h.to_dict()))).eval == h.eval
    assert h.column("bits/dim")[0][:2] == [1, 2]


class Crash(RuntimeError):
    pass


def crash_at(step_to_crash, loss=flow_loss):
    """A loss that dies (like a killed job) when called for the given step."""
    calls = {"n": 0}

    def loss_fn(model, images, labels):
        calls["n"] += 1
        if calls["n"] == step_to_crash + 1:
            raise Crash("simulated crash")
        return loss(model, images, labels)

    return loss_fn


def test_resume_continues_exactly(tmp_path):
    images = tiny_data()
    cfg = config(steps=8, checkpoint_every=3, eval_every=4)
    evaluate = lambda m: {"bpd": float(m.bits_per_dim(images[:8], generator=torch.Generator().manual_seed(0)).mean())}

    straight = tiny_flow()
    h_straight = fit(straight, flow_loss, images, config=cfg, evaluate=evaluate, progress=False,
                     checkpoint_path=tmp_path / "a.pt")

    interrupted = tiny_flow()
    path = tmp_path / "b.pt"
    with pytest.raises(Crash):
        fit(interrupted, crash_at(7), images, config=cfg, evaluate=evaluate, checkpoint_path=path, progress=False)
    assert load_checkpoint(path)["step"] == 6
    torch.manual_seed(12345)  # the global RNG state must not matter
    resumed = tiny_flow()
    h_resumed = fit(resumed, flow_loss, images, config=cfg, evaluate=evaluate, checkpoint_path=path, resume=True,
                    progress=False)
    assert torch.equal(params(resumed), params(straight))
    assert [r["loss"] for r in h_resumed.train] == [r["loss"] for r in h_straight.train]
    assert untimed(h_resumed.eval) == untimed(h_straight.eval) and len(h_resumed.eval) == 2
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_checkpoint_describes_the_run(tmp_path):
    path = tmp_path / "d.pt"
    fit(tiny_flow(), flow_loss, tiny_data(), config=config(steps=2), checkpoint_path=path, progress=False,
        run={"data": {"name": "synthetic", "split": "train"}}, experiment={"what": "a test"})
    state = read_checkpoint(path)
    assert state["model"] == {"class": "ConvFlow", "arguments": tiny_flow().arguments}
    assert state["step"] == 2 and state["seed"] == 3 and state["data"] == {"name": "synthetic", "split": "train"}
    assert state["experiment"] == {"what": "a test"}
    assert state["run"]["training"]["lr"] == 1e-2 and state["run"]["train_data"]["digest"].startswith("sha256:")
    assert set(state["training"]) >= {"optimizer", "scheduler", "rng", "history", "config"}


def test_resume_refuses_a_different_run_and_lists_the_keys(tmp_path):
    images = tiny_data()
    path = tmp_path / "c.pt"
    fit(tiny_flow(), flow_loss, images, config=config(steps=2), checkpoint_path=path, progress=False)
    before = path.read_bytes()
    with pytest.raises(ResumeError, match=r"1 differing key\(s\): training.lr: checkpoint 0.01, now 0.02"):
        fit(tiny_flow(), flow_loss, images, config=config(steps=2, lr=2e-2), checkpoint_path=path, resume=True,
            progress=False)
    with pytest.raises(ResumeError, match=r"2 differing key\(s\): training.batch_size.*training.seed"):
        fit(tiny_flow(), flow_loss, images, config=config(steps=2, seed=4, batch_size=4), checkpoint_path=path,
            resume=True, progress=False)
    with pytest.raises(ResumeError, match="model.arguments.downsample: checkpoint 'squeeze', now 'nn'"):
        fit(tiny_flow(downsample="nn"), flow_loss, images, config=config(steps=2), checkpoint_path=path, resume=True,
            progress=False)
    with pytest.raises(ResumeError, match="train_data.digest"):
        fit(tiny_flow(), flow_loss, tiny_data(seed=1), config=config(steps=2), checkpoint_path=path, resume=True,
            progress=False)
    with pytest.raises(ResumeError, match="run.data.split: checkpoint <missing>, now 'test'"):
        fit(tiny_flow(), flow_loss, images, config=config(steps=2), checkpoint_path=path, resume=True,
            run={"data": {"split": "test"}}, progress=False)
    assert path.read_bytes() == before  # refused before anything was written


def test_resume_refuses_another_classifier_architecture(tmp_path):
    images, labels = tiny_data(32, (1, 8, 8)), torch.arange(32) % 10
    cfg = config(steps=2, optimizer="sgd", warmup=0)
    path = tmp_path / "net.pt"
    torch.manual_seed(0)
    fit(ConvNet(1, 10, 4, padding="circular", activation="sneaky", downsample="nn"), classification_loss, images,
        labels, config=cfg, checkpoint_path=path, progress=False)
    torch.manual_seed(0)
    other = ConvNet(1, 10, 4)  # zeros / relu / maxpool: the same parameter shapes but for the convs' kind
    with pytest.raises(ResumeError, match="model.arguments.activation.*model.arguments.downsample.*padding"):
        fit(other, classification_loss, images, labels, config=cfg, checkpoint_path=path, resume=True,
            progress=False)


def test_resume_modes_and_overwrite(tmp_path):
    images = tiny_data()
    path = tmp_path / "m.pt"
    with pytest.raises(ResumeError, match="m.pt does not exist.*if-exists"):
        fit(tiny_flow(), flow_loss, images, config=config(), checkpoint_path=path, resume=True, progress=False)
    with pytest.raises(ResumeError, match="needs a checkpoint path"):
        fit(tiny_flow(), flow_loss, images, config=config(), resume=True, progress=False)
    with pytest.raises(ValueError, match="resume must be False, True or 'if-exists'"):
        fit(tiny_flow(), flow_loss, images, config=config(), checkpoint_path=path, resume="yes", progress=False)
    h = fit(tiny_flow(), flow_loss, images, config=config(steps=3), checkpoint_path=path, resume="if-exists",
            progress=False)
    assert h.steps == 3 and read_checkpoint(path)["step"] == 3
    before = path.read_bytes()
    with pytest.raises(ResumeError, match="already exists.*overwrite"):
        fit(tiny_flow(), flow_loss, images, config=config(steps=3), checkpoint_path=path, progress=False)
    assert path.read_bytes() == before
    # more steps may be asked on resume: a constant schedule then equals the longer uninterrupted run
    cfg = lambda steps: config(steps=steps, schedule="constant", warmup=0)
    first = tiny_flow()
    fit(first, flow_loss, images, config=cfg(3), checkpoint_path=path, overwrite=True, progress=False)
    longer = tiny_flow()
    h = fit(longer, flow_loss, images, config=cfg(5), checkpoint_path=path, resume="if-exists", progress=False)
    straight = tiny_flow()
    fit(straight, flow_loss, images, config=cfg(5), progress=False)
    assert h.steps == 5 and torch.equal(params(longer), params(straight))


def test_checkpoint_location_is_checked_before_step_one(tmp_path):
    calls = []
    counting = lambda m, x, y: calls.append(1) or flow_loss(m, x, y)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for bad in (blocker / "c.pt", tmp_path):
        with pytest.raises(OSError, match="checkpoint"):
            fit(tiny_flow(), counting, tiny_data(), config=config(), checkpoint_path=bad, progress=False)
    assert calls == [] and blocker.read_text() == "not a folder"


def nan_at(bad_step):
    calls = {"n": 0}

    def loss_fn(model, images, labels):
        calls["n"] += 1
        loss, metrics = flow_loss(model, images, labels)
        return (loss * float("nan") if calls["n"] == bad_step + 1 else loss), metrics

    return loss_fn


def test_guard_stops_on_non_finite_loss_and_keeps_the_last_checkpoint(tmp_path):
    path = tmp_path / "e.pt"
    model = tiny_flow()
    with pytest.raises(TrainingDiverged, match=r"step 4: the loss is nan.*last good checkpoint is .*e\.pt") as info:
        fit(model, nan_at(4), tiny_data(), config=config(steps=8, checkpoint_every=3), checkpoint_path=path,
            progress=False)
    assert info.value.step == 4 and Path(info.value.checkpoint_path) == path
    state = load_checkpoint(path)
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_a_huge_learning_rate_ends_with_the_trainers_divergence_error():
    with pytest.raises(TrainingDiverged, match="diverged at step [1-9]") as info:
        fit(tiny_flow(), flow_loss, tiny_data(), progress=False,
            config=config(steps=20, lr=1e6, warmup=0, clip=None))
    assert "non-finite" in str(info.value) or "the loss is" in str(info.value)


def test_a_loss_that_fails_at_its_first_step_is_not_called_divergence():
    def broken(model, images, labels):
        raise ValueError("a bug in the loss")

    with pytest.raises(ValueError, match="a bug in the loss"):
        fit(tiny_flow(), broken, tiny_data(), config=config(), progress=False)


def test_guard_stops_when_a_layer_turns_singular(tmp_path):
    def singular(model, images, labels):
        raise NotInvertibleError("frequency (0, 0) is singular")

    with pytest.raises(TrainingDiverged, match="numerically singular.*no checkpoint was written"):
        fit(tiny_flow(), singular, tiny_data(), config=config(), progress=False)

    model = tiny_flow()
    weight = model.convs()[0][0].weight
    for p in model.parameters():
        p.requires_grad_(p is weight)
    weight.register_hook(lambda g: weight.detach().clone())  # SGD with lr 1 then sets this weight to 0
    path = tmp_path / "f.pt"
    with pytest.raises(TrainingDiverged, match="numerically singular") as info:
        fit(model, flow_loss, tiny_data(), checkpoint_path=path, progress=False,
            config=config(steps=4, checkpoint_every=1, optimizer="sgd", momentum=0.0, lr=1.0, warmup=0,
                          schedule="constant", clip=None))
    assert info.value.step == 1 and not path.exists() and bool((weight == 0).all())


def test_bad_training_data():
    with pytest.raises(TypeError, match="uint8"):
        fit(tiny_flow(), flow_loss, torch.rand(16, 1, 4, 4), config=config())
    with pytest.raises(ValueError, match="one label per image"):
        fit(tiny_flow(), flow_loss, tiny_data(16), torch.zeros(3), config=config())
    with pytest.raises(ValueError, match="fewer than one batch"):
        fit(tiny_flow(), flow_loss, tiny_data(4), config=config())
    with pytest.raises(TypeError, match="TrainConfig"):
        fit(tiny_flow(), flow_loss, tiny_data(16), config={"steps": 3})


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from iconv.train import TrainConfig, fit, rank, cleanup_distributed
    sys.path.insert(0, {tests!r})
    from test_train import ddp_problem
    model, loss_fn, images, cfg = ddp_problem()
    history = fit(model, loss_fn, images, config=cfg, progress=False)
    torch.save({{"params": [p.detach() for p in model.parameters()], "losses": [r["loss"] for r in history.train]}},
               {out!r} + f"/rank{{rank()}}.pt")
    cleanup_distributed()
""")


def ddp_problem():
    """A float64 flow with mid-bin dequantization (no noise), so 1 and 2 processes must agree."""
    torch.manual_seed(5)
    model = ConvFlow((1, 4, 4), depth=1).double()

    def loss_fn(m, images, labels):
        x = (images.double() + 0.5) / 256
        bpd = -m.log_prob(x).mean() / (16 * math.log(2)) + 8
        return bpd, {"bits/dim": bpd.detach()}

    return model, loss_fn, tiny_data(32), TrainConfig(steps=3, batch_size=8, lr=1e-2, device="cpu", seed=1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(REPO / "tests"), out=str(tmp_path)))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script)]
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # replicas stay identical
    model, loss_fn, images, cfg = ddp_problem()
    history = fit(model, loss_fn, images, config=cfg, progress=False)  # one process, the same global batches
    assert r0["losses"] == pytest.approx([r["loss"] for r in history.train], rel=1e-12)
    for a, b in zip(r0["params"], model.parameters()):
        assert torch.allclose(a, b.detach(), rtol=1e-10, atol=1e-12)



@pytest.mark.parametrize("clock", ["wall", "process"])
def test_time_limit_stops_and_checkpoints(tmp_path, clock):
    path = tmp_path / "t.pt"
    h = fit(tiny_flow(), flow_loss, tiny_data(), config=config(steps=50, time_limit=1e-9, clock=clock),
            checkpoint_path=path, progress=False)
    assert h.stopped == "time_limit" and h.steps == 0 and load_checkpoint(path)["step"] == 0
    h = fit(tiny_flow(), flow_loss, tiny_data(), config=config(steps=7, log_every=3), progress=False)
    assert h.steps == 7 and [r["step"] for r in h.train] == [3, 6, 7]
    with pytest.raises(ValueError, match="clock"):
        config(clock="gpu")
