"""The serving image as the SageMaker Python SDK runs it: local mode (``sagemaker.local.LocalSession``).

A real-time endpoint (``Model.deploy`` + ``Predictor``) and a Batch Transform over a JSON Lines
file, both in ``docker-compose`` containers of the built image with the tiny model. Skipped, with
the reason, when no Docker engine answers or neither ``docker compose`` nor ``docker-compose`` is
installed (``.ci/run`` starts ``sandbox-docker``, which installs ``docker-compose``). What local
mode does that matters here is listed in :mod:`local_test.sagemaker_local`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from local_test import sagemaker_local as local_mode
from tests.container.harness import docker
from twostage_rec.artifact import pack_model_tar

pytestmark = pytest.mark.container

JSON_LINES = "application/jsonlines"
SessionFactory = Callable[[str], Any]


@pytest.fixture(scope="module")
def sessions(docker_engine: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SessionFactory]:
    """Factory of local sessions, each on its own free port with its containers under its own folder;
    dummy AWS credentials and region for the module; every container started is removed at the end."""
    root = tmp_path_factory.mktemp("sagemaker-local")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
            patch.delenv(name, raising=False)
        for name, value in local_mode.DUMMY_AWS_ENV.items():
            patch.setenv(name, value)
        missing = local_mode.compose_unavailable()
        if missing:
            pytest.skip(f"SageMaker local mode needs docker compose: {missing}")
        try:
            yield lambda name: local_mode.local_session(root / name, local_mode.free_port())
        finally:
            local_mode.remove_containers(root, docker_engine)


@pytest.fixture(scope="module")
def model_uri(image: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model as ``model.tar.gz`` in a folder of its own (local mode extracts it there)."""
    tar = pack_model_tar(model_dir, tmp_path_factory.mktemp("sagemaker-local-tar") / "model.tar.gz")
    return local_mode.stage_model_tar(tar, tmp_path_factory.mktemp("sagemaker-local-model") / "model")


def make_model(image: str, model_uri: str, session: Any) -> Any:
    from sagemaker.model import Model

    return Model(image_uri=image, model_data=model_uri, role=local_mode.DUMMY_ROLE, sagemaker_session=session,
                 env={"SAGEMAKER_MODEL_SERVER_WORKERS": "1"})  # fmt: skip


@pytest.fixture(scope="module")
def endpoint(image: str, model_uri: str, sessions: SessionFactory) -> Iterator[tuple[Any, Any]]:
    """A local endpoint of the image; yields (session, its JSON Predictor). Deleted at the end."""
    from sagemaker.deserializers import JSONDeserializer
    from sagemaker.predictor import Predictor
    from sagemaker.serializers import JSONSerializer

    session = sessions("endpoint")
    model = make_model(image, model_uri, session)
    # Local mode's CreateEndpoint returns once the container answers /ping; deploy's wait would
    # then sleep its 30 s polling interval before the first DescribeEndpoint.
    deployed = model.deploy(initial_instance_count=1, instance_type="local", wait=False)
    assert deployed is None  # a plain Model hands back no Predictor
    assert session.sagemaker_client.describe_endpoint(EndpointName=model.endpoint_name)["EndpointStatus"] == "InService"
    predictor = Predictor(model.endpoint_name, sagemaker_session=session,
                          serializer=JSONSerializer(), deserializer=JSONDeserializer())  # fmt: skip
    try:
        yield session, predictor
    finally:
        predictor.delete_endpoint()
        session.delete_model(model.name)


def test_deploy_runs_the_image_with_serve_in_docker_compose(
    endpoint: tuple[Any, Any], image: str, docker_engine: str
) -> None:
    session, _ = endpoint
    root = Path(session.config["local"]["container_root"])
    [container] = local_mode.containers(root, docker_engine)
    config = json.loads(docker("inspect", "-f", "{{json .Config}}", container).stdout)
    assert config["Image"] == image and config["Cmd"] == ["serve"]
    published = docker("port", container, "8080").stdout.splitlines()[0]
    assert published.rsplit(":", 1)[1] == str(session.config["local"]["serving_port"])


