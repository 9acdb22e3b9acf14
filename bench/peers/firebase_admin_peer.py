"""firebase-admin (Python) against mock-fcm: REQUESTS messages through
messaging.send_each_async, the library's HTTP/2 path (httpx: one HTTP/2 connection, at
most 100 streams at a time, httpcore's own limit; the sync send_each is HTTP/1.1, which
the mock serves only for its token endpoint, though Google's messages:send takes it).
Two calls of 500 messages at once (1,000 in flight from the caller, as the other legs;
500 is the most one call takes), each the message ringpush sends (MESSAGE, from the
bench) to its own token; prints {"accepted", "seconds", "cpu_seconds"} (this process's
CPU, all threads, as the other peers).

What is overridden, and nothing else:
- the send URL: _MessagingService.FCM_URL (https://fcm.googleapis.com/v1/projects/{0}/
  messages:send) is pointed at the mock's host:port, the same path;
- the CA: REQUESTS_CA_BUNDLE and SSL_CERT_FILE name the mock's ca.pem (firebase-admin.sh).
The OAuth token comes from the service account's own token_uri (the mock's, written by
`ringpush mock-fcm --generate-credentials`), as in production; the library's own scopes,
assertion, headers, retries and HTTP/2 client are used as they are (mock-fcm takes what
Google takes from it: the cloud-platform scope, Google's token endpoint as the assertion's
audience, android.priority "high").
"""
import asyncio
import json
import os
import secrets
import time
import warnings

import firebase_admin
from firebase_admin import credentials, messaging

env = os.environ
messaging._MessagingService.FCM_URL = env["MOCK_URL"] + "/v1/projects/{0}/messages:send"

BATCH = 500
# ringpush stores FCM registration tokens and sends them as message.token (the mock, like
# FCM HTTP v1, takes those); firebase-admin 7.7 marks Message.token deprecated in favour of
# Firebase installation IDs (Message.fid) and warns on every message.
warnings.filterwarnings("ignore", "Message.token is deprecated", DeprecationWarning)


def message_from(body, token):
    """The message ringpush sends (its JSON, from the bench), as firebase-admin's types."""
    m = body["message"]
    android, note = m["android"], m["android"]["notification"]
    return messaging.Message(
        token=token,
        notification=messaging.Notification(title=m["notification"]["title"],
                                            body=m["notification"]["body"]),
        data=m["data"],
        android=messaging.AndroidConfig(
            priority="high",
            ttl=int(android["ttl"].rstrip("s")),
            collapse_key=android["collapse_key"],
            notification=messaging.AndroidNotification(
                channel_id=note["channel_id"], tag=note["tag"], sound=note["sound"])))


async def main():
    firebase_admin.initialize_app(credentials.Certificate(env["CREDENTIALS"]))
    body = json.loads(env["MESSAGE"])
    tokens = [secrets.token_urlsafe(24) + ":APA91b" + secrets.token_urlsafe(100)
              for _ in range(1000)]
    first = await messaging.send_each_async([message_from(body, tokens[0])])  # token, connect
    if first.success_count != 1:
        raise SystemExit(f"the first send failed: {first.responses[0].exception}")
    n = int(env["REQUESTS"])
    cpu0, t0 = time.process_time(), time.perf_counter()
    accepted = 0
    for start in range(0, n, 2 * BATCH):
        batches = []
        for b in range(start, min(n, start + 2 * BATCH), BATCH):
            batches.append([message_from(body, tokens[i % 1000])
                            for i in range(b, min(n, b + BATCH))])
        results = await asyncio.gather(*(messaging.send_each_async(b) for b in batches))
        accepted += sum(r.success_count for r in results)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(json.dumps({"accepted": accepted, "seconds": seconds, "cpu_seconds": cpu}))


asyncio.run(main())
