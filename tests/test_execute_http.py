"""The execute function as a real process under functions-framework, over loopback HTTP."""

from __future__ import annotations

import json

import httpx
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent, from_http

from functions import events
from functions.contract import context_ref

SEED = {
    "code": 'print("Hello from WASM!")\nx = 42 + 10\nprint(f"Result: {x}")',
    "context": {},
    "timeout": 30,
}


def post(server, body, path="/execute", **kw):
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def test_seed_request_on_both_paths(execute_server):
    for path in ("/execute", "/"):
        r = post(execute_server, SEED, path)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["stdout"] == "Hello from WASM!\nResult: 52\n"
        assert {"stdout", "stderr", "locals", "execution_time"} <= body.keys()


def test_user_exception_is_200(execute_server):
    r = post(execute_server, {"code": "1/0"})
    assert r.status_code == 200
    assert r.json()["error"]["type"] == "ZeroDivisionError"


def test_bad_input_gets_a_clear_4xx(execute_server):
    url = execute_server.url + "/execute"
    cases = [
        (httpx.post(url, content=b"{not json", timeout=10), 400, "not valid JSON"),
        (httpx.post(url, content=b"\xff\xfe", timeout=10), 400, "UTF-8"),
        (httpx.post(url, content=b"", timeout=10), 400, "empty"),
        (post(execute_server, {"code": 5}), 422, "code"),
        (post(execute_server, {"code": "1", "tiemout": 3}), 422, "unknown field"),
        (post(execute_server, ["code"]), 422, "JSON object"),
        (post(execute_server, {"code": "1", "limits": {"deadline_s": -1}}), 422, "deadline_s"),
        (post(execute_server, {"code": "1", "limits": {"max_subcalls": True}}), 422, "integer"),
        (post(execute_server, {"code": "1", "timeout": "3"}), 422, "timeout"),
        (
            post(execute_server, {"code": "1", "session_id": "s", "state": {"ref": "xyz"}}),
            422,
            "state.ref",
        ),
        (httpx.post(url, content=b"[" * 100_000 + b"]" * 100_000, timeout=10), None, None),
        (httpx.get(execute_server.url + "/nowhere", timeout=10), 404, "no route"),
    ]
    for response, status, words in cases:
        assert 400 <= response.status_code < 500, response.text
        if status:
            assert response.status_code == status, response.text
            assert words in response.json()["error"]


def test_oversized_body_is_413(execute_server):
    big = {"code": "x = 1", "context": {"blob": "a" * (65 << 20)}}
    r = httpx.post(execute_server.url + "/execute", content=json.dumps(big), timeout=60)
    assert r.status_code == 413
    assert "limit" in r.json()["error"]


def test_missing_refs_are_409_then_data_fixes_it(execute_server):
    text = "abc" * 1000
    ref = context_ref(text)
    body = {"code": "len(context)", "session_id": "http-ctx", "rlm_context": {"ref": ref}}
    r = post(execute_server, body)
    assert r.status_code == 409 and r.json()["missing"] == ["rlm_context"]
    body["rlm_context"]["data"] = text
    r = post(execute_server, body)
    assert r.status_code == 200 and r.json()["stdout"] == "3000\n"
    state = r.json()["state"]
    r = post(execute_server, {"code": "1", "session_id": "elsewhere",
                              "state": {"ref": "b" * 64}})  # fmt: skip
    assert r.status_code == 409 and r.json()["missing"] == ["state"]
    assert state["ref"] and state["data"]


def test_cloudevent_binary_and_structured(execute_server):
    event = CloudEvent({"type": events.EXECUTE_REQUESTED, "source": "/tests"}, SEED)
    for encode in (to_binary, to_structured):
        headers, body = encode(event)
        r = httpx.post(execute_server.url + "/", headers=headers, content=body, timeout=60)
        assert r.status_code == 200, r.text
        reply = from_http(dict(r.headers), r.content)
        assert reply["type"] == events.EXECUTE_COMPLETED
        assert reply["subject"] == event["id"]
        assert reply.data["stdout"] == "Hello from WASM!\nResult: 52\n"


