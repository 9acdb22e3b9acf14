//! The documentation's operator instructions, run as written, so they cannot rot; and the
//! documentation's links, checked, so that it stays one set of files that stand on their own.
//!
//! Which blocks: a fenced block of README.md or of a guide in docs/ ([`DOCS`]) is tested when
//! the line right before its opening fence is `<!-- tested: KIND -->` (an HTML comment,
//! invisible on GitHub). The kinds:
//!
//! - `operator` (```sh): docs/operators.md, "Against the mock, as separate processes". Every
//!   such block, in the order of the files, goes into one bash script (`set -eu` first, so a failing command
//!   fails it) run in an empty temporary directory, in a process group of its own, with the
//!   `ringpush` under test first on `PATH`. The variables the guide says a reader may set
//!   beforehand are set to a scratch world: `RINGPUSH_QUEUE_PREFIX=t-<hex>`,
//!   `RINGPUSH_DATABASE_URL` naming a schema `t_<hex>`, and free ports in `MOCK_PORT`,
//!   `MOCK_FCM_PORT`, `WORKER_METRICS`, `FEEDBACK_METRICS`, `PURGE_METRICS`. The script
//!   starts the mock APNs, migrates, registers phones through `psql`, starts the mock FCM and
//!   registers an Android phone, starts worker, feedback and purge in the background and
//!   rings; the test then checks each process answers `/healthz`, the owner's iPhone and
//!   Android phone were pushed (the worker's `/metrics`) and the token the mock calls
//!   Unregistered is gone from `push_tokens`.
//! - `check` (```sh): run once the ring is through; its output must show what the guide
//!   says it shows.
//! - `sql` (```sql, docs/apps.md): each statement is prepared in the migrated schema (tables, columns and
//!   types must exist as written).
//! - `dead-letters` (```sh): run after a malformed ring was dead-lettered, with the queue
//!   names' `ringpush.` turned into the scratch prefix; it must show `x-ringpush-error`.
//! - `teardown` (```sh): run once the processes are stopped; afterwards no queue of the
//!   scratch prefix and no user of the walkthrough may be left.
//!
//! At the end (also when the test fails) the process group is stopped (SIGTERM, then
//! SIGKILL), the queues and the schema are removed and the directory deleted; on failure
//! the script's output and every process's log are printed first.
//!
//! The links: every relative link of README.md and docs/*.md names a file that exists, and an
//! anchor a heading of that file; README links every guide; and no file of the repository
//! points at the design folder outside it that the project used to rely on.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use ringpush::broker::{self, Names};
use ringpush::token::random_hex;

use crate::support::{self, TestDb, TestQueues};

/// The files whose tested blocks run, in this order (the operator blocks are one script).
const DOCS: [(&str, &str); 6] = [
    ("README.md", include_str!("../../README.md")),
    ("docs/design.md", include_str!("../../docs/design.md")),
    ("docs/operators.md", include_str!("../../docs/operators.md")),
    ("docs/gateways.md", include_str!("../../docs/gateways.md")),
    ("docs/apps.md", include_str!("../../docs/apps.md")),
    ("docs/providers.md", include_str!("../../docs/providers.md")),
];

/// One tested block of the documentation.
#[derive(Debug, Clone)]
struct Block {
    /// The file, relative to the repository.
    file: &'static str,
    kind: String,
    lang: String,
    body: String,
    /// 1-based line of the opening fence.
    line: usize,
}

/// The blocks of `file` (its text `text`) marked `<!-- tested: KIND -->`, in its order.
fn tested_blocks(file: &'static str, text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let marker = lines[i]
            .trim()
            .strip_prefix("<!-- tested:")
            .and_then(|m| m.strip_suffix("-->"));
        let Some(kind) = marker else {
            i += 1;
            continue;
        };
        let fence = lines.get(i + 1).copied().unwrap_or_default();
        let lang = fence.strip_prefix("```").unwrap_or_else(|| {
            panic!(
                "{file}:{}: the line after `<!-- tested:{kind}-->` must open a code block",
                i + 1
            )
        });
        let start = i + 2;
        let end = (start..lines.len())
            .find(|&j| lines[j].trim_end() == "```")
            .unwrap_or_else(|| panic!("{file}:{}: the block never closes", i + 2));
        blocks.push(Block {
            file,
            kind: kind.trim().to_owned(),
            lang: lang.trim().to_owned(),
            body: lines[start..end].join("\n") + "\n",
            line: i + 2,
        });
        i = end + 1;
    }
    blocks
}

