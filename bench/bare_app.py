"""The two baselines of bench/throughput.py, served by the Procfile's own gunicorn line.

* ``POST /twilio/webhook``: verify the X-Twilio-Signature with the SDK's RequestValidator and
  answer empty TwiML. Nothing else: no database, no queue. This is the ceiling of the framework
  and server (Flask on gunicorn with the Procfile's workers x threads) on this machine.
* ``POST /naive``: the design most tutorials show. Verify the signature, then call Twilio's
  ``messages.create`` *inside the request* (against the simulator, with the same API latency the
  real stack gets) and answer only when Twilio has. Its throughput is bounded by
  web workers x threads / Twilio latency, whatever the CPU does.

Configured by environment (set by bench/throughput.py): TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN,
TWILIO_WHATSAPP_NUMBER, TWILIO_API_URL, and BENCH_PUBLIC_BASE (the URL prefix requests are
signed over, e.g. http://127.0.0.1:5001). Not part of the bot; never imported by it.
"""
from __future__ import annotations

import os
import threading

from flask import Flask, Response, abort, request
from twilio.http.http_client import TwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client

EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'

app = Flask(__name__)
_validator = RequestValidator(os.environ["TWILIO_AUTH_TOKEN"])
_public_base = os.environ["BENCH_PUBLIC_BASE"].rstrip("/")
_local = threading.local()


def _check_signature() -> None:
    """403 unless the request carries Twilio's signature over the public URL and the form."""
    url = _public_base + request.full_path.rstrip("?")
    if not _validator.validate(url, request.form, request.headers.get("X-Twilio-Signature", "")):
        abort(403)


def _client() -> Client:
    """One SDK client per gunicorn thread (its requests.Session keeps the connection alive)."""
    client = getattr(_local, "client", None)
    if client is None:
        client = Client(os.environ["TWILIO_ACCOUNT_SID"], os.environ["TWILIO_AUTH_TOKEN"],
                        http_client=TwilioHttpClient(timeout=15))
        client.api.base_url = os.environ["TWILIO_API_URL"]
        _local.client = client
    return client


@app.post("/twilio/webhook")
def webhook() -> Response:
    """The framework's ceiling: signature check, empty TwiML."""
    _check_signature()
    return Response(EMPTY_TWIML, mimetype="text/xml")


@app.post("/naive")
def naive() -> Response:
    """The tutorial design: reply by calling Twilio before answering the webhook."""
    _check_signature()
    _client().messages.create(to=request.form["From"], from_=os.environ["TWILIO_WHATSAPP_NUMBER"],
                              body="Thanks, we got your message.")
    return Response(EMPTY_TWIML, mimetype="text/xml")