def test_predict_one_user(endpoint: tuple[Any, Any]) -> None:
    _, predictor = endpoint
    answer = predictor.predict({"user_id": "alice", "top_k": 3})
    assert answer["user_id"] == "alice" and answer["model_version"] == "tiny-1"
    assert [r["item_id"] for r in answer["recommendations"]] == ["i1", "i2", "i3"]  # i0 is seen
    assert answer["fallback"] is None and answer["degraded"] is False


def test_predict_a_batch(endpoint: tuple[Any, Any]) -> None:
    _, predictor = endpoint
    answer = predictor.predict({"instances": [{"user_id": "carol"}, {"user_id": "bob", "top_k": 2},
                                              {"user_id": "stranger", "top_k": 3}]})  # fmt: skip
    predictions = answer["predictions"]
    assert [p["user_id"] for p in predictions] == ["carol", "bob", "stranger"]
    assert [len(p["recommendations"]) for p in predictions] == [6, 2, 3]  # carol has seen nothing
    assert [r["item_id"] for r in predictions[1]["recommendations"]] == ["i4", "i3"]  # i5 is bob's, seen
    assert [p["fallback"] for p in predictions] == [None, None, "popular"]


def test_predict_json_lines(endpoint: tuple[Any, Any]) -> None:
    from sagemaker.deserializers import JSONLinesDeserializer
    from sagemaker.predictor import Predictor
    from sagemaker.serializers import JSONLinesSerializer

    session, predictor = endpoint
    lines = Predictor(predictor.endpoint_name, sagemaker_session=session,
                      serializer=JSONLinesSerializer(), deserializer=JSONLinesDeserializer())  # fmt: skip
    answers = lines.predict([{"user_id": "bob", "top_k": 1}, 42, {"user_id": "alice", "top_k": 2}])
    assert [a.get("user_id") for a in answers] == ["bob", None, "alice"]
    assert answers[1] == {"error": "bad_request", "message": "the line must be a JSON object, not a number", "line": 2}
    assert [r["item_id"] for r in answers[2]["recommendations"]] == ["i1", "i2"]


@pytest.mark.parametrize(
    ("body", "accept", "status", "error"),
    [
        ({"user_id": "alice", "top_k": 0}, "application/json", 400, "bad_request"),
        ({"user_id": "nobody", "on_unknown_user": "error"}, "application/json", 404, "user_not_found"),
        ({"user_id": "alice"}, "text/csv", 406, "not_acceptable"),
    ],
    ids=["invalid", "unknown-user", "accept-csv"],
)
def test_a_client_error_comes_back_as_the_response_body(
    endpoint: tuple[Any, Any], body: dict[str, Any], accept: str, status: int, error: str
) -> None:
    """Local mode's runtime client raises nothing for a 4xx: ``predict`` returns the error body
    (the real sagemaker-runtime raises ModelError: tests/unit/deployment/test_sdk_predictor.py)."""
    from sagemaker.deserializers import JSONDeserializer
    from sagemaker.predictor import Predictor
    from sagemaker.serializers import JSONSerializer

    session, predictor = endpoint
    asking = Predictor(predictor.endpoint_name, sagemaker_session=session, serializer=JSONSerializer(),
                       deserializer=JSONDeserializer(accept=accept))  # fmt: skip
    answer = asking.predict(body)
    assert answer["error"] == error and answer["message"] and answer["request_id"]
    raw = session.sagemaker_runtime_client.invoke_endpoint(
        json.dumps(body), predictor.endpoint_name, "application/json", accept
    )
    assert raw["Body"].status == status  # only the raw urllib3 response shows the status
    assert json.loads(raw["Body"].read())["error"] == error


# --- Batch Transform ----------------------------------------------------------------------------

