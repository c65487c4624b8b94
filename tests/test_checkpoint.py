"""Self-describing checkpoints: iconv.load, the digest, safe loading, one-line errors naming the file."""
import json
import pickle
from pathlib import Path

import pytest
import torch

import iconv
from iconv import ConvFlow, ConvNet, GlowBaseline
from iconv.models import MODELS
from iconv.train import CheckpointError, read_checkpoint, write_checkpoint
from iconv.train.checkpoint import FORMAT, VERSION, digest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "book" / "results" / "flow").glob("*.pt"))
#: Every model the book ships (the flow study's and Table 1's too).
ALL_SHIPPED = sorted((REPO / "book" / "results").rglob("*.pt"))


def models():
    torch.manual_seed(0)
    return [ConvFlow((1, 4, 4), depth=1), GlowBaseline((1, 4, 4), depth=1, hidden=3),
            ConvNet(1, 10, 4, padding="circular", activation="sneaky", downsample="avg")]


def randomize(model):
    """Move every parameter and buffer off its initial value, so that a load that kept defaults fails."""
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.add_(0.05 * torch.rand_like(t))
    return model


def test_models_registry_covers_every_model_class():
    assert set(MODELS) == {"ConvFlow", "GlowBaseline", "PaperFlow", "ConvNet"}


@pytest.mark.parametrize("index", range(3))
def test_load_rebuilds_the_model_exactly(tmp_path, index):
    model = randomize(models()[index]).double().eval()
    path = tmp_path / "m.pt"
    write_checkpoint(path, model, step=7, seed=2, data={"name": "x", "split": "train"})
    loaded = iconv.load(path)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.arguments == model.arguments
    x = torch.rand(3, *((1, 4, 4) if index < 2 else (1, 8, 8)), dtype=torch.float64) * 0.9 + 0.05
    with torch.no_grad():
        if index < 2:
            assert torch.equal(loaded(x)[0], model(x)[0]) and torch.equal(loaded(x)[1], model(x)[1])
        else:
            assert torch.equal(loaded(x), model(x))
    state = read_checkpoint(path)
    assert (state["format"], state["version"], state["step"], state["seed"]) == (FORMAT, VERSION, 7, 2)
    assert state["model"]["class"] == type(model).__name__


def test_digest_covers_every_tensor_byte_and_the_metadata():
    model = models()[0]
    state = {"model": {"class": "ConvFlow", "arguments": model.arguments}, "state_dict": model.state_dict(),
             "step": 3, "betas": (0.9, 0.999)}
    d = digest(state)
    assert d.startswith("sha256:") and len(d) == 7 + 64
    assert digest(dict(state, digest="ignored")) == d  # the digest field itself is left out
    for name, tensor in state["state_dict"].items():
        flat = tensor.view(-1)
        i = int(torch.randint(flat.numel(), ()))
        changed = {k: v.clone() for k, v in state["state_dict"].items()}
        bits = changed[name].view(-1).view(torch.int32)
        bits[i] ^= 1  # the lowest mantissa bit of one number
        assert digest(dict(state, state_dict=changed)) != d, name
    assert digest(dict(state, step=4)) != d
    assert digest(dict(state, betas=[0.9, 0.999])) != d  # the structure counts too
    assert digest({"a": 1, "b": 2}) == digest({"b": 2, "a": 1})  # but not the order of the keys


def test_digest_survives_a_save_and_load(tmp_path):
    state = write_checkpoint(tmp_path / "a.pt", models()[2], step=1)
    again = torch.load(tmp_path / "a.pt", weights_only=True)
    assert again["digest"] == state["digest"] == digest(again)


def one_line_error(path, match):
    with pytest.raises(CheckpointError) as info:
        iconv.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    assert match in message, message
    return message