def test_bad_cloudevents_are_4xx(execute_server):
    wrong_type = CloudEvent({"type": "com.example.other", "source": "/t"}, SEED)
    headers, body = to_binary(wrong_type)
    r = httpx.post(execute_server.url + "/", headers=headers, content=body, timeout=10)
    assert r.status_code == 400 and "not handled here" in r.json()["error"]
    headers = {"ce-specversion": "0.1", "ce-type": events.EXECUTE_REQUESTED, "ce-id": "1",
               "ce-source": "/t", "content-type": "application/json"}  # fmt: skip
    r = httpx.post(execute_server.url + "/", headers=headers, content=b"{}", timeout=10)
    assert r.status_code == 400
    headers = {"ce-specversion": "1.0", "content-type": "application/json"}
    r = httpx.post(execute_server.url + "/", headers=headers, content=b"{}", timeout=10)
    assert r.status_code == 400
    bad_data = CloudEvent({"type": events.EXECUTE_REQUESTED, "source": "/t"}, {"cod": "1"})
    headers, body = to_binary(bad_data)
    r = httpx.post(execute_server.url + "/", headers=headers, content=body, timeout=10)
    reply = from_http(dict(r.headers), r.content)
    assert reply["type"] == events.EXECUTE_FAILED and reply.data["status"] == 422


def test_health_and_metrics(execute_server):
    for path in ("/health", "/health/liveness", "/health/readiness"):
        assert httpx.get(execute_server.url + path, timeout=10).status_code == 200
    post(execute_server, {"code": "while True: pass", "limits": {"deadline_s": 0.2}})
    text = httpx.get(execute_server.url + "/metrics", timeout=10).text
    for name in (
        "wasm_execution_requests_total",
        "wasm_execution_duration_seconds",
        "wasm_execution_errors_total",
        "wasm_execution_timeout_total",
        "wasm_memory_usage_bytes",
        "wasm_cpu_usage_seconds",
    ):
        assert name in text
    assert "wasm_execution_timeout_total 1.0" in text or "wasm_execution_timeout_total 2.0" in text


def test_logs_are_json_with_session_id(execute_server):
    post(execute_server, {"code": "1", "session_id": "logged-session"})
    lines = [ln for ln in execute_server.output().splitlines() if "logged-session" in ln]
    assert lines and json.loads(lines[-1])["session_id"] == "logged-session"


def test_subcall_cap_from_env(execute_server):
    callback = {"url": "http://127.0.0.1:9/subcalls", "token": "t"}
    r = post(execute_server, {"code": "llm_query_batched(['a'] * 6)", "callback": callback})
    assert "at most 5 per cell" in r.json()["error"]["message"]


def test_openapi_document(execute_server):
    doc = httpx.get(execute_server.url + "/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.1")
    assert "post" in doc["paths"]["/execute"]
    assert {"ExecuteRequest", "ExecuteResponse", "Missing", "Problem"} <= doc["components"][
        "schemas"
    ].keys()


def test_a_session_continues_only_with_its_scope(execute_server):
    first = post(execute_server, {"code": "n = 41", "session_id": "scoped"})
    assert first.status_code == 200, first.text
    scope, state = first.json()["scope"], first.json()["state"]
    assert len(scope) >= 16  # made by the pod, as no scope came
    follow = {"code": "print(n + 1)", "session_id": "scoped", "state": {"ref": state["ref"]}}
    without = post(execute_server, follow)
    assert without.status_code == 409 and without.json()["missing"] == ["state"]
    with_it = post(execute_server, {**follow, "scope": scope})
    assert with_it.status_code == 200 and with_it.json()["stdout"] == "42\n"
    for bad in ("short", "s" * 129, "has space in it!!", 12345678901234567):
        r = post(execute_server, {"code": "1", "scope": bad})
        assert r.status_code == 422 and "scope" in r.json()["error"], r.text
