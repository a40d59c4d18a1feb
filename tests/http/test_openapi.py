"""GET /openapi.json, and schemathesis fuzzing every operation it describes (docs/ARCHITECTURE.md, "HTTP contract")."""
from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, Iterable

import pytest
import schemathesis
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation import GenerationMode
from flask import Flask
from hypothesis import HealthCheck, settings
from jsonschema import Draft202012Validator, ValidationError
from openapi_spec_validator import validate as validate_openapi
from schemathesis.specs.openapi.checks import positive_data_acceptance

from bot.clock import isoformat, utcnow
from bot.http.openapi import document
from bot.http.schemas import ConsentBody, NotifyBody, parse_notify, validate
from flows import registry
from tests.conftest import API_TOKEN, CONTENT_SIDS, make_contact, run_queue, status_form
from tests.http.test_hardening import needs_the_token

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
#: Cases hypothesis generates per operation in schemathesis's fuzzing phase (its examples and
#: coverage phases add their own): about 10 s for all five operations on SQLite.
FUZZ_EXAMPLES_PER_OPERATION = 300


# ---------------------------------------------------------------- the document


def test_openapi_json_is_public_and_a_valid_openapi_31_document(client):
    response = client.get("/openapi.json")  # no token, like /healthz
    assert response.status_code == 200 and response.is_json
    served = response.get_json()
    assert served["openapi"].startswith("3.1")
    validate_openapi(served)  # raises on any departure from the OpenAPI 3.1 meta-schema
    assert served == document()


def test_schemathesis_loads_the_served_document(app):
    loaded = schemathesis.openapi.from_wsgi("/openapi.json", app)
    operations = {f"{op.method.upper()} {op.path}" for op in (r.ok() for r in loaded.get_all_operations())}
    assert operations == {"POST /notify", "GET /messages/{message_id}", "GET /conversations/{conversation_id}",
                          "GET /contacts/{phone}", "PUT /contacts/{phone}/consent", "GET /events",
                          "POST /events/{event_id}/retry", "POST /events/retry", "POST /contacts/{phone}/handoff",
                          "DELETE /contacts/{phone}/handoff", "PUT /users/{user_id}", "GET /users/{user_id}",
                          "POST /broadcasts", "GET /broadcasts/{broadcast_id}",
                          "POST /broadcasts/{broadcast_id}/cancel", "POST /messages/{message_id}/cancel",
                          "POST /conversations/{conversation_id}/cancel", "GET /metrics"}


@pytest.mark.parametrize("path, method, model", [("/notify", "post", NotifyBody),
                                                 ("/contacts/{phone}/consent", "put", ConsentBody)])
def test_request_bodies_are_described_by_the_models_that_validate_them(client, path, method, model):
    served = client.get("/openapi.json").get_json()
    body = served["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": f"#/components/schemas/{model.__name__}"}
    assert served["components"]["schemas"][model.__name__] == model.model_json_schema(
        ref_template="#/components/schemas/{model}")


def test_every_route_behind_the_token_is_described_and_nothing_else(app):
    """A route added without a line in bot/http/openapi.py's table fails here (and a stale line)."""
    routed = set()
    for rule in app.url_map.iter_rules():
        if needs_the_token(rule.endpoint):
            path = rule.rule.replace("<", "{").replace(">", "}")
            routed |= {f"{method.lower()} {path}" for method in rule.methods - {"HEAD", "OPTIONS"}}
    described = {f"{method} {path}" for path, methods in document()["paths"].items() for method in methods}
    assert described == routed


def test_the_documented_examples_are_accepted():
    examples = document()["components"]["schemas"]["NotifyBody"]["examples"]
    assert {"body", "template", "flow", "media_url"} <= {key for example in examples for key in example}
    for example in examples:
        parse_notify(example, CONTENT_SIDS, registry())
    for example in document()["components"]["schemas"]["ConsentBody"]["examples"]:
        validate(ConsentBody, example)


# ---------------------------------------------------------------- schemathesis against the app


class RunningApp:
    """The WSGI app schemathesis calls: the running test's Flask app (the `app` fixture builds one
    per test, after schemathesis has made its tests at collection time)."""

    app: Flask | None = None

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        assert self.app is not None, "use the `fuzzed_app` fixture"
        return self.app(environ, start_response)


