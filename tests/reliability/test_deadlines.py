"""Deadlines and cancellation: a Predict whose deadline passes while it waits returns
DEADLINE_EXCEEDED and its queued work is dropped, never computed (seen in the
`transfer_predict_inputs_total` counter, which counts inputs the trunk ran on); CancelJob
stops training within one optimiser step and the job reads CANCELLED."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc

from tests.conftest import RunningServer
from tests.datasets import fashion_mnist
from tests.reliability.conftest import assert_serving

DROPPED = 7  # inputs of the request whose deadline passes while it waits


def _computed(server: RunningServer, backbone: str) -> float:
    value = server.app.metrics.registry.get_sample_value(
        "transfer_predict_inputs_total", {"backbone": backbone}
    )
    return value or 0.0


def _steps(server: RunningServer) -> float:
    value = server.app.metrics.registry.get_sample_value(
        "transfer_training_step_duration_seconds_count"
    )
    return value or 0.0


def _late_request_is_dropped(
    server: RunningServer, stub: pb_grpc.TransferServiceStub, late: pb.PredictRequest,
    backbone: str, ahead: pb.PredictRequest | None = None,
) -> tuple[grpc.StatusCode, float]:  # fmt: skip
    """Holds the server's compute thread busy (a task waiting on an event, in its own compute
    pool: deterministic, where a big batch would depend on the machine's speed), optionally
    puts `ahead` in front (its batcher then waits on it, so `late` waits in that batcher's
    queue), sends `late` with a short deadline, then frees the thread. Returns the late call's
    code and how many of its inputs were computed."""
    release = threading.Event()
    busy = server.app.pools[1].submit(release.wait, 60)
    before = _computed(server, backbone)
    ahead_call = stub.Predict.future(ahead, timeout=60) if ahead is not None else None
    time.sleep(0.3)  # `ahead` is decoded and waiting for the compute thread
    try:
        stub.Predict(late, timeout=0.3)
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()  # type: ignore[attr-defined]
    finally:
        # The server's copy of the deadline started when the call reached it, a moment
        # after the client's: let it pass there too before the compute thread is freed.
        time.sleep(0.5)
        release.set()
        busy.result(timeout=60)
    if ahead_call is not None:
        ahead_call.result(timeout=60)
    time.sleep(1.0)  # anything still queued has run (or been dropped) by now
    own = len(ahead.inputs) if ahead is not None else 0
    return code, _computed(server, backbone) - before - own


def test_a_predict_past_its_deadline_is_dropped_from_the_queue(
    server: RunningServer, stub: pb_grpc.TransferServiceStub, image_head: str
) -> None:
    image = fashion_mnist(1, split="test", classes=10, seed=71)[0][0]
    ahead = pb.PredictRequest(head_id=image_head, inputs=[pb.Input(image=image)])
    late = pb.PredictRequest(head_id=image_head, inputs=[pb.Input(image=image)] * DROPPED)
    assert_serving(server.address, stub, image_head)
    code, computed = _late_request_is_dropped(server, stub, late, "efficientnet_lite0", ahead)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert computed == 0, f"{computed:.0f} inputs of the expired request were computed"
    assert_serving(server.address, stub, image_head)


def test_a_predict_past_its_deadline_behind_another_backbone_is_dropped(
    server: RunningServer, stub: pb_grpc.TransferServiceStub, text_head: str, image_head: str
) -> None:
    """The compute thread is busy with another backbone's work while a text request's
    deadline passes; once it is free, the expired batch must be dropped, not computed."""
    late = pb.PredictRequest(head_id=text_head, inputs=[pb.Input(text="late news")] * DROPPED)
    assert_serving(server.address, stub, image_head)
    code, computed = _late_request_is_dropped(server, stub, late, "minilm_l6")
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_serving(server.address, stub, image_head)
    assert computed == 0, f"{computed:.0f} inputs of the expired request were computed"


def _long_job(stub: pb_grpc.TransferServiceStub, name: str) -> Iterator[pb.FineTuneEvent]:
    examples = [pb.Example(image=x, label=y) for x, y in fashion_mnist(6, classes=2, seed=72)]
    config = pb.TrainingConfig(
        epochs=1000, batch_size=1, early_stopping_patience=0, progress_every_steps=1
    )
    request = pb.FineTuneRequest(
        backbone="efficientnet_lite0", head_name=name, examples=examples, config=config
    )
    return iter(stub.FineTune(request, timeout=120))


def test_cancel_job_stops_training_within_one_step(
    server: RunningServer, stub: pb_grpc.TransferServiceStub, image_head: str
) -> None:
    events = _long_job(stub, "cancel-me")
    job_id = ""
    for event in events:
        job_id = event.job_id
        progress = event.progress if event.WhichOneof("event") == "progress" else None
        if progress is not None and progress.phase == "training" and progress.step >= 10:
            break
    stub.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=30)
    steps_at_cancel = _steps(server)  # the cancel flag is set once CancelJob returned
    cancelled_at = time.monotonic()
    rest = list(events)
    stopped_after = time.monotonic() - cancelled_at
    assert rest and rest[-1].WhichOneof("event") == "cancelled", rest[-1:]
    assert _steps(server) - steps_at_cancel <= 1, "training went on after CancelJob"
    assert stopped_after < 10
    job = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=30)
    assert job.state == pb.JOB_STATE_CANCELLED
    assert not job.head_id
    assert_serving(server.address, stub, image_head)


def test_cancel_job_during_feature_extraction(
    server: RunningServer, stub: pb_grpc.TransferServiceStub, image_head: str
) -> None:
    events = _long_job(stub, "cancel-early")
    assert next(events).WhichOneof("event") == "queued"
    started = next(events)
    assert started.WhichOneof("event") == "started"
    stub.CancelJob(pb.CancelJobRequest(job_id=started.job_id), timeout=30)
    steps_at_cancel = _steps(server)
    rest = list(events)
    assert rest and rest[-1].WhichOneof("event") == "cancelled", rest[-1:]
    assert _steps(server) - steps_at_cancel <= 1, "training went on after CancelJob"
    job = stub.GetJob(pb.GetJobRequest(job_id=started.job_id), timeout=30)
    assert job.state == pb.JOB_STATE_CANCELLED
