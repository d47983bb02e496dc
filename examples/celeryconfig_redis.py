"""A Celery app with encrypted messages on Redis: configuration only, no kombu_envelope import.

    kombu-envelope keygen ./dev.key
    KOMBU_ENVELOPE_KEY_URI=local://$PWD/dev.key celery -A celeryconfig_redis worker --loglevel=INFO
    KOMBU_ENVELOPE_KEY_URI=local://$PWD/dev.key python -c "from celeryconfig_redis import charge; print(charge.delay('alice', '4111-1111-1111-1111').get(timeout=10))"

In production, point envelope_key_uri at a key service instead, e.g.
'aws-kms://alias/orders' or 'vault://transit/keys/orders' (docs/key-services.md).
"""

import os

from celery import Celery

app = Celery("orders", broker=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    result_backend=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    task_serializer="envelope",
    result_serializer="envelope",
    accept_content=["envelope"],
    # The key: here from KOMBU_ENVELOPE_KEY_URI; or set envelope_key_uri = "..." in this file.
    envelope_encryption_context={"app": "orders"},
    # Keep messages that cannot be decrypted (outage: retried; tampered: dead-lettered).
    worker_consumer="kombu_envelope.consumer:EnvelopeConsumer",
)


@app.task
def charge(customer: str, card: str) -> str:
    return f"charged {customer}'s card ending {card[-4:]}"
