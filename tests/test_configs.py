"""iconv.configs: one definition of every experiment and size, typed and checked."""
import dataclasses
import json

import pytest

from iconv import configs
from iconv.configs import ClassifierModel, Data, Evaluation, Experiment, FlowModel, Training


def test_the_flow_sizes_are_chapter_7s():
    ci = configs.flow("ci")
    assert (ci.data.name, ci.data.train_images, ci.data.test_images) == ("fashion-mnist", 10_000, 1_000)
    assert (ci.training.steps, ci.training.lr, ci.training.warmup, ci.model.depth) == (150, 3e-3, 30, 4)
    gpu = configs.flow("gpu")
    assert (gpu.training.epochs, gpu.training.lr, gpu.model.depth, gpu.data.train_images) == (10, 3e-3, 8, None)
    paper = configs.flow("paper")
    assert (paper.data.name, paper.data.holdout, paper.training.batch_size, paper.training.lr) == \
        ("cifar10", 5_000, 32, 3e-4)
    cpu = configs.flow("cpu", "glow")
    assert cpu.model.kind == "glow" and cpu.training.schedule == "constant" and cpu.training.clock == "process"
    assert configs.flow_models("ci") == ("convflow",) and configs.flow_models("gpu") == ("convflow", "glow")


def test_the_classifier_sizes_are_chapter_9s():
    ci = configs.classifier("ci")
    assert (ci.data.name, ci.model.width, ci.training.steps, ci.training.batch_size) == ("fashion-mnist", 8, 60, 32)
    assert (ci.training.optimizer, ci.training.lr, ci.training.weight_decay) == ("sgd", 0.1, 5e-4)
    assert ci.model.switches == configs.TABLE1[0].switches
    row5 = configs.classifier("gpu", row=5, penalty=True)
    assert row5.model.switches == {"padding": "circular", "activation": "sneaky", "downsample": "avg"}
    assert (row5.training.spectral_weight, row5.training.spectral_floor) == (1.0, 0.2)
    assert row5.training.augment and row5.training.epochs == 15
    with pytest.raises(ValueError, match=r"row must be an int in 0..5.*got 6"):
        configs.classifier("ci", row=6)


@pytest.mark.parametrize("size", configs.FLOW_SIZES)
def test_every_experiment_round_trips_through_plain_data(size):
    for experiment in (configs.flow(size), configs.flow(size, "glow"), configs.classifier(size, 3)):
        d = experiment.to_dict()
        assert json.loads(json.dumps(d)) == d  # plain data: what a checkpoint can store
        assert Experiment.from_dict(d) == experiment
        assert experiment.size == size


def test_sizes_are_named_and_bad_names_refused():
    assert set(configs.SIZES) <= set(configs.FLOW_SIZES) and set(configs.SIZES) <= set(configs.CLASSIFIER_SIZES)
    with pytest.raises(ValueError, match=r"size must be one of 'ci', 'cpu', 'gpu', 'paper' for the flow, got 'big'"):
        configs.flow("big")
    with pytest.raises(ValueError, match="FlowModel.kind must be one of 'convflow', 'glow', got 'realnvp'"):
        configs.flow("ci", "realnvp")


@pytest.mark.parametrize("make, message", [
    (lambda: Data(holdout=-10), "Data.holdout must be an int >= 0, got -10"),
    (lambda: Data(test_images=-9990), "Data.test_images must be an int >= 1 or None, got -9990"),
    (lambda: Data(name="mnist"), "Data.name must be one of"),
    (lambda: Training(steps=0), "Training.steps must be an int >= 1 or None, got 0"),
    (lambda: Training(steps=None, epochs=-3), "Training.epochs must be a finite number > 0 or None, got -3"),
    (lambda: Training(steps=None, epochs=0), "Training.epochs must be a finite number > 0 or None, got 0"),
    (lambda: Training(steps=None), "Training.steps must be given exactly when epochs is None"),
    (lambda: Training(lr=float("inf")), "Training.lr must be a finite number > 0, got inf"),
    (lambda: Training(momentum=1.0), r"Training.momentum must be a number in \[0, 1\), got 1.0"),
    (lambda: Training(clip=0), "Training.clip must be a finite number > 0 or None, got 0"),
    (lambda: Training(batch_size=True), "Training.batch_size must be an int >= 1, got True"),
    (lambda: Evaluation(samples=-1), "Evaluation.samples must be an int >= 0, got -1"),
    (lambda: FlowModel(kernel_size=4), "FlowModel.kernel_size must be odd, got 4"),
    (lambda: ClassifierModel(width=7), "ClassifierModel.width must be even, got 7"),
    (lambda: Experiment("flow", "ci", model=ClassifierModel()), "Experiment.model must be a FlowModel"),
])
def test_every_field_is_checked(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_replace_and_total_steps():
    e = configs.flow("ci").replace(training={"steps": 20}, seed=3, model={"depth": 2})
    assert (e.training.steps, e.training.lr, e.seed, e.model.depth) == (20, 3e-3, 3, 2)
    assert configs.flow("ci").training.steps == 150  # the named configuration is unchanged
    assert Training(steps=None, epochs=2.5, batch_size=64).total_steps(1000) == round(2.5 * 15)
    assert Training(steps=None, epochs=0.001, batch_size=64).total_steps(1000) == 1
    assert Training(steps=7).total_steps(10) == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        configs.flow("ci").training.steps = 3


def test_table1_holds_the_papers_rows():
    assert [row.paper_accuracy for row in configs.TABLE1] == [94.6, 94.6, 93.0, 92.0, 92.5, 92.6]
    assert [row.invertible for row in configs.TABLE1] == [False, False, False, True, True, True]
    for row in configs.TABLE1[1:]:
        base = configs.TABLE1[row.compared_with]
        assert row.paper_change == pytest.approx(row.paper_accuracy - base.paper_accuracy)
