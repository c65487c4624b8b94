"""The shared trainer: schedule, exact resume, atomic checkpoints, divergence guard, DDP, CLI."""
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

from iconv import NotInvertibleError
from iconv.flow import ConvFlow, flow_loss
from iconv.train import (GlobalBatches, History, TrainConfig, TrainingDiverged, fit, load_checkpoint, lr_factor,
                         main, save_checkpoint)

REPO = Path(__file__).resolve().parents[1]


def tiny_data(n=48, shape=(1, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)


def tiny_flow(dtype=torch.float32):
    torch.manual_seed(1)
    return ConvFlow((1, 4, 4), depth=2).to(dtype)


def config(**kw):
    base = dict(steps=6, batch_size=8, lr=1e-2, warmup=2, clip=10.0, device="cpu", seed=3)
    base.update(kw)
    return TrainConfig(**base)


def params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


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
    with pytest.raises(ValueError, match="steps"):
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


def crash_at(step_to_crash):
    """A flow loss that dies (like a killed job) when called for the given step."""
    calls = {"n": 0}

    def loss_fn(model, images, labels):
        calls["n"] += 1
        if calls["n"] == step_to_crash + 1:
            raise Crash("simulated crash")
        return flow_loss(model, images, labels)

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
    untimed = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]
    assert untimed(h_resumed.eval) == untimed(h_straight.eval) and len(h_resumed.eval) == 2
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_resume_refuses_a_different_configuration(tmp_path):
    images = tiny_data()
    path = tmp_path / "c.pt"
    fit(tiny_flow(), flow_loss, images, config=config(steps=2), checkpoint_path=path, progress=False)
    with pytest.raises(ValueError, match="lr: checkpoint 0.01 vs now 0.02"):
        fit(tiny_flow(), flow_loss, images, config=config(steps=2, lr=2e-2), checkpoint_path=path, resume=True,
            progress=False)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "d.pt"
    save_checkpoint(path, {"format": 1, "value": 1})

    def broken_save(obj, f, *a, **k):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"format": 1, "value": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["value"] == 1
    assert os.listdir(tmp_path) == ["d.pt"]


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
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_guard_stops_when_a_layer_turns_singular(tmp_path):
    def singular(model, images, labels):
        raise NotInvertibleError("frequency (0, 0) is singular")

    with pytest.raises(TrainingDiverged, match="numerically singular.*no checkpoint was written"):
        fit(tiny_flow(), singular, tiny_data(), config=config(), progress=False)

    model = tiny_flow()
    weight = model.levels[0][0][1].weight
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


def test_cli_trains_and_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["flow", "--size", "ci", "--data", "digits", "--steps", "4", "--batch-size", "16", "--depth", "1",
                 "--eval-size", "32", "--out", str(out), "--checkpoint", str(tmp_path / "cli.pt"), "--no-progress",
                 "--samples", "4", "--device", "cpu"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["model"] == "ConvFlow" and math.isfinite(metrics["test_bits/dim"])
    assert (out / "history.json").exists() and load_checkpoint(tmp_path / "cli.pt")["step"] == 4
    code = main(["flow", "--size", "ci", "--data", "digits", "--steps", "2", "--batch-size", "16", "--depth", "2",
                 "--model", "glow", "--hidden", "4", "--eval-size", "32", "--no-progress", "--samples", "0",
                 "--device", "cpu"])
    assert code == 0 and '"GlowBaseline"' in capsys.readouterr().out


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
