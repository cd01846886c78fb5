"""Each training-config field is honoured end to end over gRPC, and an invalid one is
INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import grpc
import pytest
from transfer_client import (
    CandidateResult,
    InvalidArgumentError,
    JobCompleted,
    JobProgress,
    JobQueued,
    JobStarted,
    JobWarning,
    TrainingConfig,
    TransferClient,
)
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc

from tests.conftest import RunningServer


def events_of(
    client: TransferClient, examples: list[tuple[bytes, str]], config: TrainingConfig
) -> list[object]:
    return list(client.fine_tune("efficientnet_lite0", examples, head_name="cfg", config=config))


def test_plan_reflects_the_config(
    client: TransferClient, fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]
) -> None:
    train = fashion_small[0][:24]
    config = TrainingConfig(
        epochs=3,
        batch_size=8,
        learning_rate=0.01,
        trainable_blocks=2,
        unfreeze_every_epochs=1,
        layer_lr_decay=0.3,
        label_smoothing=0.1,
        head_type="mlp",
        hidden_dim=64,
        class_balance="none",
        early_stopping_patience=0,
        validation_fraction=0.25,
        seed=9,
    )
    events = events_of(client, train, config)
    assert isinstance(events[0], JobQueued)
    started = events[1]
    assert isinstance(started, JobStarted)
    plan = started.plan
    assert (plan.epochs, plan.batch_size, plan.trainable_blocks) == (3, 8, 2)
    assert plan.learning_rate == pytest.approx(0.01)
    assert plan.head_type == "mlp" and plan.unfreeze_every_epochs == 1
    assert plan.layer_lr_decay == pytest.approx(0.3) and plan.label_smoothing == pytest.approx(0.1)
    assert started.class_balance == "none"
    held_out = sum(min(round(n * 0.25), n - 1) for n in started.class_counts.values())
    assert started.validation_examples == held_out
    assert plan.steps_per_epoch == -(-started.train_examples // 8)
    epoch_ends = [e.progress for e in events if isinstance(e, JobProgress) and e.progress.epoch_end]
    assert len(epoch_ends) == 3  # patience 0: no early stop
    completed = events[-1]
    assert isinstance(completed, JobCompleted)
    head = client.get_head(completed.head_id)
    assert head.head_type == "mlp" and head.trainable_blocks == 2
    assert head.config.hidden_dim == 64 and head.config.seed == 9


def test_same_seed_same_head(
    client: TransferClient, fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]
) -> None:
    train, test = fashion_small
    config = TrainingConfig(epochs=5, seed=21)
    first = client.train("efficientnet_lite0", train, head_name="seeded", config=config)
    second = client.train("efficientnet_lite0", train, head_name="seeded", config=config)
    images = [x for x, _ in test[:10]]
    a = client.predict(first.head_id, images)
    b = client.predict(second.head_id, images)
    assert [p.label for p in a] == [p.label for p in b]
    assert [p.score for p in a] == pytest.approx([p.score for p in b], abs=1e-5)


def test_prototype_head_over_grpc(
    client: TransferClient, fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]
) -> None:
    train, test = fashion_small
    five_shot = []
    for label in sorted({y for _, y in train}):
        five_shot += [(x, y) for x, y in train if y == label][:5]
    events = events_of(client, five_shot, TrainingConfig(head_type="prototype"))
    completed = events[-1]
    assert isinstance(completed, JobCompleted)
    assert completed.metrics.epochs_run == 1
    assert any(isinstance(e, JobWarning) and e.code == "small_validation_set" for e in events)
    predictions = client.predict(completed.head_id, [x for x, _ in test])
    accuracy = sum(p.label == y for p, (_, y) in zip(predictions, test, strict=True)) / len(test)
    assert accuracy >= 0.5  # 4 classes, 4 examples each after the split: chance is 0.25


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (pb.TrainingConfig(head_type="forest"), "config.head_type"),
        (pb.TrainingConfig(head_type="prototype", trainable_blocks=1), "config.head_type"),
        (pb.TrainingConfig(dropout=1.5), "config.dropout"),
        (pb.TrainingConfig(label_smoothing=-0.1), "config.label_smoothing"),
        (pb.TrainingConfig(weight_decay=float("nan")), "config.weight_decay"),
        (pb.TrainingConfig(layer_lr_decay=2.0), "config.layer_lr_decay"),
        (pb.TrainingConfig(unfreeze_every_epochs=2), "config.unfreeze_every_epochs"),
        (pb.TrainingConfig(class_balance="magic"), "config.class_balance"),
        (pb.TrainingConfig(prototype_temperature=-1.0), "config.prototype_temperature"),
        (pb.TrainingConfig(max_grad_norm=-1.0), "config.max_grad_norm"),
        (pb.TrainingConfig(hidden_dim=100_000), "config.hidden_dim"),
        (pb.TrainingConfig(epochs=100_000), "config.epochs"),
        (pb.TrainingConfig(batch_size=100_000), "config.batch_size"),
        (pb.TrainingConfig(learning_rate=-1.0), "config.learning_rate"),
        (pb.TrainingConfig(trainable_blocks=10), "config.trainable_blocks"),
        (pb.TrainingConfig(solver="sgd"), "config.solver"),
        (pb.TrainingConfig(solver="lbfgs_cv", trainable_blocks=1), "config.solver"),
        (pb.TrainingConfig(solver="lbfgs_cv", head_type="mlp"), "config.solver"),
        (pb.TrainingConfig(solver="lbfgs_cv", epochs=5), "config.epochs"),
        (
            pb.TrainingConfig(solver="lbfgs_cv", validation_fraction=0.3),
            "config.validation_fraction",
        ),
        (pb.TrainingConfig(cv_folds=1), "config.cv_folds"),
        (pb.TrainingConfig(cv_folds=3, solver="adamw"), "config.cv_folds"),
    ],
)
def test_invalid_config_names_the_field(
    server: RunningServer,
    fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]],
    config: pb.TrainingConfig,
    field: str,
) -> None:
    examples = [pb.Example(image=x, label=y) for x, y in fashion_small[0][:8]]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            for _ in stub.FineTune(
                pb.FineTuneRequest(backbone="efficientnet_lite0", examples=examples, config=config),
                timeout=30,
            ):
                pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert field in (raised.value.details() or "")  # type: ignore[attr-defined]


def test_sdk_raises_invalid_argument(
    client: TransferClient, fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]
) -> None:
    with pytest.raises(InvalidArgumentError, match=r"config\.head_type"):
        client.train(
            "efficientnet_lite0", fashion_small[0][:8], config=TrainingConfig(head_type="forest")
        )


def test_caller_validation_set_is_used_as_given(
    client: TransferClient, fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]
) -> None:
    train, test = fashion_small
    validation = test[:12]
    events = list(
        client.fine_tune(
            "efficientnet_lite0",
            train,
            head_name="given-val",
            config=TrainingConfig(epochs=3),
            validation_examples=validation,
        )
    )
    assert isinstance(events[0], JobQueued)
    started = events[1]
    assert isinstance(started, JobStarted)
    assert started.train_examples == len(train)
    assert started.validation_examples == len(validation)
    completed = events[-1]
    assert isinstance(completed, JobCompleted)
    metrics = completed.metrics
    assert (
        metrics.majority_baseline_accuracy is not None and metrics.train_validation_gap is not None
    )
    # The validation accuracy is measured on exactly the given examples.
    predictions = client.predict(completed.head_id, [x for x, _ in validation])
    kept_epoch_accuracy = metrics.validation_accuracy
    assert kept_epoch_accuracy is not None
    measured = sum(p.label == y for p, (_, y) in zip(predictions, validation, strict=True))
    assert measured / len(validation) == pytest.approx(kept_epoch_accuracy, abs=1e-6)


def test_validation_label_outside_the_training_classes(
    client: TransferClient, fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]
) -> None:
    train, test = fashion_small
    with pytest.raises(InvalidArgumentError, match=r"validation_examples\[0\]\.label"):
        client.train("efficientnet_lite0", train, validation_examples=[(test[0][0], "not-a-class")])


def test_backbone_auto_selection(
    client: TransferClient, fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]
) -> None:
    train, _ = fashion_small
    candidates = ["efficientnet_lite0", "efficientnet_lite2"]
    events = list(
        client.fine_tune(
            "auto",
            train,
            head_name="auto-pick",
            config=TrainingConfig(epochs=3),
            candidate_backbones=candidates,
        )
    )
    results = [e for e in events if isinstance(e, CandidateResult)]
    assert [r.backbone for r in results if not r.selected] == candidates
    [winner] = [r for r in results if r.selected]
    assert all(r.gflops > 0 and r.latency_ms > 0 for r in results)
    lite0, lite2 = results[0], results[1]
    assert lite2.gflops > lite0.gflops  # the larger input and model cost more
    assert winner.accuracy_per_gflop == pytest.approx(winner.validation_accuracy / winner.gflops)
    started = next(e for e in events if isinstance(e, JobStarted))
    assert started.backbone == winner.backbone
    completed = events[-1]
    assert isinstance(completed, JobCompleted)
    assert client.get_head(completed.head_id).backbone == winner.backbone
    assert client.get_job(completed.job_id).backbone == winner.backbone


def test_auto_selection_refuses_bad_candidates(
    client: TransferClient, fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]
) -> None:
    train = fashion_small[0][:8]
    with pytest.raises(InvalidArgumentError, match=r"candidate_backbones\[1\]"):
        client.train("auto", train, candidate_backbones=["efficientnet_lite0", "minilm_l6"])
    with pytest.raises(InvalidArgumentError, match="candidate_backbones"):
        client.train("efficientnet_lite0", train, candidate_backbones=["efficientnet_lite2"])


def test_default_linear_probe_is_cross_validated_lbfgs(
    client: TransferClient, fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]
) -> None:
    """No config: every example trains the final head, C is chosen by k-fold, each C scored is
    an event, and the completed metrics name the C with the lowest held-out loss."""
    train, test = fashion_small
    events = events_of(client, train, TrainingConfig(cv_folds=4))
    assert isinstance(events[0], JobQueued)
    started = events[1]
    assert isinstance(started, JobStarted)
    assert started.plan.solver == "lbfgs_cv" and started.plan.cv_folds == 4
    assert started.validation_examples == 0 and started.train_examples == len(train)
    scored = [
        e.progress
        for e in events
        if isinstance(e, JobProgress) and e.progress.phase == "cross_validation"
    ]
    assert len(scored) >= 3
    completed = events[-1]
    assert isinstance(completed, JobCompleted)
    best = min(scored, key=lambda p: (p.validation_loss or 0.0, p.regularization_c or 0.0))
    assert completed.metrics.regularization_c == pytest.approx(best.regularization_c)
    assert completed.metrics.validation_accuracy == pytest.approx(best.validation_accuracy)
    predictions = client.predict(completed.head_id, [x for x, _ in test])
    accuracy = sum(p.label == y for p, (_, y) in zip(predictions, test, strict=True)) / len(test)
    assert accuracy >= 0.5


def test_gradient_options_select_adamw(
    client: TransferClient, fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]
) -> None:
    events = events_of(client, fashion_small[0][:24], TrainingConfig(epochs=2))
    assert isinstance(events[0], JobQueued)
    started = events[1]
    assert isinstance(started, JobStarted)
    assert started.plan.solver == "adamw" and started.plan.epochs == 2
    completed = events[-1]
    assert isinstance(completed, JobCompleted) and completed.metrics.regularization_c is None
