"""aioapns against the mock: REQUESTS notifications (its default pool of up to 10
connections; with one it mostly waits for a free connection), the doorbell
payload; prints {"accepted", "seconds", "cpu_seconds"}."""
import asyncio
import json
import os
import secrets
import ssl
import time

from aioapns import APNs, NotificationRequest, PushType
from aioapns import connection

env = os.environ
# aioapns knows only Apple's hosts: point it at the mock.
connection.APNsProductionClientProtocol.APNS_SERVER = env["MOCK_HOST"]
connection.APNsTLSClientProtocol.APNS_PORT = int(env["MOCK_PORT"])


async def main():
    context = ssl.create_default_context(cafile=env["MOCK_CA"])
    context.set_alpn_protocols(["h2"])
    with open(env["KEY_FILE"]) as f:
        key = f.read()
    client = APNs(key=key, key_id=env["KEY_ID"], team_id=env["TEAM_ID"], topic="com.example.doorbell",
                  ssl_context=context)  # the library default: up to 10 connections
    collapse = secrets.token_hex(8)
    payload = json.loads(env["PAYLOAD"])
    tokens = [secrets.token_hex(32) for _ in range(1000)]

    def request(token):
        return NotificationRequest(
            device_token=token,
            message=payload,  # the doorbell payload ringpush sends (from the bench)
            collapse_key=collapse, time_to_live=60, priority=10, push_type=PushType.ALERT)

    await client.send_notification(request(tokens[0]))
    n = int(env["REQUESTS"])
    cpu0, t0 = time.process_time(), time.perf_counter()
    results = []
    for start in range(0, n, 1000):
        batch = [request(tokens[i % 1000]) for i in range(start, min(n, start + 1000))]
        results += await asyncio.gather(*(client.send_notification(r) for r in batch))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(json.dumps({"accepted": sum(1 for r in results if r.is_successful),
                      "seconds": seconds, "cpu_seconds": cpu}))


asyncio.run(main())
