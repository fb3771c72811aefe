from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    FIT: _ClassVar[TaskKind]
    EVALUATE: _ClassVar[TaskKind]
    EXCHANGE: _ClassVar[TaskKind]
TASK_KIND_UNSPECIFIED: TaskKind
FIT: TaskKind
EVALUATE: TaskKind
EXCHANGE: TaskKind

class ClientMessage(_message.Message):
    __slots__ = ("hello", "proof", "result", "chunk")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    proof: Proof
    result: ResultHeader
    chunk: Chunk
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., proof: _Optional[_Union[Proof, _Mapping]] = ..., result: _Optional[_Union[ResultHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("challenge", "welcome", "task", "chunk", "ack", "finished")
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    challenge: Challenge
    welcome: Welcome
    task: TaskHeader
    chunk: Chunk
    ack: Ack
    finished: Finished
    def __init__(self, challenge: _Optional[_Union[Challenge, _Mapping]] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., task: _Optional[_Union[TaskHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol", "client_id", "transforms", "model")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFORMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    protocol: int
    client_id: str
    transforms: _containers.RepeatedScalarFieldContainer[str]
    model: _containers.RepeatedCompositeFieldContainer[ParameterSpec]
    def __init__(self, protocol: _Optional[int] = ..., client_id: _Optional[str] = ..., transforms: _Optional[_Iterable[str]] = ..., model: _Optional[_Iterable[_Union[ParameterSpec, _Mapping]]] = ...) -> None: ...

class ParameterSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class Challenge(_message.Message):
    __slots__ = ("nonce", "run_id")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    run_id: str
    def __init__(self, nonce: _Optional[bytes] = ..., run_id: _Optional[str] = ...) -> None: ...

class Proof(_message.Message):
    __slots__ = ("signature", "audit_size")
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    AUDIT_SIZE_FIELD_NUMBER: _ClassVar[int]
    signature: bytes
    audit_size: int
    def __init__(self, signature: _Optional[bytes] = ..., audit_size: _Optional[int] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("run_id", "round")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("run_id", "round", "nonce", "kind", "config", "payload_bytes", "payload_sha256", "deadline_seconds", "message")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    nonce: bytes
    kind: TaskKind
    config: bytes
    payload_bytes: int
    payload_sha256: bytes
    deadline_seconds: float
    message: bytes
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., nonce: _Optional[bytes] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., config: _Optional[bytes] = ..., payload_bytes: _Optional[int] = ..., payload_sha256: _Optional[bytes] = ..., deadline_seconds: _Optional[float] = ..., message: _Optional[bytes] = ...) -> None: ...

class ResultHeader(_message.Message):
    __slots__ = ("run_id", "round", "nonce", "client_id", "kind", "payload_bytes", "payload_sha256", "signature", "train_seconds", "error")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    nonce: bytes
    client_id: str
    kind: TaskKind
    payload_bytes: int
    payload_sha256: bytes
    signature: bytes
    train_seconds: float
    error: str
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., nonce: _Optional[bytes] = ..., client_id: _Optional[str] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., payload_bytes: _Optional[int] = ..., payload_sha256: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., train_seconds: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("nonce", "accepted", "reason")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    accepted: bool
    reason: str
    def __init__(self, nonce: _Optional[bytes] = ..., accepted: bool = ..., reason: _Optional[str] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("reason", "audit")
    REASON_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    reason: str
    audit: bytes
    def __init__(self, reason: _Optional[str] = ..., audit: _Optional[bytes] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("run_id", "state", "round", "total_rounds", "connected_clients", "last_metrics", "rejected_results")
    class LastMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    LAST_METRICS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_RESULTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: str
    round: int
    total_rounds: int
    connected_clients: _containers.RepeatedScalarFieldContainer[str]
    last_metrics: _containers.ScalarMap[str, float]
    rejected_results: int
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[str] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., connected_clients: _Optional[_Iterable[str]] = ..., last_metrics: _Optional[_Mapping[str, float]] = ..., rejected_results: _Optional[int] = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ("head", "to_size")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    TO_SIZE_FIELD_NUMBER: _ClassVar[int]
    head: bytes
    to_size: int
    def __init__(self, head: _Optional[bytes] = ..., to_size: _Optional[int] = ...) -> None: ...

class AuditReply(_message.Message):
    __slots__ = ("head", "proof")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    head: bytes
    proof: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, head: _Optional[bytes] = ..., proof: _Optional[_Iterable[bytes]] = ...) -> None: ...