# Lines padded with JSON whitespace to ~400 kB. At MaxPayloadInMB=7 local mode packs at most 18 of
# them into one mini-batch: the file goes to the container as two requests, lines 1-21 (7.2 MB,
# above the container's own 6 MiB default limit) and 22-24, and the output shows how the answers of
# two mini-batches are joined.
PAD = " " * 400_000
TRANSFORM_LINES = [
    '{"user_id": "alice", "top_k": 2}',
    '{"user_id": "bob",' + PAD + '"top_k": 1}',
    "not json",
    '{"user_id": "nobody", "on_unknown_user": "error"}',
    '{"user_id": "carol", "top_k": 1}' + PAD,
    *['{"user_id": "alice",' + PAD + '"as_of": 150}'] * 17,
    '{"user_id": "bob", "top_k": "many"}',
    '{"user_id": "stranger", "top_k": 2}',
]


def test_batch_transform_answers_every_line_in_order(
    image: str, model_uri: str, sessions: SessionFactory, tmp_path: Path, docker_engine: str
) -> None:
    session = sessions("transform")
    requests = local_mode.record_requests(session)
    data = tmp_path / "input" / "requests.jsonl"
    data.parent.mkdir()
    data.write_text("\n".join(TRANSFORM_LINES) + "\n", encoding="utf-8")
    output = tmp_path / "output"
    model = make_model(image, model_uri, session)
    transformer = model.transformer(instance_count=1, instance_type="local", strategy="MultiRecord",
                                    assemble_with="Line", accept=JSON_LINES, output_path=f"file://{output}",
                                    max_payload=7, max_concurrent_transforms=2)  # fmt: skip
    try:
        transformer.transform(data=f"file://{data}", content_type=JSON_LINES, split_type="Line", wait=True, logs=False)
    finally:
        session.delete_model(model.name)
    assert [r.lines for r in requests] == [21, 3]  # two mini-batches, in file order
    assert requests[0].body_bytes > 6 << 20
    assert {(r.content_type, r.accept, r.status) for r in requests} == {(JSON_LINES, JSON_LINES, 200)}

    text = (output / "requests.jsonl.out").read_text(encoding="utf-8")
    # The container ends a body without a newline; local mode writes one after each mini-batch.
    assert text.endswith("}\n") and "\n\n" not in text
    answers = [json.loads(line) for line in text.splitlines()]
    assert len(answers) == len(TRANSFORM_LINES)
    users = ["alice", "bob", None, None, "carol", *["alice"] * 17, None, "stranger"]
    assert [a.get("user_id") for a in answers] == users
    assert [len(a.get("recommendations", [])) for a in answers] == [2, 1, 0, 0, 1, *[5] * 17, 0, 2]
    assert [r["item_id"] for r in answers[0]["recommendations"]] == ["i1", "i2"]
    assert {a["as_of"] for a in answers[5:22]} == {150} and answers[23]["fallback"] == "popular"
    # An error's "line" counts within its mini-batch (all the container sees): line 23 is line 2 of the second.
    assert [(a["error"], a["line"]) for a in answers if "error" in a] == [
        ("bad_request", 3), ("user_not_found", 4), ("bad_request", 2)
    ]  # fmt: skip
    assert all(a["message"] for a in answers if "error" in a)
    [container] = local_mode.containers(Path(session.config["local"]["container_root"]), docker_engine)
    logs = docker("logs", container)
    assert "Traceback" not in logs.stdout + logs.stderr
    # What a transform tells the container, as SageMaker does: MaxConcurrentTransforms is always 1 here.
    env = json.loads(docker("inspect", "-f", "{{json .Config.Env}}", container).stdout)
    assert {"SAGEMAKER_BATCH=True", "SAGEMAKER_MAX_PAYLOAD_IN_MB=7", "SAGEMAKER_BATCH_STRATEGY=MULTI_RECORD",
            "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS=1"} <= set(env)  # fmt: skip

