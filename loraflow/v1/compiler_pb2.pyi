import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from loraflow.v1 import jobs_pb2 as _jobs_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CompileOptions(_message.Message):
    __slots__ = ("target", "batch_size", "full_batch_size", "prefill_seq_len", "ctx_len", "max_rank", "adapter_slots", "dtype", "num_cores", "target_modules", "mxfp6_matmul", "quant_block_size", "quant_accuracy_level", "ai100_stage", "compiler_options")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    FULL_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    CTX_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_RANK_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SLOTS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CORES_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    MXFP6_MATMUL_FIELD_NUMBER: _ClassVar[int]
    QUANT_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUANT_ACCURACY_LEVEL_FIELD_NUMBER: _ClassVar[int]
    AI100_STAGE_FIELD_NUMBER: _ClassVar[int]
    COMPILER_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    target: str
    batch_size: int
    full_batch_size: int
    prefill_seq_len: int
    ctx_len: int
    max_rank: int
    adapter_slots: int
    dtype: str
    num_cores: int
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    mxfp6_matmul: bool
    quant_block_size: int
    quant_accuracy_level: int
    ai100_stage: str
    compiler_options: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, target: _Optional[str] = ..., batch_size: _Optional[int] = ..., full_batch_size: _Optional[int] = ..., prefill_seq_len: _Optional[int] = ..., ctx_len: _Optional[int] = ..., max_rank: _Optional[int] = ..., adapter_slots: _Optional[int] = ..., dtype: _Optional[str] = ..., num_cores: _Optional[int] = ..., target_modules: _Optional[_Iterable[str]] = ..., mxfp6_matmul: _Optional[bool] = ..., quant_block_size: _Optional[int] = ..., quant_accuracy_level: _Optional[int] = ..., ai100_stage: _Optional[str] = ..., compiler_options: _Optional[_Iterable[str]] = ...) -> None: ...

class SubmitCompileJobRequest(_message.Message):
    __slots__ = ("base_model", "adapters", "options", "request_id", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    adapters: _containers.RepeatedScalarFieldContainer[str]
    options: CompileOptions
    request_id: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, base_model: _Optional[str] = ..., adapters: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[CompileOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ArtifactAdapter(_message.Message):
    __slots__ = ("slot", "name", "digest", "r")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    R_FIELD_NUMBER: _ClassVar[int]
    slot: int
    name: str
    digest: str
    r: int
    def __init__(self, slot: _Optional[int] = ..., name: _Optional[str] = ..., digest: _Optional[str] = ..., r: _Optional[int] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("artifact_id", "uri", "base_model", "adapters", "options", "create_time", "size_bytes", "architecture")
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    uri: str
    base_model: str
    adapters: _containers.RepeatedCompositeFieldContainer[ArtifactAdapter]
    options: CompileOptions
    create_time: _timestamp_pb2.Timestamp
    size_bytes: int
    architecture: str
    def __init__(self, artifact_id: _Optional[str] = ..., uri: _Optional[str] = ..., base_model: _Optional[str] = ..., adapters: _Optional[_Iterable[_Union[ArtifactAdapter, _Mapping]]] = ..., options: _Optional[_Union[CompileOptions, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., size_bytes: _Optional[int] = ..., architecture: _Optional[str] = ...) -> None: ...

class ListArtifactsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListArtifactsResponse(_message.Message):
    __slots__ = ("artifacts", "next_page_token")
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    next_page_token: str
    def __init__(self, artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetArtifactRequest(_message.Message):
    __slots__ = ("artifact_id",)
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    def __init__(self, artifact_id: _Optional[str] = ...) -> None: ...

class DeleteArtifactRequest(_message.Message):
    __slots__ = ("artifact_id",)
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    def __init__(self, artifact_id: _Optional[str] = ...) -> None: ...

class DeleteArtifactResponse(_message.Message):
    __slots__ = ("artifact",)
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    artifact: Artifact
    def __init__(self, artifact: _Optional[_Union[Artifact, _Mapping]] = ...) -> None: ...
