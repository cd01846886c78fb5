"""transfer.v1.TransferService over gRPC: protobuf in, domain call, protobuf out.

The caller's tenant comes from request_scope, where the request interceptor put it, and goes
to every domain call as a plain string."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc

from transfer_service.domain import LabeledExample
from transfer_service.edge import convert, convert_jobs
from transfer_service.edge.status_codes import status_code_for
from transfer_service.edge.wire import MalformedRequest
from transfer_service.errors import InvalidArgumentError, ServiceError
from transfer_service.head_catalog import HeadCatalog
from transfer_service.head_evaluation import HeadEvaluation
from transfer_service.head_operations import HeadOperations
from transfer_service.metrics import Metrics
from transfer_service.operations import TransferOperations
from transfer_service.request_scope import current_tenant

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")
Context = grpc.aio.ServicerContext[Any, Any]


# Status details travel in HTTP/2 trailers; past grpc's metadata limit they are dropped
# whole. Messages lead with the field name, so cutting the tail keeps what matters.
MAX_STATUS_DETAILS = 1024


async def _abort(context: Context, error: BaseException, method: str) -> None:
    if isinstance(error, ServiceError):
        message = error.message
        if len(message) > MAX_STATUS_DETAILS:
            message = message[: MAX_STATUS_DETAILS - 3] + "..."
        code = status_code_for(error)
        if not isinstance(error, InvalidArgumentError) or not error.field:
            await context.abort(code, message)
        assert isinstance(error, InvalidArgumentError) and error.field
        # The field also goes as a google.rpc.BadRequest in a google.rpc.Status, in the
        # `grpc-status-details-bin` trailer (gRPC's rich error model), so that a client can
        # name its own input behind "examples[17].image" without parsing the message.
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=error.field_description[:MAX_STATUS_DETAILS]
        )
        details = any_pb2.Any()
        details.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        status = rpc_status.to_status(
            status_pb2.Status(code=code.value[0], message=message, details=[details])
        )
        await context.abort(status.code, status.details, status.trailing_metadata)
    log.error("internal error in %s", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has details")


def _reject_malformed(request: object) -> None:
    """Request bytes that did not parse (see wire.py) are INVALID_ARGUMENT."""
    if isinstance(request, MalformedRequest):
        raise request.error()


def unary(
    method: Callable[[Any, Request, Context], Awaitable[Response]],
) -> Callable[[Any, Request, Context], Awaitable[Response]]:
    """Maps domain errors to statuses and records the call in metrics (a failed call before
    its status goes out, so a client that sees the status also sees it counted)."""

    @functools.wraps(method)
    async def wrapper(self: TransferServicer, request: Request, context: Context) -> Response:
        started = time.perf_counter()
        try:
            _reject_malformed(request)
            response = await method(self, request, context)
        except Exception as error:
            self._record(method.__name__, status_code_for(error).name, started)
            await _abort(context, error, method.__name__)
            raise  # unreachable: abort raises
        self._record(method.__name__, "OK", started)
        return response

    return wrapper


def streaming(
    method: Callable[[Any, Request, Context], AsyncIterator[Response]],
) -> Callable[[Any, Request, Context], AsyncIterator[Response]]:
    @functools.wraps(method)
    async def wrapper(
        self: TransferServicer, request: Request, context: Context
    ) -> AsyncIterator[Response]:
        started = time.perf_counter()
        failed = False
        try:
            _reject_malformed(request)
            async for response in method(self, request, context):
                yield response
        except Exception as error:
            failed = True
            self._record(method.__name__, status_code_for(error).name, started)
            await _abort(context, error, method.__name__)
        finally:
            if not failed:  # ended, or the client went away
                self._record(method.__name__, "OK", started)

    return wrapper


class TransferServicer(pb_grpc.TransferServiceServicer):
    def __init__(
        self,
        operations: TransferOperations,
        metrics: Metrics,
        *,
        evaluations: HeadEvaluation,
        heads: HeadOperations,
        catalog: HeadCatalog,
    ) -> None:
        self._ops = operations
        self._catalog = catalog
        self._metrics = metrics
        self._evaluations = evaluations
        self._heads = heads

    def _record(self, method: str, code: str, started: float) -> None:
        self._metrics.rpc_requests.labels(method=method, code=code).inc()
        self._metrics.rpc_duration.labels(method=method).observe(time.perf_counter() - started)

    @unary
    async def ListBackbones(
        self, request: pb.ListBackbonesRequest, context: Context
    ) -> pb.ListBackbonesResponse:
        statuses = await self._ops.list_backbones()
        return pb.ListBackbonesResponse(backbones=[convert.backbone(s) for s in statuses])

    @streaming
    async def FineTune(
        self, request: pb.FineTuneRequest, context: Context
    ) -> AsyncIterator[pb.FineTuneEvent]:
        job = await self._ops.start_fine_tune(current_tenant(), convert.fine_tune_call(request))
        async for event in self._ops.watch_job(current_tenant(), job.job_id):
            yield convert_jobs.event(event)

    @streaming
    async def WatchJob(
        self, request: pb.WatchJobRequest, context: Context
    ) -> AsyncIterator[pb.FineTuneEvent]:
        events = self._ops.watch_job(current_tenant(), request.job_id, request.after_sequence)
        async for event in events:
            yield convert_jobs.event(event)

    @unary
    async def Predict(self, request: pb.PredictRequest, context: Context) -> pb.PredictResponse:
        if request.head_ids:  # several heads, one backbone pass
            answers = await self._heads.predict_heads(
                current_tenant(),
                request.head_id,
                request.head_ids,
                convert.model_inputs(request.inputs),
                request.top_k,
                request.return_embedding,
            )
            return convert.multi_head_response(answers)
        head, results = await self._ops.predict(
            current_tenant(),
            request.head_id,
            convert.model_inputs(request.inputs),
            request.top_k,
            request.return_embedding,
        )
        return convert.predict_response(head, results)

    @unary
    async def UploadDataset(
        self, request_iterator: AsyncIterator[pb.UploadDatasetRequest], context: Context
    ) -> pb.UploadDatasetResponse:
        async def chunks() -> AsyncIterator[list[LabeledExample]]:
            offset = 0
            async for chunk in request_iterator:
                _reject_malformed(chunk)
                examples = convert.labeled_examples(chunk.examples, f"examples(+{offset})")
                offset += len(examples)
                yield examples

        return convert.dataset_info(await self._ops.upload_dataset(current_tenant(), chunks()))

    @unary
    async def DeleteDataset(
        self, request: pb.DeleteDatasetRequest, context: Context
    ) -> pb.DeleteDatasetResponse:
        await self._ops.delete_dataset(current_tenant(), request.dataset_id)
        return pb.DeleteDatasetResponse()

    @unary
    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.Job:
        return convert_jobs.job(await self._ops.get_job(current_tenant(), request.job_id))

    @unary
    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        jobs, next_page = await self._ops.list_jobs(
            current_tenant(),
            request.page_size,
            request.page_token,
            state=convert.job_state_filter(request.state),
            backbone=request.backbone,
            head_name=request.head_name,
        )
        return pb.ListJobsResponse(
            jobs=[convert_jobs.job(j) for j in jobs], next_page_token=next_page
        )

    @unary
    async def CancelJob(self, request: pb.CancelJobRequest, context: Context) -> pb.Job:
        return convert_jobs.job(await self._ops.cancel_job(current_tenant(), request.job_id))

    @unary
    async def ListHeads(
        self, request: pb.ListHeadsRequest, context: Context
    ) -> pb.ListHeadsResponse:
        heads, next_page = await self._catalog.list_heads(
            current_tenant(),
            request.backbone,
            name=request.name,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListHeadsResponse(
            heads=[convert.head(h, aliases, summary=True) for h, aliases in heads],
            next_page_token=next_page,
        )

    @unary
    async def GetHead(self, request: pb.GetHeadRequest, context: Context) -> pb.Head:
        return convert.head(*await self._catalog.get_head(current_tenant(), request.head_id))

    @unary
    async def EvaluateHead(
        self, request: pb.EvaluateHeadRequest, context: Context
    ) -> pb.EvaluationReport:
        report = await self._evaluations.evaluate(
            current_tenant(),
            request.head_id,
            convert.labeled_examples(request.examples),
            request.dataset_id,
        )
        return convert.evaluation_report(report)

    @streaming
    async def ExportHead(
        self, request: pb.ExportHeadRequest, context: Context
    ) -> AsyncIterator[pb.ExportHeadChunk]:
        async for chunk in self._heads.export_head(current_tenant(), request.head_id):
            yield pb.ExportHeadChunk(data=chunk.data, total_bytes=chunk.total_bytes)

    @unary
    async def DeleteHead(
        self, request: pb.DeleteHeadRequest, context: Context
    ) -> pb.DeleteHeadResponse:
        await self._catalog.delete_head(current_tenant(), request.head_id, force=request.force)
        return pb.DeleteHeadResponse()

    @unary
    async def SetHeadAlias(self, request: pb.SetHeadAliasRequest, context: Context) -> pb.Head:
        return convert.head(
            *await self._catalog.set_head_alias(
                current_tenant(), request.name, request.alias, request.version
            )
        )

    @unary
    async def DeleteHeadAlias(
        self, request: pb.DeleteHeadAliasRequest, context: Context
    ) -> pb.DeleteHeadAliasResponse:
        await self._catalog.delete_head_alias(current_tenant(), request.name, request.alias)
        return pb.DeleteHeadAliasResponse()
