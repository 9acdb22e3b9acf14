// @parse/node-apn against the mock: REQUESTS notifications over one provider (one HTTP/2
// connection), the doorbell payload; prints {"accepted", "seconds", "cpu_seconds"}.
const apn = require('@parse/node-apn');
const fs = require('fs');
const crypto = require('crypto');

const env = process.env;
const requests = Number(env.REQUESTS);
const provider = new apn.Provider({
  token: { key: fs.readFileSync(env.KEY_FILE), keyId: env.KEY_ID, teamId: env.TEAM_ID },
  address: env.MOCK_HOST,
  port: Number(env.MOCK_PORT),
  ca: fs.readFileSync(env.MOCK_CA),
  production: true,
});
const note = new apn.Notification();
// The doorbell payload ringpush sends, byte for byte (from the bench).
note.rawPayload = JSON.parse(env.PAYLOAD);
note.topic = 'com.example.doorbell';
note.pushType = 'alert';
note.priority = 10;
note.collapseId = crypto.randomBytes(8).toString('hex');
note.expiry = Math.floor(Date.now() / 1000) + 60;
const tokens = Array.from({ length: 1000 }, () => crypto.randomBytes(32).toString('hex'));

(async () => {
  await provider.send(note, tokens[0]); // connect
  const cpu0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  let accepted = 0;
  for (let sent = 0; sent < requests; sent += 1000) {
    const batch = tokens.slice(0, Math.min(1000, requests - sent));
    const result = await provider.send(note, batch);
    accepted += result.sent.length;
  }
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const cpu = process.cpuUsage(cpu0);
  console.log(JSON.stringify({ accepted, seconds, cpu_seconds: (cpu.user + cpu.system) / 1e6 }));
  provider.shutdown();
})();
