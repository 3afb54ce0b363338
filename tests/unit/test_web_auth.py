"""pacsflow serve's tokens and authentication: hashes on disk, scopes per route, the access log."""

from __future__ import annotations

import json
import logging
import stat

import pytest
from fastapi.testclient import TestClient

from pacsflow.tasks.settings import load_settings
from pacsflow.tasks.web.app import Reader, Writer, create_app
from pacsflow.tasks.web.tokens import Scope, TokenError, TokenStore


@pytest.fixture
def served(tmp_path):
    settings = load_settings(state_root=tmp_path / "state")
    app = create_app(settings)

    @app.get("/read/{uid}")
    def read(uid: str, who: Reader) -> dict:
        return {"who": who.name}

    @app.post("/write")
    def write(who: Writer) -> dict:
        return {"who": who.name}

    return TestClient(app), TokenStore(settings.tokens_path)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_only_hashes_are_stored_owner_only(served):
    _, store = served
    token = store.add("ohif", {Scope.READ})
    text = store.path.read_text()
    assert token not in text and json.loads(text)["tokens"]["ohif"]["scopes"] == ["read"]
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert store.names() == {"ohif": ["read"]}


def test_no_token_401_wrong_scope_403_right_scope_200(served):
    client, store = served
    reader, writer = store.add("viewer", {Scope.READ}), store.add("modality", {Scope.WRITE})
    assert client.get("/read/1.2.3").status_code == 401
    assert client.get("/read/1.2.3", headers=bearer("made-up")).status_code == 401
    assert client.get("/read/1.2.3", headers=bearer(reader)).json() == {"who": "viewer"}
    assert client.post("/write", headers=bearer(reader)).status_code == 403
    assert client.post("/write", headers=bearer(writer)).json() == {"who": "modality"}
    assert client.get("/health").json() == {"status": "ok"}  # the one open route


def test_a_revoked_token_is_refused_by_the_running_service(served):
    client, store = served
    token = store.add("temp", {Scope.READ})
    assert client.get("/read/1", headers=bearer(token)).status_code == 200
    assert store.revoke("temp") and not store.revoke("temp")
    assert client.get("/read/1", headers=bearer(token)).status_code == 401


def test_bad_names_and_empty_scopes_are_refused(served):
    _, store = served
    with pytest.raises(TokenError):
        store.add("a b", {Scope.READ})
    with pytest.raises(TokenError):
        store.add("x", set())


def test_the_access_log_has_the_route_template_not_the_path_or_query(served, caplog):
    client, store = served
    token = store.add("viewer", {Scope.READ})
    with caplog.at_level(logging.INFO, logger="pacsflow.serve.access"):
        client.get("/read/1.2.840.99?PatientName=SECRET", headers=bearer(token))
    [line] = [r.getMessage() for r in caplog.records if r.name == "pacsflow.serve.access"]
    assert line.startswith("GET /read/{uid} 200 ") and line.endswith(" viewer")
    assert "1.2.840.99" not in line and "SECRET" not in line