def test_corrupted_truncated_and_foreign_files_get_one_line_errors(tmp_path):
    good = tmp_path / "good.pt"
    write_checkpoint(good, randomize(models()[0]), step=1)
    raw = good.read_bytes()

    flipped = tmp_path / "flipped.pt"
    blob = bytearray(raw)
    weights = max(torch.load(good, weights_only=True)["state_dict"].values(), key=lambda t: t.numel())
    where = bytes(blob).find(weights.numpy().tobytes()[:16])  # a weight's bytes inside the zip
    assert where > 0
    blob[where + 5] ^= 0x40
    flipped.write_bytes(bytes(blob))
    one_line_error(flipped, "corrupted")

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(raw[: len(raw) // 2])
    one_line_error(truncated, "not a readable checkpoint")

    text = tmp_path / "notes.pt"
    text.write_text("these are my notes")
    one_line_error(text, "not a readable checkpoint")

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    one_line_error(foreign, "not an iconv checkpoint")

    old = tmp_path / "old.pt"
    torch.save({"class": "ConvFlow", "shape": [1, 4, 4], "architecture": {}, "state_dict": {}}, old)
    one_line_error(old, "make_flow_results.py --convert")

    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        iconv.load(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="not a regular file"):
        iconv.load(tmp_path)


def forge(path, **changes):
    """A checkpoint with some fields replaced and a matching digest (a well-formed but wrong file)."""
    state = torch.load(path, weights_only=True)
    state.update(changes)
    state["digest"] = digest(state)
    torch.save(state, path)


def test_unknown_classes_and_mismatched_weights_are_refused(tmp_path):
    path = tmp_path / "a.pt"
    write_checkpoint(path, models()[0])
    forge(path, model={"class": "Trojan", "arguments": {}})
    one_line_error(path, "class 'Trojan'")
    write_checkpoint(path, models()[0])
    forge(path, model={"class": "ConvFlow", "arguments": dict(models()[0].arguments, downsample="nn", depth=2)})
    one_line_error(path, "do not fit")
    write_checkpoint(path, models()[0])
    forge(path, version=1)
    one_line_error(path, "version 1")
    write_checkpoint(path, torch.nn.Linear(2, 2))
    one_line_error(path, "class 'Linear'")


class Payload:
    """Unpickling this object creates a marker file: code running from a checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_payload_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    write_checkpoint(path, models()[0])
    state = torch.load(path, weights_only=True)
    state["extra"] = Payload(marker)
    torch.save(state, path)
    with open(tmp_path / "check.pkl", "wb") as f:  # the payload works when unpickled unsafely
        pickle.dump(Payload(tmp_path / "control"), f)
    pickle.loads((tmp_path / "check.pkl").read_bytes())
    assert (tmp_path / "control").exists()
    message = one_line_error(path, "refused without running them")
    assert not marker.exists(), message


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_checkpoint_loads(path):
    model = iconv.load(path)
    state = read_checkpoint(path)
    assert not model.training and state["experiment"]["task"] == "flow" and state["training"] is None
    assert state["data"] == {"name": "fashion-mnist", "split": "train"}
    offline = json.loads((path.parent / "fashion_mnist_cpu.json").read_text())
    entry = [m for m in offline["models"].values() if m["model"] == state["model"]["class"]][0]
    assert state["step"] == entry["steps"] and model.num_parameters() == entry["parameters"]
    x = (torch.arange(2 * 784, dtype=torch.float64).reshape(2, 1, 28, 28) % 256 + 0.5) / 256
    with torch.no_grad():
        bpd = -model.double().log_prob(x) / (784 * torch.log(torch.tensor(2.0, dtype=torch.float64))) + 8
    assert torch.isfinite(bpd).all()


@pytest.mark.parametrize("path", ALL_SHIPPED, ids=[f"{p.parent.parent.name}/{p.name}" for p in ALL_SHIPPED])
def test_every_shipped_model_is_self_describing(path):
    """iconv.load rebuilds every shipped model in eval mode; each records its data set and step and
    carries no optimizer state."""
    model = iconv.load(path)
    state = read_checkpoint(path)
    assert not model.training and state["training"] is None
    assert state["data"]["name"] in ("fashion-mnist", "digits", "cifar10") and state["step"] >= 1
    assert type(model).__name__ == state["model"]["class"]


def test_shipped_studies_list_their_models():
    """The studies' JSON name exactly the model files shipped beside them."""
    results = REPO / "book" / "results"
    study = json.loads((results / "flow_study" / "study.json").read_text())
    assert sorted(results / "flow_study" / r["best_model"] for r in study["runs"]) == \
        sorted((results / "flow_study" / "models").glob("*.pt"))
    table1 = json.loads((results / "classifier" / "table1_cpu.json").read_text())
    assert sorted(results / "classifier" / p for p in table1["models"].values()) == \
        sorted((results / "classifier" / "models").glob("*.pt"))
    assert sum(p.stat().st_size for p in ALL_SHIPPED) < 20e6


def test_shipped_convflow_matches_its_recorded_test_bits_per_dim():
    """The converted ConvFlow's bits/dim on the first 1,000 test images is within 0.1 of the recorded
    all-images value; the conversion's exact check against the old code is in book/results/flow/README.md."""
    data = pytest.importorskip("iconv.data")
    try:
        test = data.load_fashion_mnist("test")[0][:1000]
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    from iconv.evaluation import evaluate_bits_per_dim

    path = REPO / "book" / "results" / "flow" / "convflow_fashion_mnist.pt"
    recorded = read_checkpoint(path)["results"]["test_bits_per_dim"]
    assert abs(evaluate_bits_per_dim(iconv.load(path), test, seed=0) - recorded) < 0.1
