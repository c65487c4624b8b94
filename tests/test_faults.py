"""Fault injection: kill -9 during training and during every kind of write, damaged and foreign
checkpoints, unwritable outputs, pickled payloads, bad flags. Tiny models: the file runs in CI.

Every case ends in the right answer (a resume bitwise equal to an uninterrupted run, the
previous file intact) or a clear refusal before step 1 (exit status 2, a message naming the flag,
file or folder); none of them trains first and loses the run afterwards.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import iconv
from iconv import losses
from iconv.train import main, read_checkpoint
from iconv.train.checkpoint import digest
from iconv.train.files import remove_stale_temporaries

REPO = Path(__file__).resolve().parents[1]
FLOW = ["flow", "--data", "digits", "--steps", "6", "--batch-size", "16", "--depth", "1", "--eval-size", "32",
        "--eval-every", "3", "--checkpoint-every", "2", "--no-progress", "--samples", "2", "--device", "cpu",
        "--threads", "1"]
CLASSIFY = ["classify", "--data", "digits", "--row", "6", "--width", "4", "--steps", "6", "--batch-size", "16",
            "--eval-size", "40", "--eval-every", "3", "--checkpoint-every", "2", "--no-progress", "--device", "cpu",
            "--threads", "1"]


def cli(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture
def count_loss_calls(monkeypatch):
    """Count calls of the flow and classifier losses: zero calls means refused before step 1."""
    calls = []
    flow_loss, make_loss = losses.flow_loss, losses.make_loss

    def counted_flow(*a):
        calls.append("flow")
        return flow_loss(*a)

    def counted_make(**kw):
        loss = make_loss(**kw)
        return lambda *a: calls.append("classify") or loss(*a)

    monkeypatch.setattr(losses, "flow_loss", counted_flow)
    monkeypatch.setattr(losses, "make_loss", counted_make)
    return calls


def untimed(history):
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]
    return strip(history["train"]), strip(history["eval"]), history["completed_steps"], history["stopped"]


# ----------------------------------------------------------------------------- kill -9 during training

KILLER = textwrap.dedent("""
    import os, signal, sys
    from iconv import losses
    from iconv.train import main

    kill_at = int(sys.argv[1])  # the step (0-based) during which the process dies
    calls = [0]

    def killing(loss):
        def loss_fn(*args):
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            calls[0] += 1
            return loss(*args)
        return loss_fn

    flow_loss, make_loss = losses.flow_loss, losses.make_loss
    losses.flow_loss = killing(flow_loss)
    losses.make_loss = lambda **kw: killing(make_loss(**kw))
    main(sys.argv[2:])