RUNNING = RunningApp()
schema = schemathesis.openapi.from_dict(document())
schema.app = RUNNING


@pytest.fixture
def fuzzed_app(app):
    """The app under schemathesis, with one contact who wrote recently, so that the document's
    examples (all to +15551234567) are accepted and the 202 answers are checked too."""
    with app.app_context():
        make_contact("+15551234567")
    app.config["METRICS_TOKEN"] = "fuzz-metrics-token"  # /metrics answers 401 to the backend's token, not 404
    RUNNING.app = app
    yield app
    RUNNING.app = None


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_operation_survives_schemathesis(fuzzed_app, case):
    """No answer is a 5xx, each has a documented status, content type and schema, invalid input is
    refused, and every operation refuses a request without the token.

    Not checked: that every schema-valid request is accepted. Validity beyond the schema's reach
    is refused with a 400 or 422 on purpose: a number's possible length in its country, template
    and flow names configured at run time, the 24-hour window."""
    case.call_and_validate(headers=auth_for(case), excluded_checks=[positive_data_acceptance])


def auth_for(case) -> dict[str, str]:
    """The token, unless the case leaves a header out on purpose (a negative case that drops
    Authorization): added back, it would make the case valid and its acceptance look like a bug."""
    components = case.meta.components if case.meta is not None else {}
    header = components.get(ParameterLocation.HEADER)
    if header is not None and header.mode == GenerationMode.NEGATIVE and "Authorization" not in (case.headers or {}):
        return {}
    return AUTH


# ---------------------------------------------------------------- real answers against the document


def matches_documented_schema(name: str, instance: Any) -> None:
    """Validate `instance` against components/schemas/`name` of the served document (JSON Schema 2020-12)."""
    Draft202012Validator({**document(), "$ref": f"#/components/schemas/{name}"}).validate(instance)


def test_real_answers_match_their_documented_schemas(app, client, auth, twilio, post_webhook):
    """The fuzzer rarely reaches a stored message or conversation (it guesses ids); these do, so
    every 200 and 202 shape is checked against the document: sent, called back, a flow started."""
    with app.app_context():
        make_contact("+15551234567")
    accepted = client.post("/notify", json={"to": "+15551234567", "body": "hi"}, headers=auth)
    assert accepted.status_code == 202
    matches_documented_schema("MessageAccepted", accepted.get_json())
    assert run_queue() == 1
    post_webhook(status_form(twilio.messages[0]["sid"], "failed", error_code=63016))
    message = client.get(accepted.headers["Location"], headers=auth).get_json()
    assert message["status"] == "failed" and message["events"]
    matches_documented_schema("Message", message)

    started = client.post("/notify", json={"to": "+15551234567", "flow": "feedback"}, headers=auth)
    assert started.status_code == 202
    matches_documented_schema("ConversationAccepted", started.get_json())
    run_queue()
    conversation = client.get(started.headers["Location"], headers=auth).get_json()
    assert conversation["status"] == "active"
    matches_documented_schema("Conversation", conversation)
    late = client.post(started.headers["Location"] + "/cancel", headers=auth)
    assert late.status_code == 409
    matches_documented_schema("ConversationCancelRefused", late.get_json())
    held = client.post("/notify", json={"to": "+15551234567", "flow": "feedback",
                                        "send_at": isoformat(utcnow() + timedelta(hours=1))}, headers=auth)
    assert held.status_code == 202 and held.get_json()["held_reason"] == "scheduled"
    matches_documented_schema("ConversationAccepted", held.get_json())
    canceled = client.post(held.headers["Location"] + "/cancel", headers=auth)
    assert canceled.status_code == 200 and canceled.get_json()["status"] == "cancelled"
    matches_documented_schema("Conversation", canceled.get_json())
    assert message["locale"] is None  # free text: nothing was resolved

    consent = client.put("/contacts/+15551234567/consent", json={"consent": "opted_out", "note": "asked"}, headers=auth)
    assert consent.status_code == 200 and consent.get_json()["consent_history"]
    matches_documented_schema("Contact", consent.get_json())
    refused = client.post("/notify", json={"to": "+15557654321", "body": "hi"}, headers=auth)
    assert refused.status_code == 422
    matches_documented_schema("Error", refused.get_json())
    with pytest.raises(ValidationError):  # the check itself can fail
        matches_documented_schema("Message", {**message, "status": "teleported"})
