"""The HTTP front of the local Feature Store: SageMaker's two wire protocols on one port.

Routes (what botocore sends, per its service models):
  POST /  with X-Amz-Target: SageMaker.<Op>     Create/Describe/Delete/ListFeatureGroups (json 1.1)
  GET | PUT | DELETE /FeatureGroup/{name-or-arn}  GetRecord / PutRecord / DeleteRecord (rest-json)
  POST /BatchGetRecord                          BatchGetRecord (rest-json)
  GET | POST | DELETE /_admin/faults            fault settings (no auth)
  GET | DELETE /_admin/stats                    requests per operation (no auth)

Errors have AWS's shape: status, ``x-amzn-ErrorType`` header and ``{"message"}`` body (plus
``__type`` on json 1.1), so botocore raises its modeled exceptions. Signatures are not verified,
but an ``AWS4-HMAC-SHA256`` Authorization header is required, as a real endpoint would.
"""

from __future__ import annotations

import json
import re
import socketserver
import sys
import threading
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from local_test.feature_store.faults import FaultConfig, FaultInjector
from local_test.feature_store.store import ApiError, Store, format_expires_at, json_field, validation_error

REST_JSON: Final = "application/json"
JSON_11: Final = "application/x-amz-json-1.1"
MAX_BATCH_RECORDS: Final = 100
RUNTIME_OPERATIONS: Final = frozenset({"GetRecord", "PutRecord", "DeleteRecord", "BatchGetRecord"})
CONTROL_OPERATIONS: Final = frozenset(
    {"CreateFeatureGroup", "DescribeFeatureGroup", "DeleteFeatureGroup", "ListFeatureGroups"})