""")


# Every run compared bitwise starts in a fresh process with this environment and --threads 1.
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TASKS = {"flow": FLOW, "classify": CLASSIFY}


@pytest.fixture(scope="module", autouse=True)
def killed_processes(tmp_path_factory):
    """The file's subprocesses, started at once when the module starts (they overlap with the other
    tests): two training runs killed at step 5, and the writer killed inside every kind of write."""
    root = tmp_path_factory.mktemp("killed")
    started = {}
    for name, task in TASKS.items():
        folder = root / name
        folder.mkdir()
        argv = [sys.executable, "-c", KILLER, "5", *map(str, task), "--checkpoint", str(folder / "killed.pt"),
                "--out", str(folder / "killed")]
        started[name] = (folder, subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                  text=True))
    (root / "writes").mkdir()
    argv = [sys.executable, "-c", WRITE_KILLER, str(root / "writes")]
    started["writes"] = (root / "writes", subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE,
                                                           stderr=subprocess.PIPE, text=True))
    yield started
    for _, process in started.values():
        if process.poll() is None:
            process.kill()
        process.communicate()


def finished(started, name):
    folder, process = started[name]
    stdout, stderr = process.communicate(timeout=300)
    return folder, process.returncode, stdout, stderr


@pytest.mark.parametrize("name", list(TASKS))
def test_kill_9_during_training_then_resume_is_bitwise_an_uninterrupted_run(killed_processes, tmp_path, capsys,
                                                                            name):
    task = TASKS[name]
    folder, code, _, stderr = finished(killed_processes, name)
    killed_ckpt, killed_out = folder / "killed.pt", folder / "killed"
    assert code == -signal.SIGKILL, stderr[-2000:]
    assert read_checkpoint(killed_ckpt)["step"] == 4  # died during step 5 of 6
    assert not (killed_out / "metrics.json").exists()

    # The resumed and the uninterrupted run each get a fresh process, like the killed one: a process's
    # thread pools are set up once (oneDNN keeps its pool after torch.set_num_threads on torch 2.14),
    # and conv gradients differ in their last bits between thread counts.
    straight_ckpt, straight_out = tmp_path / "straight.pt", tmp_path / "straight"
    runs = [subprocess.Popen([sys.executable, "-m", "iconv.train", *map(str, task + extra)], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for extra in (["--checkpoint", killed_ckpt, "--out", killed_out, "--resume"],
                          ["--checkpoint", straight_ckpt, "--out", straight_out])]
    for process in runs:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]

    resumed, straight = read_checkpoint(killed_ckpt), read_checkpoint(straight_ckpt)
    assert resumed["step"] == straight["step"] == 6
    assert resumed["state_dict"].keys() == straight["state_dict"].keys()
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], tensor), (name, (resumed["state_dict"][name] - tensor).abs().max())  # bitwise
    histories = [json.loads((out / "history.json").read_text()) for out in (killed_out, straight_out)]
    assert untimed(histories[0]) == untimed(histories[1])
    metrics = [json.loads((out / "metrics.json").read_text()) for out in (killed_out, straight_out)]
    assert [{k: v for k, v in m.items() if "seconds" not in k} for m in metrics][0] == \
        [{k: v for k, v in m.items() if "seconds" not in k} for m in metrics][1]


# ----------------------------------------------------------------------------- kill -9 during a write


FILES = {"checkpoint": "c.pt", "history.json": "history.json", "metrics.json": "metrics.json",
         "samples.png": "samples.png"}
WRITE_KILLER = textwrap.dedent("""
    # For every kind of write: write version 1, then fork a child that writes version 2 and is
    # killed (SIGKILL) inside the atomic write; record how the child ended. A fresh process with one
    # thread that has computed nothing in parallel, so that fork is safe.
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot
    import iconv
    from iconv.train import write_checkpoint
    from iconv.train.experiment import History, write_outputs

    root = sys.argv[1]
    torch.manual_seed(0)
    flow = iconv.ConvFlow((1, 4, 4), depth=1)
    writes = {
        "checkpoint": ("c.pt", lambda out, v: write_checkpoint(os.path.join(out, "c.pt"), flow, step=v)),
        "history.json": ("history.json", lambda out, v: write_outputs(out, History(completed_steps=v), {})),
        "metrics.json": ("metrics.json", lambda out, v: write_outputs(out, History(), {"steps": v})),
        "samples.png": ("samples.png",
                        lambda out, v: write_outputs(out, History(), {}, torch.full((1, 1, 4, 4), v / 10))),
    }
    status = {}
    for how in ("before the rename", "half-way"):
        for kind, (name, write) in writes.items():
            if how == "half-way" and kind != "checkpoint":
                continue  # only the checkpoint is written by torch.save
            out = os.path.join(root, how.replace(" ", "-"), kind)
            os.makedirs(out)
            write(out, 1)
            prefix = os.path.join(out, "." + name + ".")
            pid = os.fork()
            if pid == 0:
                if how == "before the rename":  # the data is in the temporary file: die at its fsync
                    fsync = os.fsync
                    def fsync_or_die(fd):
                        if os.readlink(f"/proc/self/fd/{fd}").startswith(prefix):
                            os.kill(os.getpid(), signal.SIGKILL)
                        fsync(fd)
                    os.fsync = fsync_or_die
                else:  # die half-way through the data
                    def half_then_die(obj, f, *a, **k):
                        f.write(bytes(1000))
                        f.flush()
                        os.kill(os.getpid(), signal.SIGKILL)
                    torch.save = half_then_die
                write(out, 2)
                os._exit(0)  # only if the write never reached the kill
            _, code = os.waitpid(pid, 0)
            status[f"{how}/{kind}"] = os.WTERMSIG(code) if os.WIFSIGNALED(code) else -1
    print(json.dumps(status))
