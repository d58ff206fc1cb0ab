# mypy: ignore-errors
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Policy(_message.Message):
    __slots__ = ("allowed_targets", "require_local", "max_cost", "quality_tolerance")
    ALLOWED_TARGETS_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_LOCAL_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_FIELD_NUMBER: _ClassVar[int]
    QUALITY_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    allowed_targets: _containers.RepeatedScalarFieldContainer[str]
    require_local: bool
    max_cost: float
    quality_tolerance: float
    def __init__(self, allowed_targets: _Optional[_Iterable[str]] = ..., require_local: _Optional[bool] = ..., max_cost: _Optional[float] = ..., quality_tolerance: _Optional[float] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("query", "history", "policy", "explain", "ab_key", "return_embedding")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    AB_KEY_FIELD_NUMBER: _ClassVar[int]
    RETURN_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    query: str
    history: _containers.RepeatedScalarFieldContainer[str]
    policy: Policy
    explain: bool
    ab_key: str
    return_embedding: bool
    def __init__(self, query: _Optional[str] = ..., history: _Optional[_Iterable[str]] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ..., explain: _Optional[bool] = ..., ab_key: _Optional[str] = ..., return_embedding: _Optional[bool] = ...) -> None: ...

class Neighbor(_message.Message):
    __slots__ = ("id", "text", "label", "similarity")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    label: str
    similarity: float
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., label: _Optional[str] = ..., similarity: _Optional[float] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("route", "target", "confidence", "fallback", "reason", "scores", "targets", "neighbors", "index_version", "arm", "query_embedding", "embedding_dimension", "encoder_fingerprint")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    QUERY_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIMENSION_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    route: str
    target: str
    confidence: float
    fallback: bool
    reason: str
    scores: _containers.ScalarMap[str, float]
    targets: _containers.RepeatedScalarFieldContainer[str]
    neighbors: _containers.RepeatedCompositeFieldContainer[Neighbor]
    index_version: str
    arm: str
    query_embedding: bytes
    embedding_dimension: int
    encoder_fingerprint: str
    def __init__(self, route: _Optional[str] = ..., target: _Optional[str] = ..., confidence: _Optional[float] = ..., fallback: _Optional[bool] = ..., reason: _Optional[str] = ..., scores: _Optional[_Mapping[str, float]] = ..., targets: _Optional[_Iterable[str]] = ..., neighbors: _Optional[_Iterable[_Union[Neighbor, _Mapping]]] = ..., index_version: _Optional[str] = ..., arm: _Optional[str] = ..., query_embedding: _Optional[bytes] = ..., embedding_dimension: _Optional[int] = ..., encoder_fingerprint: _Optional[str] = ...) -> None: ...

class RouteBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RouteRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[RouteRequest, _Mapping]]] = ...) -> None: ...

class RouteBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[RouteResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[RouteResponse, _Mapping]]] = ...) -> None: ...

class IndexInfo(_message.Message):
    __slots__ = ("version", "path", "kind", "exemplars", "dimension", "routes", "targets", "encoder_fingerprint", "faiss_factory", "built_at")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EXEMPLARS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    FAISS_FACTORY_FIELD_NUMBER: _ClassVar[int]
    BUILT_AT_FIELD_NUMBER: _ClassVar[int]
    version: str
    path: str
    kind: str
    exemplars: int
    dimension: int
    routes: _containers.RepeatedScalarFieldContainer[str]
    targets: _containers.RepeatedScalarFieldContainer[str]
    encoder_fingerprint: str
    faiss_factory: str
    built_at: str
    def __init__(self, version: _Optional[str] = ..., path: _Optional[str] = ..., kind: _Optional[str] = ..., exemplars: _Optional[int] = ..., dimension: _Optional[int] = ..., routes: _Optional[_Iterable[str]] = ..., targets: _Optional[_Iterable[str]] = ..., encoder_fingerprint: _Optional[str] = ..., faiss_factory: _Optional[str] = ..., built_at: _Optional[str] = ...) -> None: ...

class GetIndexInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetIndexInfoResponse(_message.Message):
    __slots__ = ("index", "candidate", "candidate_mode", "candidate_share")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_MODE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_SHARE_FIELD_NUMBER: _ClassVar[int]
    index: IndexInfo
    candidate: IndexInfo
    candidate_mode: str
    candidate_share: float
    def __init__(self, index: _Optional[_Union[IndexInfo, _Mapping]] = ..., candidate: _Optional[_Union[IndexInfo, _Mapping]] = ..., candidate_mode: _Optional[str] = ..., candidate_share: _Optional[float] = ...) -> None: ...

class ReloadIndexRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class ReloadIndexResponse(_message.Message):
    __slots__ = ("ok", "changed", "error", "index", "previous_version")
    OK_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    changed: bool
    error: str
    index: IndexInfo
    previous_version: str
    def __init__(self, ok: _Optional[bool] = ..., changed: _Optional[bool] = ..., error: _Optional[str] = ..., index: _Optional[_Union[IndexInfo, _Mapping]] = ..., previous_version: _Optional[str] = ...) -> None: ...

class SetCandidateRequest(_message.Message):
    __slots__ = ("mode", "path", "share")
    MODE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    mode: str
    path: str
    share: float
    def __init__(self, mode: _Optional[str] = ..., path: _Optional[str] = ..., share: _Optional[float] = ...) -> None: ...

class RouteAgreement(_message.Message):
    __slots__ = ("route", "compared", "agreed")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    AGREED_FIELD_NUMBER: _ClassVar[int]
    route: str
    compared: int
    agreed: int
    def __init__(self, route: _Optional[str] = ..., compared: _Optional[int] = ..., agreed: _Optional[int] = ...) -> None: ...

class SetCandidateResponse(_message.Message):
    __slots__ = ("mode", "share", "candidate", "agreement")
    MODE_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    mode: str
    share: float
    candidate: IndexInfo
    agreement: _containers.RepeatedCompositeFieldContainer[RouteAgreement]
    def __init__(self, mode: _Optional[str] = ..., share: _Optional[float] = ..., candidate: _Optional[_Union[IndexInfo, _Mapping]] = ..., agreement: _Optional[_Iterable[_Union[RouteAgreement, _Mapping]]] = ...) -> None: ...
