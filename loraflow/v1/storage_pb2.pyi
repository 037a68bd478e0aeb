from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_KIND_UNSPECIFIED: _ClassVar[DataKind]
    DATA_KIND_MODEL: _ClassVar[DataKind]
    DATA_KIND_ADAPTER: _ClassVar[DataKind]
    DATA_KIND_DATASET: _ClassVar[DataKind]
DATA_KIND_UNSPECIFIED: DataKind
DATA_KIND_MODEL: DataKind
DATA_KIND_ADAPTER: DataKind
DATA_KIND_DATASET: DataKind

class FileEntry(_message.Message):
    __slots__ = ("path", "size", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class StatDirectoryRequest(_message.Message):
    __slots__ = ("kind", "name", "files")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    kind: DataKind
    name: str
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    def __init__(self, kind: _Optional[_Union[DataKind, str]] = ..., name: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ...) -> None: ...

class StatDirectoryResponse(_message.Message):
    __slots__ = ("uri", "published", "missing_sha256")
    URI_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHA256_FIELD_NUMBER: _ClassVar[int]
    uri: str
    published: bool
    missing_sha256: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, uri: _Optional[str] = ..., published: _Optional[bool] = ..., missing_sha256: _Optional[_Iterable[str]] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("kind", "path", "size", "sha256")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    kind: DataKind
    path: str
    size: int
    sha256: str
    def __init__(self, kind: _Optional[_Union[DataKind, str]] = ..., path: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class UploadRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadResponse(_message.Message):
    __slots__ = ("sha256", "size", "already_present")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    already_present: bool
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ..., already_present: _Optional[bool] = ...) -> None: ...

class CommitDirectoryRequest(_message.Message):
    __slots__ = ("kind", "name", "files")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    kind: DataKind
    name: str
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    def __init__(self, kind: _Optional[_Union[DataKind, str]] = ..., name: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ...) -> None: ...

class CommitDirectoryResponse(_message.Message):
    __slots__ = ("uri", "file_uri", "already_published", "file_count", "total_bytes")
    URI_FIELD_NUMBER: _ClassVar[int]
    FILE_URI_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    FILE_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    uri: str
    file_uri: str
    already_published: bool
    file_count: int
    total_bytes: int
    def __init__(self, uri: _Optional[str] = ..., file_uri: _Optional[str] = ..., already_published: _Optional[bool] = ..., file_count: _Optional[int] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class GetDirectoryRequest(_message.Message):
    __slots__ = ("uri",)
    URI_FIELD_NUMBER: _ClassVar[int]
    uri: str
    def __init__(self, uri: _Optional[str] = ...) -> None: ...

class GetDirectoryResponse(_message.Message):
    __slots__ = ("uri", "files", "total_bytes")
    URI_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    uri: str
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    total_bytes: int
    def __init__(self, uri: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("uri", "path")
    URI_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    uri: str
    path: str
    def __init__(self, uri: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class DownloadResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: FileEntry
    chunk: bytes
    def __init__(self, header: _Optional[_Union[FileEntry, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...