_REGION_RE: Final = re.compile(r"Credential=[^/,]+/\d{8}/([^/,]+)/")


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body) if body else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise validation_error(f"request body is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise validation_error("request body must be a JSON object")
    return payload


def _query_one(query: Mapping[str, list[str]], name: str, default: str | None = None) -> str:
    values = query.get(name)
    if not values:
        if default is None:
            raise validation_error(f"missing required query parameter {name}")
        return default
    if len(values) > 1:
        raise validation_error(f"query parameter {name} given {len(values)} times")
    return values[0]


def _wants_expiry(value: Any) -> bool:
    if value not in (None, "Enabled", "Disabled"):
        raise validation_error(f"ExpirationTimeResponse {value!r} must be Enabled or Disabled")
    return value == "Enabled"


def _target_stores(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not set(value) <= {"OnlineStore", "OfflineStore"}:
        raise validation_error(f"TargetStores {value!r} must be a non-empty list of OnlineStore, OfflineStore")
    return value


def get_record(store: Store, group_ref: str, query: Mapping[str, list[str]]) -> dict[str, Any]:
    """GetRecord: ``{}`` on a miss, else ``{Record[, ExpiresAt]}``."""
    record_id = _query_one(query, "RecordIdentifierValueAsString")
    with_expiry = _wants_expiry(_query_one(query, "ExpirationTimeResponse", "Disabled"))
    group = store.group(group_ref)
    found = store.get_records(group, [record_id], query.get("FeatureName"))
    if record_id not in found:
        return {}
    values, expires_at = found[record_id]
    response: dict[str, Any] = {"Record": values}
    if with_expiry and expires_at is not None:
        response["ExpiresAt"] = format_expires_at(expires_at)
    return response


def batch_get_record(store: Store, faults: FaultInjector, request: Mapping[str, Any]) -> dict[str, Any]:
    """BatchGetRecord: at most 100 ids in all; misses are simply absent from Records."""
    identifiers = json_field(request, "Identifiers", list, "BatchGetRecord")
    with_expiry = _wants_expiry(request.get("ExpirationTimeResponse"))
    batches = []
    for identifier in identifiers:
        where = "BatchGetRecord Identifiers entry"
        identifier = identifier if isinstance(identifier, dict) else {}
        group_ref = json_field(identifier, "FeatureGroupName", str, where)
        record_ids = json_field(identifier, "RecordIdentifiersValueAsString", list, where)
        feature_names = json_field(identifier, "FeatureNames", list, where, required=False)
        if not record_ids or not all(isinstance(r, str) for r in record_ids + (feature_names or [])):
            raise validation_error(f"{where} for {group_ref}: RecordIdentifiersValueAsString and FeatureNames "
                                   "must be non-empty lists of strings")
        batches.append((store.group(group_ref, "ValidationError", 400), group_ref, record_ids, feature_names))
    total = sum(len(batch[2]) for batch in batches)
    if not 1 <= total <= MAX_BATCH_RECORDS:
        raise validation_error(
            f"BatchGetRecord asks for {total} record identifiers; it accepts 1 to {MAX_BATCH_RECORDS} per call")

    records: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    unprocessed: list[dict[str, Any]] = []
    for group, group_ref, record_ids, feature_names in batches:
        served, skipped, failed = faults.split_batch(record_ids)
        for record_id, (values, expires_at) in store.get_records(group, served, feature_names).items():
            detail = {"FeatureGroupName": group.name, "RecordIdentifierValueAsString": record_id, "Record": values}
            if with_expiry and expires_at is not None:
                detail["ExpiresAt"] = format_expires_at(expires_at)
            records.append(detail)
        errors += [
            {"FeatureGroupName": group.name, "RecordIdentifierValueAsString": record_id,
             "ErrorCode": "InternalFailure", "ErrorMessage": "Internal failure (injected fault)"}
            for record_id in failed
        ]
        if skipped:
            # Echo the caller's own entry so it can be resent as is.
            entry: dict[str, Any] = {"FeatureGroupName": group_ref, "RecordIdentifiersValueAsString": skipped}
            if feature_names is not None:
                entry["FeatureNames"] = feature_names
            unprocessed.append(entry)
    return {"Records": records, "Errors": errors, "UnprocessedIdentifiers": unprocessed}


def put_record(store: Store, group_ref: str, request: Mapping[str, Any]) -> dict[str, Any]:
    """PutRecord."""
    record = json_field(request, "Record", list, "PutRecord")
    store.put_record(group_ref, record, _target_stores(request.get("TargetStores")), request.get("TtlDuration"))
    return {}


def delete_record(store: Store, group_ref: str, query: Mapping[str, list[str]]) -> dict[str, Any]:
    """DeleteRecord."""
    store.delete_record(
        group_ref,
        record_id=_query_one(query, "RecordIdentifierValueAsString"),
        event_time=_query_one(query, "EventTime"),
        target_stores=_target_stores(query.get("TargetStores")),
        mode=_query_one(query, "DeletionMode", "SoftDelete"),
    )
    return {}


class FeatureStoreHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP server holding the store, the fault injector and request counters."""

    daemon_threads = True
    request_queue_size = 128  # the default backlog of 5 drops SYNs when many clients connect at once

    def __init__(self, address: tuple[str, int], store: Store, faults: FaultInjector,
                 log_requests: bool = False) -> None:
        self.store = store
        self.faults = faults
        self.log_requests = log_requests
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        super().__init__(address, FeatureStoreHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up at its own deadline closes the socket mid-answer: not our error.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn, a DNS lookup that can stall without a resolver.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` with the port actually bound."""
        return f"http://{self.server_name}:{self.server_port}"

    def count(self, operation: str) -> None:
        """Count one request to ``operation``."""
        with self._counts_lock:
            self._counts[operation] += 1

    def stats(self) -> dict[str, int]:
        """Requests per operation since start or the last reset."""
        with self._counts_lock:
            return dict(self._counts)

    def reset_stats(self) -> None:
        """Zero the request counters."""
        with self._counts_lock:
            self._counts.clear()


class FeatureStoreHandler(BaseHTTPRequestHandler):
    """One keep-alive connection: reads every body in full, answers JSON, never logs by default."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # StreamRequestHandler.setup sets TCP_NODELAY
    server: FeatureStoreHTTPServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        """Handle GET."""
        self._handle()

    do_PUT = do_POST = do_DELETE = do_GET

    def finish(self) -> None:
        """Close this thread's database connection with the HTTP connection."""
        try:
            super().finish()
        finally:
            self.server.store.release_connection()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (overridden signature)
        """Log only with ``--log-requests``."""
        if self.server.log_requests:
            super().log_message(format, *args)

    def _handle(self) -> None:
        content_type = REST_JSON
        try:
            # Read the body before anything can fail, or its bytes would poison the next request.
            body = self._read_body()
            url = urlsplit(self.path)
            if url.path.startswith("/_admin/"):
                self._send(200, self._admin(url.path, body), REST_JSON)
                return
            if "X-Amz-Target" in self.headers:
                content_type = JSON_11
            operation, call = self._route(url, body)
            self.server.count(operation)
            if not self.headers.get("Authorization", "").startswith("AWS4-HMAC-SHA256"):
                raise ApiError("AccessForbidden",
                               "Missing Authentication Token: sign requests with AWS Signature Version 4", 403)
            if operation in RUNTIME_OPERATIONS:
                self.server.faults.before_request()
            self._send(200, call(), content_type)
        except ApiError as error:
            code, payload = error.code, {"message": error.message}
            if content_type == JSON_11:
                # The SageMaker control plane names its unmodeled validation error differently.
                code = "ValidationException" if code == "ValidationError" else code
                payload["__type"] = code
            self._send(error.status, payload, content_type, code)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            message = {"message": "Internal failure in the local Feature Store; see its log"}
            self._send(500, message, content_type, "InternalFailure")

    def _read_body(self) -> bytes:
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True
            raise ApiError("ValidationError", "chunked request bodies are not supported: send Content-Length", 411)
        length = self.headers.get("Content-Length", "0").strip()
        if not length.isdigit():
            self.close_connection = True
            raise validation_error(f"bad Content-Length {length!r}")
        return self.rfile.read(int(length)) if int(length) else b""

    def _route(self, url: SplitResult, body: bytes) -> tuple[str, Callable[[], dict[str, Any]]]:
        store, method, path = self.server.store, self.command, url.path
        target = self.headers.get("X-Amz-Target")
        if target is not None:
            operation = target.removeprefix("SageMaker.")
            if method != "POST" or path != "/" or operation not in CONTROL_OPERATIONS:
                raise ApiError("UnknownOperationException", f"{target} is not supported by the local Feature Store")
            region_match = _REGION_RE.search(self.headers.get("Authorization", ""))
            region = region_match.group(1) if region_match else "us-east-1"
            handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
                "CreateFeatureGroup": lambda request: store.create_group(request, region),
                "DescribeFeatureGroup": store.describe_group,
                "DeleteFeatureGroup": store.delete_group,
                "ListFeatureGroups": store.list_groups,
            }
            return operation, lambda: handlers[operation](_json_object(body))
        if method == "POST" and path == "/BatchGetRecord":
            return "BatchGetRecord", lambda: batch_get_record(store, self.server.faults, _json_object(body))
        prefix = "/FeatureGroup/"
        # botocore percent-encodes the {FeatureGroupName} label, so an ARN arrives without a raw '/'.
        if path.startswith(prefix) and len(path) > len(prefix) and "/" not in path[len(prefix) :]:
            group_ref = unquote(path[len(prefix) :])
            query = parse_qs(url.query, keep_blank_values=True)
            if method == "GET":
                return "GetRecord", lambda: get_record(store, group_ref, query)
            if method == "PUT":
                return "PutRecord", lambda: put_record(store, group_ref, _json_object(body))
            if method == "DELETE":
                return "DeleteRecord", lambda: delete_record(store, group_ref, query)
        raise ApiError("UnknownOperationException", f"no operation at {method} {path}", 404)

    def _admin(self, path: str, body: bytes) -> dict[str, Any]:
        server, method = self.server, self.command
        if path == "/_admin/faults" and method in ("GET", "POST", "DELETE"):
            if method != "GET":
                try:
                    config = FaultConfig.from_mapping(_json_object(body) if method == "POST" else {})
                except ValueError as error:
                    raise validation_error(str(error)) from None
                server.faults.configure(config)
            return server.faults.config.to_dict()
        if path == "/_admin/stats" and method in ("GET", "DELETE"):
            if method == "DELETE":
                server.reset_stats()
            return server.stats()
        raise ApiError("UnknownOperationException", f"no admin route {method} {path}", 404)

    def _send(self, status: int, payload: Mapping[str, Any], content_type: str, error_code: str | None = None) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        if error_code is not None:
            self.send_header("x-amzn-ErrorType", error_code)
        self.end_headers()
        self.wfile.write(body)
