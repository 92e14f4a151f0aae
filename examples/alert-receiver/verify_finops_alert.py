import hashlib
import hmac
import json
import time

TOLERANCE = 300  # seconds: refuse an alert signed further from our clock than this (either side)
REMEMBER = 30 * 86400  # seconds to remember alert ids: finops re-delivers an alert while it retries


class Rejected(Exception):
    """Not a genuine, fresh finops alert: answer 400 and do nothing."""


class Duplicate(Exception):
    """Seen before (a re-delivery or a replay): answer 200 and do nothing more."""


class FinopsAlertVerifier:
    def __init__(self, secret, tolerance=TOLERANCE, remember=REMEMBER, clock=time.time):
        self._secret = secret.encode()
        self._tolerance, self._remember, self._clock = tolerance, remember, clock
        self._seen = {}  # alert id -> when first accepted (use a shared store with several receivers)

    def verify(self, raw_body, timestamp_header, signature_header):
        """raw_body: the request body exactly as received (bytes); the two headers' values:
        X-Finops-Timestamp and X-Finops-Signature. Returns the alert (a dict)."""
        fields = [part.strip().partition("=") for part in (signature_header or "").split(",")]
        stamps = [value for key, _, value in fields if key == "t"]
        macs = [value for key, _, value in fields if key == "v1"]
        if len(stamps) != 1 or stamps[0] != timestamp_header or not stamps[0].isdigit() or len(stamps[0]) > 12:
            raise Rejected("missing or inconsistent X-Finops-Timestamp / X-Finops-Signature")
        signed = stamps[0].encode() + b"." + raw_body
        expected = hmac.new(self._secret, signed, hashlib.sha256).hexdigest()
        if not any(hmac.compare_digest(expected, mac.lower()) for mac in macs):
            raise Rejected("bad X-Finops-Signature")
        now = self._clock()
        if abs(now - int(stamps[0])) > self._tolerance:
            raise Rejected("stale X-Finops-Timestamp (or our clock is wrong)")
        alert = json.loads(raw_body)
        self._seen = {i: t for i, t in self._seen.items() if now - t < self._remember}
        if alert["id"] in self._seen:
            raise Duplicate(alert["id"])
        self._seen[alert["id"]] = now
        return alert

    def forget(self, alert_id):
        """Processing failed after verify(): answer 500 and call this, so the retry is accepted."""
        self._seen.pop(alert_id, None)