""")


@pytest.fixture
def killed_writes(killed_processes):
    folder, code, stdout, stderr = finished(killed_processes, "writes")
    assert code == 0, stderr[-2000:]
    return folder, json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("how, kind", [("before the rename", kind) for kind in FILES] + [("half-way", "checkpoint")])
def test_kill_9_during_each_kind_of_write_keeps_the_previous_file(killed_writes, how, kind):
    root, status = killed_writes
    assert status[f"{how}/{kind}"] == signal.SIGKILL  # the writer died inside the write
    folder = root / how.replace(" ", "-") / kind
    target = folder / FILES[kind]
    stale = list(folder.glob(f".{target.name}.*.tmp"))
    assert len(stale) == 1  # its temporary file, left behind
    if kind == "checkpoint":
        assert read_checkpoint(target)["step"] == 1  # the previous version, intact; readers ignore the stale file
    elif kind == "history.json":
        assert json.loads(target.read_text())["completed_steps"] == 1
    elif kind == "metrics.json":
        assert json.loads(target.read_text()) == {"steps": 1}
    else:
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert remove_stale_temporaries(target) == stale and not list(folder.glob("*.tmp"))


def test_a_new_run_cleans_up_stale_temporaries(tmp_path, capsys):
    ckpt, out = tmp_path / "c.pt", tmp_path / "out"
    out.mkdir()
    leftovers = [tmp_path / ".c.pt.abc123.tmp", out / ".history.json.xyz.tmp", out / ".metrics.json.q.tmp"]
    for p in leftovers:
        p.write_bytes(b"half a file")
    assert cli(FLOW + ["--steps", "2", "--checkpoint", ckpt, "--out", out], capsys)[0] == 0
    assert not any(p.exists() for p in leftovers)


# ----------------------------------------------------------------------------- damaged and foreign checkpoints


@pytest.fixture
def finished_run(tmp_path, capsys):
    ckpt = tmp_path / "run.pt"
    assert cli(FLOW + ["--steps", "2", "--checkpoint", ckpt], capsys)[0] == 0
    return ckpt


def flip_a_weight_byte(path):
    blob = bytearray(path.read_bytes())
    weight = max(torch.load(path, weights_only=True)["state_dict"].values(), key=lambda t: t.numel())
    where = bytes(blob).find(weight.numpy().tobytes()[:16])
    blob[where + 3] ^= 0x10
    path.write_bytes(bytes(blob))


DAMAGE = {
    "corrupted": (flip_a_weight_byte, "is corrupted"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-2000]), "not a readable checkpoint"),
    "empty": (lambda p: p.write_bytes(b""), "not a readable checkpoint"),
    "foreign": (lambda p: torch.save({"model": {}, "step": 2}, p), "not an iconv checkpoint"),
    "text": (lambda p: p.write_text("hello"), "not a readable checkpoint"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_and_foreign_checkpoints_are_refused_before_step_one(finished_run, capsys, count_loss_calls, damage):
    make, message = DAMAGE[damage]
    make(finished_run)
    damaged = finished_run.read_bytes()
    code, err = cli(FLOW + ["--steps", "4", "--checkpoint", finished_run, "--resume"], capsys)
    assert code == 2 and message in err and str(finished_run) in err and err.count("\n") == 1
    assert count_loss_calls == [] and finished_run.read_bytes() == damaged


def test_other_architectures_are_refused(tmp_path, finished_run, capsys, count_loss_calls):
    before = finished_run.read_bytes()
    code, err = cli(FLOW + ["--steps", "4", "--checkpoint", finished_run, "--resume", "--downsample", "nn"], capsys)
    assert code == 2 and "model.arguments.downsample: checkpoint 'squeeze', now 'nn'" in err
    code, err = cli(FLOW + ["--steps", "4", "--checkpoint", finished_run, "--resume", "--model", "glow"], capsys)
    assert code == 2 and "model.class: checkpoint 'ConvFlow', now 'GlowBaseline'" in err
    assert finished_run.read_bytes() == before

    base = CLASSIFY + ["--steps", "2", "--checkpoint", tmp_path / "cls.pt"]
    assert cli(base, capsys)[0] == 0
    calls_after_training = len(count_loss_calls)
    code, err = cli(base + ["--row", "1", "--steps", "4", "--resume"], capsys)
    assert code == 2 and "model.arguments.activation: checkpoint 'sneaky', now 'relu'" in err
    assert "model.arguments.padding: checkpoint 'circular', now 'zeros'" in err
    code, err = cli(base + ["--steps", "4", "--resume", "--spectral-weight", "1"], capsys)
    assert code == 2 and "run.loss.spectral_weight" in err
    code, err = cli(FLOW + ["--checkpoint", tmp_path / "cls.pt", "--resume"], capsys)  # a flow on a classifier
    assert code == 2 and "model.class: checkpoint 'ConvNet', now 'ConvFlow'" in err
    assert len(count_loss_calls) == calls_after_training


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_payload_is_never_run_on_resume(tmp_path, finished_run, capsys, count_loss_calls):
    marker = tmp_path / "payload-ran"
    state = torch.load(finished_run, weights_only=True)
    state["training"]["history"]["stopped"] = Payload(marker)
    state["digest"] = digest({k: v for k, v in state.items()})  # even with a "valid" digest field
    torch.save(state, finished_run)
    code, err = cli(FLOW + ["--steps", "4", "--checkpoint", finished_run, "--resume"], capsys)
    assert code == 2 and "refused without running them" in err and not marker.exists()
    with pytest.raises(iconv.train.CheckpointError):
        iconv.load(finished_run)
    assert not marker.exists() and count_loss_calls == []


# ----------------------------------------------------------------------------- unwritable outputs


def test_unwritable_outputs_are_refused_before_step_one(tmp_path, capsys, count_loss_calls):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    cases = [
        (["--out", a_file], "--out: ", "exists and is not a folder"),
        (["--out", a_file / "sub"], "--out: ", "cannot create the folder"),
        (["--checkpoint", a_file / "c.pt"], "checkpoint: ", "a_file exists and is not a folder"),
        (["--checkpoint", tmp_path], "checkpoint: ", "is a folder"),
        (["--out", tmp_path / "ok", "--checkpoint", a_file / "x" / "c.pt"], "checkpoint: ", "cannot create"),
    ]
    for flags, who, message in cases:
        code, err = cli(FLOW + flags, capsys)
        assert code == 2 and who in err and message in err, (flags, err)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.json").mkdir()  # an output file name taken by a folder
    code, err = cli(FLOW + ["--out", tmp_path / "out"], capsys)
    assert code == 2 and "metrics.json is a folder" in err
    assert count_loss_calls == [] and a_file.read_text() == "keep me"


def test_a_read_only_folder_is_refused_before_step_one(tmp_path, capsys, count_loss_calls):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user (root) writes into read-only folders; the file-based cases above cover it")
        for flags in (["--out", locked], ["--checkpoint", locked / "c.pt"], ["--out", locked / "new"]):
            code, err = cli(FLOW + flags, capsys)
            assert code == 2 and "cannot" in err, err
    finally:
        locked.chmod(0o700)
    assert count_loss_calls == []


# ----------------------------------------------------------------------------- bad flags

BAD_FLAGS = [
    ("--holdout", "-10", "must be an int >= 0, got -10"),
    ("--eval-size", "-9990", "must be an int >= 1, got -9990"),
    ("--epochs", "0", "must be a finite number in (0, inf), got 0"),
    ("--epochs", "-3", "must be a finite number in (0, inf), got -3"),
    ("--steps", "0", "must be an int >= 1, got 0"),
    ("--steps", "2.5", "must be an int >= 1, got '2.5'"),
    ("--samples", "-1", "must be an int >= 0, got -1"),
    ("--batch-size", "0", "must be an int >= 1, got 0"),
    ("--lr", "-1", "must be a finite number in (0, inf), got -1"),
    ("--lr", "nan", "must be a finite number in (0, inf), got nan"),
    ("--warmup", "-1", "must be an int >= 0, got -1"),
    ("--clip", "-5", "must be a finite number in [0, inf), got -5"),
    ("--eval-every", "-1", "must be an int >= 0, got -1"),
    ("--checkpoint-every", "-2", "must be an int >= 0, got -2"),
    ("--seed", "-1", "must be an int >= 0, got -1"),
    ("--time-limit", "0", "must be a finite number in (0, inf), got 0"),
    ("--threads", "0", "must be an int >= 1, got 0"),
    ("--train-images", "0", "must be an int >= 1, got 0"),
    ("--depth", "0", "must be an int >= 1, got 0"),
    ("--kernel-size", "4", "must be an int >= 1, odd, got 4"),
    ("--hidden", "0", "must be an int >= 1, got 0"),
    ("--log-every", "0", "must be an int >= 1, got 0"),
]
BAD_CLASSIFY_FLAGS = [
    ("--width", "7", "must be an int >= 2, even, got 7"),
    ("--momentum", "1", "must be a finite number in [0, 1), got 1"),
    ("--weight-decay", "-1", "must be a finite number in [0, inf), got -1"),
    ("--row", "7", "must be an int in [1, 6], got 7"),
    ("--spectral-floor", "1", "must be a finite number in (0, 1), got 1"),
]


@pytest.mark.parametrize("task, flag, value, message",
                         [("flow", *case) for case in BAD_FLAGS] + [("classify", *case) for case in BAD_CLASSIFY_FLAGS])
def test_every_bad_flag_is_refused_with_its_range(capsys, task, flag, value, message):
    with pytest.raises(SystemExit) as info:
        main([task, flag, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {flag}: {message}" in err, err


def test_settings_that_do_not_fit_the_data_are_refused_before_step_one(capsys, count_loss_calls):
    code, err = cli(FLOW + ["--holdout", "5000"], capsys)
    assert code == 2 and "holdout (--holdout) must be less than the 1437 training images of digits, got 5000" in err
    code, err = cli(FLOW + ["--batch-size", "2000"], capsys)
    assert code == 2 and "fewer than one batch" in err
    assert count_loss_calls == []


def test_a_huge_learning_rate_ends_with_the_divergence_error(tmp_path, capsys):
    code, err = cli(FLOW + ["--lr", "1e6", "--warmup", "0", "--clip", "0", "--steps", "20", "--checkpoint",
                            tmp_path / "d.pt"], capsys)
    assert code == 2 and err.startswith("error: training diverged at step"), err
    assert "non-finite" in err or "the loss is" in err
