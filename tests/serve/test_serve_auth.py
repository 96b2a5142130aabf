"""Optional bearer-token authentication (``--api-keys-file``): /v1/* needs one of the keys (401 JSON with
``WWW-Authenticate: Bearer`` otherwise, before the body is read), /healthz stays open, /metrics is open
unless ``metrics_need_key``; keys are never logged."""

from __future__ import annotations

import copy
import logging

import pytest

pytest.importorskip("fastapi")

KEY_A = "k-alpha-0123456789abcdef"
KEY_B = "k-beta-fedcba9876543210"
KEYS_FILE = f"# keys of the test server\n\n  {KEY_A}  \n# {KEY_B}-commented-out\n{KEY_B}\n\n"
SUBJECT = "0" * 32


def _app(tiny_pipe, tmp_path, **config):
    from profusion_rt.runtime import create_runtime
    from profusion_rt.serve import ServeConfig, create_app

    keys = tmp_path / "keys.txt"
    keys.write_text(KEYS_FILE)
    pipe = copy.deepcopy(tiny_pipe)  # the server owns its pipeline
    return create_app(create_runtime(pipe, "torch"), ServeConfig(data_dir=tmp_path / "data", warmup_steps=0,
                                                                 api_keys_file=keys, **config))


@pytest.fixture(scope="module")
def keyed(tiny_pipe, tmp_path_factory):
    from fastapi.testclient import TestClient

    with TestClient(_app(tiny_pipe, tmp_path_factory.mktemp("keyed"))) as client:
        yield client


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _assert_401(response, invalid: bool) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert ('error="invalid_token"' in response.headers["www-authenticate"]) == invalid
    assert response.json()["error"]["type"] == "UnauthorizedError" and response.json()["error"]["message"]


def test_no_key_is_refused_on_every_v1_route(keyed):
    _assert_401(keyed.post("/v1/generate", data={"prompt": "a {S*}"}), invalid=False)
    _assert_401(keyed.post("/v1/subjects", data={"name": "x"}), invalid=False)
    _assert_401(keyed.get(f"/v1/subjects/{SUBJECT}"), invalid=False)
    _assert_401(keyed.delete(f"/v1/subjects/{SUBJECT}"), invalid=False)
    _assert_401(keyed.get("/v1/nothing"), invalid=False)


def test_wrong_keys_are_refused(keyed):
    for header in (_bearer("k-alpha"), _bearer(KEY_A + "x"), _bearer(f"{KEY_B}-commented-out"),
                   _bearer("# keys"), {"Authorization": f"Basic {KEY_A}"}, {"Authorization": KEY_A}):
        response = keyed.get(f"/v1/subjects/{SUBJECT}", headers=header)
        _assert_401(response, invalid=header["Authorization"].startswith("Bearer"))


def test_right_keys_pass(keyed):
    for key in (KEY_A, KEY_B):
        response = keyed.get(f"/v1/subjects/{SUBJECT}", headers=_bearer(key))
        assert response.status_code == 404 and response.json()["error"]["type"] == "UnknownSubjectError"
    bad = keyed.post("/v1/generate", data={"prompt": "a {S*}", "steps": "2"},
                     headers={"authorization": f"bearer {KEY_A}"})  # the scheme is case-insensitive
    assert bad.status_code == 422 and bad.json()["error"]["message"] == "steps: unknown field"


def test_refused_before_the_body_is_read(keyed):
    """Without a key the byte limit never comes into play: 401, not 413."""
    huge = {"content-length": str(10**12), "content-type": "multipart/form-data; boundary=b"}
    _assert_401(keyed.post("/v1/generate", content=b"--b--\r\n", headers=huge), invalid=False)


def test_healthz_docs_and_metrics_stay_open(keyed):
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/docs").status_code == 200
    schema = keyed.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert schema["paths"]["/v1/generate"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]
    metrics = keyed.get("/metrics")
    assert metrics.status_code == 200
    assert 'profusion_http_requests_total{route="/v1/subjects",status="401"}' in metrics.text
    assert "profusion_requests_unauthorized_total" in metrics.text


def test_metrics_need_a_key_when_asked(tiny_pipe, tmp_path):
    from fastapi.testclient import TestClient

    with TestClient(_app(tiny_pipe, tmp_path, metrics_need_key=True)) as client:
        _assert_401(client.get("/metrics"), invalid=False)
        _assert_401(client.get("/metrics", headers=_bearer("nope")), invalid=True)
        assert client.get("/metrics", headers=_bearer(KEY_B)).status_code == 200
        assert client.get("/healthz").status_code == 200


def test_keys_are_never_logged(keyed, caplog):
    with caplog.at_level(logging.DEBUG):
        keyed.get(f"/v1/subjects/{SUBJECT}", headers=_bearer(KEY_A))
        keyed.get(f"/v1/subjects/{SUBJECT}", headers=_bearer(KEY_B + "-wrong"))
        keyed.get(f"/v1/subjects/{SUBJECT}")
    assert "refused GET" in caplog.text  # the refusals are logged ...
    assert KEY_A not in caplog.text and KEY_B not in caplog.text and "k-alpha" not in caplog.text  # ... not the keys


def test_keys_file_problems_are_one_line_errors(tmp_path, caplog):
    from profusion_rt.core.errors import InvalidParameterError
    from profusion_rt.serve.auth import load_api_keys

    with pytest.raises(InvalidParameterError, match="cannot read the API keys file"):
        load_api_keys(tmp_path / "missing.txt")
    only_comments = tmp_path / "empty.txt"
    only_comments.write_text("# nothing here\n\n")
    with pytest.raises(InvalidParameterError, match="holds no key"):
        load_api_keys(only_comments)
    spaced = tmp_path / "spaced.txt"
    spaced.write_text("secret part-two\n")
    with pytest.raises(InvalidParameterError, match="line 1") as exc:
        load_api_keys(spaced)
    assert "secret" not in str(exc.value)
    good = tmp_path / "good.txt"
    good.write_text(KEYS_FILE)
    with caplog.at_level(logging.DEBUG):
        keys = load_api_keys(good)
    assert len(keys) == 2 and keys.check(KEY_A) and keys.check(KEY_B) and not keys.check(None)
    assert KEY_A not in repr(keys) and KEY_A not in caplog.text


def test_cli_checks_the_keys_options_before_loading(tmp_path, capsys):
    from profusion_rt.cli import main

    assert main(["serve", "--api-keys-file", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read the API keys file") and "\n" not in err
    assert main(["serve", "--metrics-need-key"]) == 2
    assert "needs --api-keys-file" in capsys.readouterr().err
