"""loraflow.v1.JobService over one or more JobQueues (the trainer serves "train", the compiler "compile")."""

from __future__ import annotations

import logging
import threading

import grpc

from loraflow.errors import InvalidArgument, NotFound
from loraflow.jobs.queue import JobEventRecord, JobQueue, JobRecord, list_jobs_merged
from loraflow.options.names import validate_name
from loraflow.server.grpc_server import page_size_from_proto, set_timestamp
from loraflow.v1 import jobs_pb2, jobs_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name

_KIND_TO_PROTO = {"train": jobs_pb2.JOB_KIND_TRAIN, "compile": jobs_pb2.JOB_KIND_COMPILE}
_PROTO_TO_KIND = {v: k for k, v in _KIND_TO_PROTO.items()}


def state_to_proto(state: str) -> int:
    return jobs_pb2.JobState.Value(f"JOB_STATE_{state}")


def state_from_proto(value: int, field: str = "state") -> str | None:
    """None for UNSPECIFIED; InvalidArgument for numbers outside the enum."""
    if value == jobs_pb2.JOB_STATE_UNSPECIFIED:
        return None
    try:
        return jobs_pb2.JobState.Name(value).removeprefix("JOB_STATE_")
    except ValueError:
        raise InvalidArgument(f"{field} {value} is not a JobState", field=field, value=value) from None


def _fill(message, values: dict) -> None:
    """Copy the keys of `values` that are fields of `message` (maps merged, scalars set)."""
    for fd in message.DESCRIPTOR.fields:
        if fd.name not in values or values[fd.name] is None:
            continue
        value = values[fd.name]
        try:
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                getattr(message, fd.name).update({str(k): v for k, v in value.items()})
            elif fd.is_repeated:
                getattr(message, fd.name).extend(value)
            else:
                setattr(message, fd.name, value)
        except (TypeError, ValueError, AttributeError) as exc:
            # A malformed stored result must not make GetJob fail; the rest of the job is still useful.
            log.warning("result field %s=%r does not fit %s: %s", fd.name, value, message.DESCRIPTOR.name, exc)


def job_to_proto(record: JobRecord) -> jobs_pb2.Job:
    job = jobs_pb2.Job(id=record.id, kind=_KIND_TO_PROTO.get(record.kind, jobs_pb2.JOB_KIND_UNSPECIFIED),
                       state=state_to_proto(record.state), attempt=record.attempt, progress=record.progress,
                       message=record.message, error=record.error, labels=record.labels,
                       request_id=record.request_id)
    set_timestamp(job.create_time, record.create_time)
    set_timestamp(job.start_time, record.start_time)
    set_timestamp(job.end_time, record.end_time)
    if record.result is not None:
        if record.kind == "train":
            _fill(job.train_result, record.result)
        elif record.kind == "compile":
            _fill(job.compile_result, record.result)
    return job


def event_to_proto(event: JobEventRecord) -> jobs_pb2.JobEvent:
    message = jobs_pb2.JobEvent(job_id=event.job_id, seq=event.seq, state=state_to_proto(event.state),
                                progress=event.progress, message=event.message, metrics=event.metrics)
    set_timestamp(message.time, event.time)
    return message


class JobServiceServicer(jobs_pb2_grpc.JobServiceServicer):
    """Get/List/Watch/Cancel over the queues this process owns, keyed by kind ("train", "compile")."""

    def __init__(self, queues: dict[str, JobQueue], *, watch_poll_ms: int = 250):
        if not queues:
            raise ValueError("JobServiceServicer needs at least one queue")
        self.queues = dict(queues)
        self.watch_poll_ms = watch_poll_ms

    def _queue_for(self, job_id: str) -> JobQueue:
        validate_name("job_id", job_id)
        kind = job_id.split("-", 1)[0]
        queue = self.queues.get(kind)
        if queue is None:
            raise NotFound(f"no job {job_id!r} here (this server owns {', '.join(sorted(self.queues))} jobs)",
                           field="job_id", value=job_id)
        return queue

    def GetJob(self, request, context):
        return job_to_proto(self._queue_for(request.job_id).get(request.job_id))

    def ListJobs(self, request, context):
        if request.kind == jobs_pb2.JOB_KIND_UNSPECIFIED:
            queues = list(self.queues.values())
        else:
            kind = _PROTO_TO_KIND.get(request.kind)
            if kind is None or kind not in self.queues:
                raise InvalidArgument(f"kind {request.kind} is not served here (serving: "
                                      f"{', '.join(sorted(self.queues))})", field="kind", value=request.kind)
            queues = [self.queues[kind]]
        state = state_from_proto(request.state)
        records, token = list_jobs_merged(queues, state, page_size_from_proto(request.page_size),
                                          request.page_token)
        return jobs_pb2.ListJobsResponse(jobs=[job_to_proto(r) for r in records], next_page_token=token)

    def WatchJob(self, request, context):
        queue = self._queue_for(request.job_id)
        if request.after_seq < 0:
            raise InvalidArgument(f"after_seq must be >= 0, got {request.after_seq}", field="after_seq",
                                  value=request.after_seq)
        queue.get(request.job_id)  # NOT_FOUND before the stream starts
        stop = threading.Event()
        # Called when the RPC ends for any reason, including the client going away.
        context.add_callback(stop.set)
        for event in queue.watch(request.job_id, request.after_seq, stop=stop, poll_ms=self.watch_poll_ms):
            if not context.is_active():
                break
            yield event_to_proto(event)

    def CancelJob(self, request, context):
        return job_to_proto(self._queue_for(request.job_id).cancel(request.job_id))


def add_job_service(server, queues: dict[str, JobQueue]) -> JobServiceServicer:
    """Register the JobService on a GrpcServer (or a raw grpc.Server); returns the servicer."""
    servicer = JobServiceServicer(queues)
    add = jobs_pb2_grpc.add_JobServiceServicer_to_server
    if isinstance(server, grpc.Server):
        add(servicer, server)
    else:
        server.add(add, servicer)
    return servicer
