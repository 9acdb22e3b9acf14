//! The peer clients: scripts under `bench/peers/` (each installs its package on first use
//! and is not part of `cargo test`) run against a mock process; each prints one JSON line,
//! `{"accepted", "seconds", "cpu_seconds"}`, its CPU its own process's.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;

use super::report::Peer;

/// Runs `script` with `env` and `REQUESTS` = `n`; a script that fails or accepts fewer than
/// `n` is reported unmeasured, with the last line it wrote to stderr.
pub(super) async fn peer(name: &str, script: &str, env: &[(&str, OsString)], n: usize) -> Peer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/peers");
    let output = tokio::process::Command::new("bash")
        .arg(dir.join(script))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("REQUESTS", n.to_string())
        .stderr(Stdio::piped())
        .output()
        .await;
    let failed = |note: String| Peer {
        name: name.into(),
        per_s: None,
        cpu_us: None,
        note: Some(note),
    };
    let output = match output {
        Ok(o) => o,
        Err(e) => return failed(format!("could not run {script}: {e}")),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_default();
    let parsed: Result<HashMap<String, f64>, _> = serde_json::from_str(line);
    match parsed {
        Ok(m) if m.get("accepted").copied() == Some(n as f64) => {
            let secs = m["seconds"];
            Peer {
                name: name.into(),
                per_s: Some(n as f64 / secs),
                cpu_us: Some(m["cpu_seconds"] / n as f64 * 1e6),
                note: None,
            }
        }
        _ => {
            let err = String::from_utf8_lossy(&output.stderr);
            failed(format!(
                "{script} gave no result: {}",
                err.lines().last().unwrap_or("no output")
            ))
        }
    }
}
