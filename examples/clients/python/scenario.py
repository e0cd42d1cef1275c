"""A client developer's first session with boxoffice, through the Python client that
openapi-python-client generates from openapi/openapi.json (the package
`boxoffice_client`; scripts/client-scenarios.sh generates and installs it).

    python3 scenario.py BASE_URL ADMIN_TOKEN BUYER_JWT_KEY

Buys, replays, reuses a key with another quantity, sells out, sends a bad quantity,
holds and confirms, and joins a waiting room until admitted, checking that every
answer arrives typed (a model, an ErrorCode), never as an unparsed None. Exits
non-zero on the first surprise.
"""

import base64
import datetime
import hashlib
import hmac
import json
import sys
import time
import uuid

from boxoffice_client import AuthenticatedClient
from boxoffice_client.api.events import create_event
from boxoffice_client.api.holds import confirm_hold, hold_seats
from boxoffice_client.api.purchases import purchase_event
from boxoffice_client.api.queue import join_queue, queue_status
from boxoffice_client.models import (
    ErrorBody,
    ErrorCode,
    Event,
    HoldCreated,
    HoldRequest,
    NewEvent,
    PurchaseOk,
    PurchaseRequest,
    QueueStatus,
    WaitingRoom,
)


def buyer_token(key: str, sub: str) -> str:
    """An HS256 JWT for `sub`, as the service's buyers' identity provider would sign."""
    b64 = lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"=")
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": sub, "exp": int(time.time()) + 600}).encode())
    sig = b64(hmac.new(key.encode(), head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()


def expect(what: str, got, kind, code: ErrorCode | None = None):
    if not isinstance(got, kind) or (code is not None and got.error != code):
        sys.exit(f"python scenario: {what}: expected {kind.__name__} {code or ''}, got {got!r}")
    print(f"ok   {what}: {kind.__name__}{' ' + code.value if code else ''}")
    return got


def main() -> None:
    base_url, admin_token, buyer_key = sys.argv[1:4]
    admin = AuthenticatedClient(base_url=base_url, token=admin_token)
    buyer = AuthenticatedClient(base_url=base_url, token=buyer_token(buyer_key, "py-buyer"))

    event = create_event.sync(client=admin, body=NewEvent(name="python scenario", total_seats=3))
    event = expect("create an event", event, Event)
    key = str(uuid.uuid4())

    first = purchase_event.sync_detailed(
        event.id, client=buyer, body=PurchaseRequest(quantity=2), idempotency_key=key
    )
    sale = expect("buy 2 of 3", first.parsed, PurchaseOk)
    again = purchase_event.sync_detailed(
        event.id, client=buyer, body=PurchaseRequest(quantity=2), idempotency_key=key
    )
    replay = expect("the same request again", again.parsed, PurchaseOk)
    if replay.purchase_id != sale.purchase_id or again.headers.get("idempotent-replayed") != "true":
        sys.exit(f"python scenario: the replay is not the first sale: {replay!r}")
    print("ok   the replay has the first purchase id and Idempotent-Replayed: true")
    expect(
        "the same key with another quantity",
        purchase_event.sync(event.id, client=buyer, body=PurchaseRequest(quantity=1), idempotency_key=key),
        ErrorBody,
        ErrorCode.IDEMPOTENCY_KEY_REUSED,
    )
    expect(
        "2 more when 1 is left",
        purchase_event.sync(
            event.id, client=buyer, body=PurchaseRequest(quantity=2), idempotency_key=str(uuid.uuid4())
        ),
        ErrorBody,
        ErrorCode.SOLD_OUT,
    )
    expect(
        "quantity 11",
        purchase_event.sync(
            event.id, client=buyer, body=PurchaseRequest(quantity=11), idempotency_key=str(uuid.uuid4())
        ),
        ErrorBody,
        ErrorCode.INVALID_QUANTITY,
    )

    held = expect(
        "hold the last seat",
        hold_seats.sync(event.id, client=buyer, body=HoldRequest(quantity=1), idempotency_key=str(uuid.uuid4())),
        HoldCreated,
    )
    confirmed = expect("confirm it", confirm_hold.sync(event.id, held.hold_id, client=buyer), PurchaseOk)
    if confirmed.purchase_id != held.hold_id or confirmed.seats_remaining != 0:
        sys.exit(f"python scenario: the confirmed sale is not the hold's: {confirmed!r}")

    opens = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    queued = create_event.sync(
        client=admin,
        body=NewEvent(
            name="python queue",
            total_seats=5,
            queue=WaitingRoom(opens_at=opens, admit_per_second=100, admission_seconds=60),
        ),
    )
    queued = expect("create a queued event", queued, Event)
    expect(
        "buy without admission",
        purchase_event.sync(
            queued.id, client=buyer, body=PurchaseRequest(quantity=1), idempotency_key=str(uuid.uuid4())
        ),
        ErrorBody,
        ErrorCode.ADMISSION_REQUIRED,
    )
    status = expect("join the waiting room", join_queue.sync(queued.id, client=buyer), QueueStatus)
    for _ in range(100):
        if status.admitted:
            break
        time.sleep(min(status.poll_after_ms or 1000, 1000) / 1000)
        status = expect("poll", queue_status.sync(queued.id, status.ticket, client=buyer), QueueStatus)
    if not status.admitted:
        sys.exit("python scenario: never admitted")
    expect(
        "buy with the admission",
        purchase_event.sync(
            queued.id,
            client=buyer,
            body=PurchaseRequest(quantity=1),
            idempotency_key=str(uuid.uuid4()),
            admission_token=status.admission_token,
        ),
        PurchaseOk,
    )
    print("python scenario passed")


if __name__ == "__main__":
    main()