fn of_kind<'a>(blocks: &'a [Block], kind: &str, lang: &str) -> Vec<&'a Block> {
    let found: Vec<&Block> = blocks.iter().filter(|b| b.kind == kind).collect();
    assert!(
        !found.is_empty(),
        "the documentation has no `tested: {kind}` block"
    );
    for b in &found {
        assert_eq!(
            b.lang, lang,
            "{}:{}: a `{kind}` block is ```{lang}",
            b.file, b.line
        );
    }
    found
}

fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<_> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().unwrap().port())
}

/// The scratch world the snippets run in; stops their processes and removes everything when
/// dropped.
struct World {
    dir: PathBuf,
    prefix: String,
    /// The mock APNs, the three processes' metrics, the mock FCM.
    ports: [u16; 5],
    /// The process group of the bash running the operator blocks.
    group: Option<u32>,
    names: Names,
    // Dropped after the processes are stopped: queues, then the schema.
    _queues: TestQueues,
    db: TestDb,
}

impl World {
    async fn new() -> Self {
        let id = random_hex(6);
        let prefix = format!("t-{id}");
        let names = Names::new(&prefix);
        let queues = TestQueues(names.clone());
        let db = TestDb::new().await;
        let dir = std::env::temp_dir().join(format!("ringpush-readme-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        eprintln!(
            "the documentation's world: queue prefix {prefix}, schema {}, directory {}",
            db.schema,
            dir.display()
        );
        Self {
            dir,
            prefix,
            ports: free_ports::<5>(),
            group: None,
            names,
            _queues: queues,
            db,
        }
    }

    fn metrics(&self, process: usize) -> String {
        format!("127.0.0.1:{}", self.ports[1 + process])
    }

    /// bash in the scratch directory with the scratch world in its environment.
    fn bash(&self, script: &str) -> Command {
        let path = self.dir.join(script);
        let bin = Path::new(env!("CARGO_BIN_EXE_ringpush")).parent().unwrap();
        let mut cmd = Command::new("bash");
        cmd.arg(&path).current_dir(&self.dir).stdin(Stdio::null());
        // Nothing of the caller's ringpush setup leaks in but where the broker is.
        for (var, _) in std::env::vars() {
            if var.starts_with("RINGPUSH_") && var != "RINGPUSH_AMQP_URL" {
                cmd.env_remove(var);
            }
        }
        cmd.env(
            "PATH",
            format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("RINGPUSH_QUEUE_PREFIX", &self.prefix)
        .env("RINGPUSH_DATABASE_URL", &self.db.url)
        .env("MOCK_PORT", self.ports[0].to_string())
        .env("MOCK_FCM_PORT", self.ports[4].to_string())
        .env("WORKER_METRICS", self.metrics(0))
        .env("FEEDBACK_METRICS", self.metrics(1))
        .env("PURGE_METRICS", self.metrics(2));
        cmd
    }

    fn write_script(&self, name: &str, blocks: &[&Block]) {
        let mut script = String::from("set -eu\n");
        for b in blocks {
            script.push_str(&format!("# {}:{}\n{}", b.file, b.line, b.body));
        }
        std::fs::write(self.dir.join(name), script).unwrap();
    }

    /// Runs a script to its end and returns its output; fails the test if it fails.
    fn run(&self, name: &str, blocks: &[&Block]) -> String {
        self.write_script(name, blocks);
        let out = self.bash(name).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{}'s block at line {} fails ({}):\n{stdout}\n{}",
            blocks[0].file,
            blocks[0].line,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Sends SIGTERM to the operator script's process group, waits for it to go (30 s), then
    /// SIGKILL.
    fn stop_group(&mut self) {
        let Some(group) = self.group.take() else {
            return;
        };
        let signal = |sig: &str| {
            Command::new("kill")
                .args([sig, "--", &format!("-{group}")])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !signal("-TERM") {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while signal("-0") {
            if Instant::now() > deadline {
                eprintln!(
                    "the documentation's processes still running 30 s after SIGTERM: SIGKILL"
                );
                signal("-KILL");
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn dump_logs(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".log") || name.ends_with(".out") {
                let text = std::fs::read_to_string(&f).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                eprintln!("---- {name} (last {} lines)", tail.len());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop_group();
        if std::thread::panicking() {
            self.dump_logs();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// GET `path` on `addr`: (status, body); `None` while nothing answers.
async fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let r = ringpush::http::get(&format!("http://{addr}{path}"), Duration::from_secs(5))
        .await
        .ok()?;
    Some((r.status, r.body))
}

/// Waits up to 60 s for `check` to hold; fails the test with `what` otherwise.
async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn tested_blocks_are_found_and_kept_apart() {
    let readme = "x\n<!-- tested: operator -->\n```sh\na\nb\n```\n```sh\nnot tested\n```\n\
                  <!-- tested: sql -->\n```sql\nSELECT 1;\n```\n";
    let blocks = tested_blocks("x.md", readme);
    assert_eq!(blocks.len(), 2, "{blocks:?}");
    assert_eq!(
        (blocks[0].kind.as_str(), blocks[0].lang.as_str()),
        ("operator", "sh")
    );
    assert_eq!((blocks[0].body.as_str(), blocks[0].line), ("a\nb\n", 3));
    assert_eq!(
        (blocks[1].kind.as_str(), blocks[1].body.as_str()),
        ("sql", "SELECT 1;\n")
    );
}

#[tokio::test]
async fn the_operator_instructions_work_as_written() {
    let blocks: Vec<Block> = DOCS
        .iter()
        .flat_map(|(file, text)| tested_blocks(file, text))
        .collect();
    let operator = of_kind(&blocks, "operator", "sh");
    let check = of_kind(&blocks, "check", "sh");
    let sql = of_kind(&blocks, "sql", "sql");
    let dead_letters = of_kind(&blocks, "dead-letters", "sh");
    let teardown = of_kind(&blocks, "teardown", "sh");
    let script: String = operator.iter().map(|b| b.body.as_str()).collect();
    for needed in [
        "ringpush mock-apns",
        "ringpush mock-fcm",
        "ringpush migrate",
        "psql",
        "ringpush worker",
        "ringpush feedback",
        "ringpush purge",
        "ringpush ring",
    ] {
        assert!(
            script.contains(needed),
            "the operator blocks no longer run `{needed}`"
        );
    }
    let stale = script
        .split_whitespace()
        .skip_while(|w| *w != "--unregistered")
        .nth(1)
        .expect("the mock is started with --unregistered <token>")
        .to_owned();

    let mut world = World::new().await;

    // The operator blocks, in a process group of their own (its background processes stay
    // in it after bash exits).
    world.write_script("operator.sh", &operator);
    let out = std::fs::File::create(world.dir.join("operator.out")).unwrap();
    let child = {
        use std::os::unix::process::CommandExt;
        world
            .bash("operator.sh")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap()
    };
    world.group = Some(child.id());
    let mut child = child;
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the operator blocks did not finish within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "the operator blocks fail: {status}");

    // Every process it left running answers on its own metrics port (one that stopped at
    // start, e.g. on a wrong flag, says `error: …` in its log: no need to wait).
    for (i, process) in ["worker", "feedback", "purge"].iter().enumerate() {
        let addr = world.metrics(i);
        let log = world.dir.join(format!("{process}.log"));
        wait_for(&format!("{process} answering /healthz on {addr}"), || {
            let (addr, log) = (addr.clone(), log.clone());
            async move {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if let Some(error) = text.lines().find(|l| l.starts_with("error:")) {
                    panic!("{process} stopped at start: {error}");
                }
                matches!(get(&addr, "/healthz").await, Some((200, _)))
            }
        })
        .await;
    }

    // The ring reached the owner's iPhone and Android phone through the mocks; the sharee's
    // phone was rejected.
    let worker = world.metrics(0);
    wait_for(
        "the worker's ringpush_notifications_total: 2 accepted (1 through FCM), 1 rejected",
        || {
            let worker = worker.clone();
            async move {
                let Some((_, body)) = get(&worker, "/metrics").await else {
                    return false;
                };
                [
                    r#"ringpush_notifications_total{outcome="accepted"} 2"#,
                    r#"ringpush_notifications_total{outcome="rejected"} 1"#,
                    r#"ringpush_platform_notifications_total{app="default",platform="fcm",outcome="accepted"} 1"#,
                ]
                .iter()
                .all(|want| body.lines().any(|l| l == *want))
            }
        },
    )
    .await;

    // The stale token was purged from the scratch schema; the other one is kept.
    let pool = ringpush::db::pool(&world.db.url, 2, Duration::from_secs(5)).unwrap();
    let tokens = || async {
        let client = pool.get().await.unwrap();
        client
            .query("SELECT token FROM push_tokens ORDER BY token", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    wait_for(
        &format!("token {stale} purged from push_tokens"),
        || async { !tokens().await.contains(&stale) },
    )
    .await;
    assert_eq!(tokens().await.len(), 2, "the owner's two tokens are kept");
    let purge = world.metrics(2);
    wait_for("the purger's ringpush_tokens_total: 1 purged", || {
        let purge = purge.clone();
        async move {
            get(&purge, "/metrics").await.is_some_and(|(_, body)| {
                body.lines()
                    .any(|l| l == r#"ringpush_tokens_total{outcome="purged"} 1"#)
            })
        }
    })
    .await;

    // What the guide says its check shows.
    let shown = world.run("check.sh", &check);
    for expected in [
        r#"ringpush_notifications_total{outcome="accepted"} 2"#,
        r#"ringpush_platform_notifications_total{app="default",platform="fcm",outcome="accepted"} 1"#,
        r#"ringpush_tokens_total{outcome="purged"} 1"#,
        "(2 rows)",
    ] {
        assert!(
            shown.contains(expected),
            "the guide's check does not show {expected}:\n{shown}"
        );
    }

    // The registration statements fit the migrated schema.
    let client = pool.get().await.unwrap();
    for block in &sql {
        for statement in block.body.split(';').filter(|s| !s.trim().is_empty()) {
            client.prepare(statement).await.unwrap_or_else(|e| {
                panic!(
                    "{}:{}: {statement:?} does not fit the schema: {e}",
                    block.file, block.line
                )
            });
        }
    }

    // A malformed ring is dead-lettered; the guide's command shows why.
    let connection = broker::connect(&support::amqp_url(), "ringpush readme test")
        .await
        .unwrap();
    let channel = broker::confirm_channel(&connection).await.unwrap();
    let props = BasicProperties::default().with_content_type("application/json".into());
    broker::publish_confirmed(
        &channel,
        &world.names.rings,
        "ring.gw-1",
        br#"{"v":1,"event_id":"readme","pressed_at":"2026-11-28T09:15:02.120Z"}"#,
        props,
    )
    .await
    .unwrap();
    let dead = world.names.dead.clone();
    wait_for("the malformed ring in the dead queue", || {
        let (channel, dead) = (&channel, &dead);
        async move { support::depth(channel, dead).await == 1 }
    })
    .await;
    let _ = connection.close(200, "done".into()).await;
    let renamed: Vec<Block> = dead_letters
        .iter()
        .map(|b| Block {
            body: b.body.replace("ringpush.", &format!("{}.", world.prefix)),
            ..(*b).clone()
        })
        .collect();
    let shown = world.run("dead-letters.sh", &renamed.iter().collect::<Vec<_>>());
    assert!(
        shown.contains("x-ringpush-error") && shown.contains("gateway_id"),
        "the guide's dead-letter command does not show x-ringpush-error:\n{shown}"
    );

    // The processes stop cleanly on SIGTERM (the Drop does the same on failure).
    world.stop_group();

    // The teardown leaves no queue of the prefix, no row of the walkthrough, no mock file.
    let shown = world.run("teardown.sh", &teardown);
    assert!(
        shown.contains(&format!("deleted queue {}", world.names.rings)),
        "the teardown says what it deleted:\n{shown}"
    );
    let connection = broker::connect(&support::amqp_url(), "ringpush readme test")
        .await
        .unwrap();
    for queue in world.names.queues() {
        let channel = connection.create_channel().await.unwrap();
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declared = channel
            .queue_declare(queue.into(), passive, Default::default())
            .await;
        assert!(declared.is_err(), "{queue} is left after the teardown");
    }
    let _ = connection.close(200, "done".into()).await;
    let client = pool.get().await.unwrap();
    for table in ["users", "gateways", "gateway_shares", "push_tokens"] {
        let left: i64 = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 0, "rows of {table} left after the teardown");
    }
    for file in [
        "mock-certs",
        "mock-fcm-certs",
        "fcm-service-account.json",
        "worker.log",
    ] {
        assert!(
            !world.dir.join(file).exists(),
            "{file} left after the teardown"
        );
    }
}

/// The repository's root.
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every docs/*.md, relative to the root, read now (not at build time), so a
/// guide added later is checked too.
fn markdown_files() -> Vec<(String, String)> {
    let mut files = vec!["README.md".to_owned()];
    let mut docs: Vec<String> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(root().join(&f)).unwrap();
            (f, text)
        })
        .collect()
}

/// The lines of a markdown text outside fenced code blocks, with their 1-based numbers.
fn prose(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push((i + 1, line));
        }
    }
    out
}

/// The anchors GitHub gives a file's headings: lower case, punctuation but `-` and `_`
/// dropped, spaces as `-`.
fn anchors(text: &str) -> Vec<String> {
    prose(text)
        .into_iter()
        .filter_map(|(_, line)| {
            let title = line.trim_start_matches('#');
            (title.len() < line.len() && title.starts_with(' ')).then_some(title.trim())
        })
        .map(|title| {
            title
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect()
}

/// The targets of the markdown links `[text](target)` of a file's prose, with their lines.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in prose(text) {
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            if let Some(end) = rest.find(')') {
                out.push((n, rest[..end].to_owned()));
                rest = &rest[end..];
            }
        }
    }
    out
}

#[test]
fn anchors_are_what_github_makes_of_headings() {
    let text = "# Top\n## Against Apple's APNs\n```sh\n# not a heading\n```\n\
                ### HTTP/2 or the legacy binary interface\n## `ringpush who`: whom a ring reaches\n";
    assert_eq!(
        anchors(text),
        [
            "top",
            "against-apples-apns",
            "http2-or-the-legacy-binary-interface",
            "ringpush-who-whom-a-ring-reaches"
        ]
    );
    assert_eq!(
        links("see [a](b.md#c) and [d](#e)\n```\n[x](not-a-link)\n```\n"),
        [(1, "b.md#c".to_owned()), (1, "#e".to_owned())]
    );
}

#[test]
fn every_link_of_the_documentation_leads_somewhere() {
    let mut broken = Vec::new();
    for (file, text) in markdown_files() {
        let dir = Path::new(&file).parent().unwrap().to_owned();
        for (line, target) in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let linked = if path.is_empty() {
                Path::new(&file).to_owned()
            } else {
                dir.join(path)
            };
            let Ok(linked_text) = std::fs::read_to_string(root().join(&linked)).or_else(|e| {
                if root().join(&linked).is_dir() {
                    Ok(String::new())
                } else {
                    Err(e)
                }
            }) else {
                broken.push(format!("{file}:{line}: {target}: no such file"));
                continue;
            };
            if !anchor.is_empty() && !anchors(&linked_text).iter().any(|a| a == anchor) {
                broken.push(format!(
                    "{file}:{line}: {target}: {} has no heading #{anchor}",
                    linked.display()
                ));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_readme_leads_to_every_guide() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let targets: Vec<String> = links(&readme).into_iter().map(|(_, t)| t).collect();
    let mut guides: Vec<String> = markdown_files()
        .into_iter()
        .map(|(f, _)| f)
        .filter(|f| f.starts_with("docs/"))
        .collect();
    guides.push("BENCHMARKS.md".to_owned());
    for guide in guides {
        assert!(targets.contains(&guide), "README.md does not link {guide}");
    }
    // Every tested block is in a file this test runs.
    for (file, text) in markdown_files() {
        assert!(
            !text.contains("<!-- tested:") || DOCS.iter().any(|(f, _)| *f == file),
            "{file} has tested blocks, but readme.rs's DOCS does not list it"
        );
    }
}

#[test]
fn no_file_points_outside_the_repository_for_the_design() {
    // Built here so that this file does not name them itself.
    let stale = [
        concat!("..", "/shared"),
        concat!("shared", "/DESIGN"),
        concat!("DESIGN", ".md"),
    ];
    let mut found = Vec::new();
    let mut dirs = vec![root().to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !((name.starts_with('.') && name != ".ci") || name == "target") {
                    dirs.push(path);
                }
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue; // not text
            };
            for (n, line) in text.lines().enumerate() {
                if stale.iter().any(|s| line.contains(s)) {
                    found.push(format!(
                        "{}:{}: {}",
                        path.strip_prefix(root()).unwrap().display(),
                        n + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "the design is docs/design.md, in the repository:\n{}",
        found.join("\n")
    );
}
