from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProtocolVersion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_VERSION_UNSPECIFIED: _ClassVar[ProtocolVersion]
    PROTOCOL_VERSION_CURRENT: _ClassVar[ProtocolVersion]
PROTOCOL_VERSION_UNSPECIFIED: ProtocolVersion
PROTOCOL_VERSION_CURRENT: ProtocolVersion

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "compression")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    compression: str
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., compression: _Optional[str] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("step_id", "hidden", "positions", "slot_mapping", "block_tables", "q_lens", "ctx_lens", "num_decodes", "block_size", "ping", "reply_to")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    SLOT_MAPPING_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLES_FIELD_NUMBER: _ClassVar[int]
    Q_LENS_FIELD_NUMBER: _ClassVar[int]
    CTX_LENS_FIELD_NUMBER: _ClassVar[int]
    NUM_DECODES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    hidden: Tensor
    positions: Tensor
    slot_mapping: Tensor
    block_tables: Tensor
    q_lens: _containers.RepeatedScalarFieldContainer[int]
    ctx_lens: _containers.RepeatedScalarFieldContainer[int]
    num_decodes: int
    block_size: int
    ping: bool
    reply_to: str
    def __init__(self, step_id: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., positions: _Optional[_Union[Tensor, _Mapping]] = ..., slot_mapping: _Optional[_Union[Tensor, _Mapping]] = ..., block_tables: _Optional[_Union[Tensor, _Mapping]] = ..., q_lens: _Optional[_Iterable[int]] = ..., ctx_lens: _Optional[_Iterable[int]] = ..., num_decodes: _Optional[int] = ..., block_size: _Optional[int] = ..., ping: _Optional[bool] = ..., reply_to: _Optional[str] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("step_id", "hidden", "error")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    hidden: Tensor
    error: str
    def __init__(self, step_id: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class ResultAck(_message.Message):
    __slots__ = ("step_id", "error")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    error: str
    def __init__(self, step_id: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("node_id", "start_layer", "end_layer", "ready", "load", "protocol_version")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    start_layer: int
    end_layer: int
    ready: bool
    load: int
    protocol_version: ProtocolVersion
    def __init__(self, node_id: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., ready: _Optional[bool] = ..., load: _Optional[int] = ..., protocol_version: _Optional[_Union[ProtocolVersion, str]] = ...) -> None: ...
