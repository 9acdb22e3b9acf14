//! The compose file, the Kubernetes manifests and the Grafana dashboard agree with the
//! binary: they parse, every command is a real subcommand with real flags, every
//! environment variable they set is one that subcommand reads, and every metric the
//! dashboard plots is one ringpush exports.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use clap::CommandFactory;
use ringpush::cli::Cli;
use yaml_rust2::{Yaml, YamlLoader};

fn load(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path} does not parse: {e}"))
}

fn get<'a>(y: &'a Yaml, key: &str) -> &'a Yaml {
    &y[key]
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .map(|s| s.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A mapping's keys, with YAML merge keys (`<<`) resolved.
fn keys(y: &Yaml) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Some(h) = y.as_hash() {
        for (k, v) in h {
            match k.as_str() {
                Some("<<") => {
                    for merged in v.as_vec().cloned().unwrap_or_else(|| vec![v.clone()]) {
                        out.extend(keys(&merged));
                    }
                }
                Some(k) => {
                    out.insert(k.to_owned());
                }
                None => {}
            }
        }
    }
    out
}

/// A mapping with merge keys resolved (only what the checks need: nested lookups).
fn merged(y: &Yaml) -> HashMap<String, Yaml> {
    let mut out = HashMap::new();
    if let Some(h) = y.as_hash() {
        for (k, v) in h {
            if k.as_str() == Some("<<") {
                for m in v.as_vec().cloned().unwrap_or_else(|| vec![v.clone()]) {
                    for (mk, mv) in merged(&m) {
                        out.entry(mk).or_insert(mv);
                    }
                }
            } else if let Some(k) = k.as_str() {
                out.insert(k.to_owned(), v.clone());
            }
        }
    }
    out
}

/// Checks `args` against the CLI and returns the environment variables the subcommand reads
/// (for a command with subcommands, `gateway add`, those of the one named).
fn check_command(args: &[String], what: &str) -> BTreeSet<String> {
    let mut cli = Cli::command();
    cli.build();
    let name = args.first().unwrap_or_else(|| panic!("{what}: no command"));
    let mut sub = cli
        .find_subcommand(name)
        .unwrap_or_else(|| panic!("{what}: {name:?} is not a ringpush subcommand"));
    let mut depth = 1;
    while sub.has_subcommands() {
        let name = args
            .get(depth)
            .unwrap_or_else(|| panic!("{what}: `{}` needs a subcommand", sub.get_name()));
        sub = sub
            .find_subcommand(name)
            .unwrap_or_else(|| panic!("{what}: {name:?} is not a subcommand of {}", args[0]));
        depth += 1;
    }
    let name = sub.get_name();
    let arguments: Vec<_> = sub.get_arguments().collect();
    for flag in args.iter().filter_map(|a| a.strip_prefix("--")) {
        let flag = flag.split('=').next().unwrap();
        assert!(
            arguments.iter().any(|a| a.get_long() == Some(flag)),
            "{what}: `ringpush {name}` has no flag --{flag}"
        );
    }
    // The command line itself must parse (positional arguments, values).
    let mut argv = vec!["ringpush".to_owned()];
    argv.extend(args.iter().cloned());
    <Cli as clap::Parser>::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("{what}: {argv:?} does not parse: {e}"));
    arguments
        .iter()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect()
}

fn check_env(vars: impl IntoIterator<Item = String>, reads: &BTreeSet<String>, what: &str) {
    for var in vars {
        if var == "RUST_LOG" {
            continue;
        }
        assert!(
            reads.contains(&var),
            "{what} sets {var}, which this subcommand does not read"
        );
    }
}

/// The commands only the test kit's build has (feature `kit`).
const KIT_COMMANDS: [&str; 4] = ["mock-apns", "mock-fcm", "demo", "bench"];

#[test]
fn the_production_image_is_built_without_the_test_kit() {
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(
        stages.last().copied(),
        Some("FROM base AS production"),
        "the default target is the production image"
    );
    let production = dockerfile.split("AS production").nth(1).unwrap();
    assert!(production.contains("COPY --from=build /ringpush /usr/local/bin/ringpush"));
    let build = dockerfile.split("AS build").nth(1).unwrap();
    assert!(
        build.contains("--no-default-features \\\n && cp target/release/ringpush /ringpush"),
        "/ringpush is built without the kit: {build}"
    );
}

#[test]
fn the_compose_file_runs_real_commands_with_variables_they_read() {
    let compose = &load("docker-compose.yml")[0];
    let services = merged(get(compose, "services"));
    let mut commands = BTreeSet::new();
    for (name, service) in &services {
        let service = merged(service);
        let image = service
            .get("image")
            .and_then(|i| i.as_str())
            .unwrap_or_default();
        if image != "ringpush:local" && image != "ringpush:local-kit" {
            continue;
        }
        let args = strings(
            service
                .get("command")
                .unwrap_or_else(|| panic!("{name} has no command")),
        );
        // The test kit's commands are only in the image built with it (the Dockerfile's
        // `kit` target); every other service runs the production image.
        let kit = KIT_COMMANDS.contains(&args[0].as_str());
        let target = service
            .get("build")
            .map(|b| b["target"].as_str().unwrap_or("").to_owned())
            .unwrap_or_default();
        assert_eq!(
            (image == "ringpush:local-kit", target == "kit"),
            (kit, kit),
            "compose service {name} runs `{}` from {image} (build target {target:?})",
            args[0]
        );
        commands.insert(args[0].clone());
        let reads = check_command(&args, &format!("compose service {name}"));
        let env = service.get("environment").map(keys).unwrap_or_default();
        check_env(env, &reads, &format!("compose service {name}"));
    }
    for needed in [
        "migrate",
        "worker",
        "feedback",
        "purge",
        "mock-apns",
        "mock-fcm",
        "ring",
        "seed",
        "gateway",
    ] {
        assert!(commands.contains(needed), "compose runs no `{needed}`");
    }
}

#[test]
fn the_kubernetes_manifests_run_real_commands_with_variables_they_read() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let rel = format!(
                "deploy/kubernetes/{}",
                path.file_name().unwrap().to_string_lossy()
            );
            docs.extend(load(&rel).into_iter().map(|d| (rel.clone(), d)));
        }
    }
    let config_maps: HashMap<String, BTreeSet<String>> = docs
        .iter()
        .filter(|(_, d)| d["kind"].as_str() == Some("ConfigMap"))
        .map(|(_, d)| {
            (
                d["metadata"]["name"].as_str().unwrap().to_owned(),
                keys(&d["data"]),
            )
        })
        .collect();
    let mut workloads = HashMap::new();
    for (file, doc) in &docs {
        let kind = doc["kind"].as_str().unwrap_or_default();
        if !matches!(kind, "Deployment" | "Job") {
            continue;
        }
        let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
        let pod = &doc["spec"]["template"]["spec"];
        for container in pod["containers"].as_vec().unwrap() {
            let args = strings(&container["args"]);
            let what = format!("{file} {name}");
            let reads = check_command(&args, &what);
            let mut env: Vec<String> = container["env"]
                .as_vec()
                .map(|v| {
                    v.iter()
                        .map(|e| e["name"].as_str().unwrap().to_owned())
                        .collect()
                })
                .unwrap_or_default();
            for from in container["envFrom"].as_vec().cloned().unwrap_or_default() {
                let map = from["configMapRef"]["name"].as_str().unwrap();
                env.extend(
                    config_maps
                        .get(map)
                        .unwrap_or_else(|| panic!("{what}: no ConfigMap {map}"))
                        .iter()
                        .cloned(),
                );
            }
            check_env(env.clone(), &reads, &what);
            if kind == "Deployment" {
                assert!(
                    container["livenessProbe"]["httpGet"]["path"].as_str() == Some("/healthz"),
                    "{what}: liveness"
                );
                assert!(
                    container["readinessProbe"]["httpGet"]["path"].as_str() == Some("/readyz"),
                    "{what}: readiness"
                );
                assert!(
                    !container["resources"]["requests"].is_badvalue(),
                    "{what}: resources"
                );
            }
            workloads.insert(
                name.clone(),
                (
                    args[0].clone(),
                    pod["terminationGracePeriodSeconds"].as_i64(),
                    env,
                ),
            );
        }
    }
    for needed in ["migrate", "worker", "feedback", "purge"] {
        assert!(
            workloads.values().any(|(cmd, _, _)| cmd == needed),
            "no workload runs `{needed}`"
        );
    }
    // The worker's grace period in Kubernetes outlasts its own drain time.
    let (_, grace, _) = &workloads["ringpush-worker"];
    let drain = docs
        .iter()
        .find_map(|(_, d)| {
            d["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_vec()
                .and_then(|env| {
                    env.iter()
                        .find(|e| e["name"].as_str() == Some("RINGPUSH_SHUTDOWN_GRACE"))
                        .and_then(|e| {
                            e["value"]
                                .as_str()
                                .map(|v| humantime::parse_duration(v).unwrap())
                        })
                })
        })
        .unwrap_or(std::time::Duration::from_secs(25));
    assert!(
        grace.unwrap() as u64 > drain.as_secs(),
        "terminationGracePeriodSeconds must exceed the drain"
    );
    // KEDA scales the worker Deployment on the rings queue.
    let scaled = docs
        .iter()
        .find(|(_, d)| d["kind"].as_str() == Some("ScaledObject"))
        .expect("a ScaledObject")
        .1
        .clone();
    assert_eq!(
        scaled["spec"]["scaleTargetRef"]["name"].as_str(),
        Some("ringpush-worker")
    );
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"].as_str(), Some("rabbitmq"));
    assert_eq!(
        trigger["metadata"]["queueName"].as_str(),
        Some(ringpush::broker::Names::new("ringpush").rings.as_str())
    );
    assert_eq!(trigger["metadata"]["mode"].as_str(), Some("QueueLength"));
    // Each process runs as its role's own broker identity (`ringpush service add`): its
    // RINGPUSH_AMQP_URL comes from that role's Secret, one per role.
    let secrets: BTreeSet<String> = load("deploy/kubernetes/secrets.example.yaml")
        .iter()
        .filter(|d| d["kind"].as_str() == Some("Secret"))
        .map(|d| d["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    for (_, doc) in &docs {
        if doc["kind"].as_str() != Some("Deployment") {
            continue;
        }
        let container = &doc["spec"]["template"]["spec"]["containers"][0];
        let role = strings(&container["args"])[0].clone();
        let secret = container["env"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|e| e["name"].as_str() == Some("RINGPUSH_AMQP_URL"))
            .map(|e| e["valueFrom"]["secretKeyRef"]["name"].as_str().unwrap());
        let own = format!("ringpush-broker-{role}");
        assert_eq!(secret, Some(own.as_str()), "{role}'s broker identity");
        assert!(secrets.contains(&own), "secrets.example.yaml has no {own}");
    }
    // KEDA reads the depth through the management API as the monitor identity, which may
    // read depths and nothing else.
    assert_eq!(trigger["metadata"]["protocol"].as_str(), Some("http"));
    let auth = trigger["authenticationRef"]["name"].as_str().unwrap();
    let auth = docs
        .iter()
        .find(|(_, d)| {
            d["kind"].as_str() == Some("TriggerAuthentication")
                && d["metadata"]["name"].as_str() == Some(auth)
        })
        .expect("its TriggerAuthentication")
        .1
        .clone();
    let host = &auth["spec"]["secretTargetRef"][0];
    assert_eq!(host["parameter"].as_str(), Some("host"));
    assert_eq!(host["name"].as_str(), Some("ringpush-broker-monitor"));
    assert!(secrets.contains("ringpush-broker-monitor"));
}

/// The Kubernetes example reaches the broker and the database over verified TLS: amqps://
/// URLs (KEDA's too, with TLS on and the CA), `sslmode=verify-full` with `sslrootcert`, and
/// every CA file a process reads mounted into it.
#[test]
fn the_kubernetes_manifests_use_tls_urls_with_the_ca_mounted() {
    let secrets = load("deploy/kubernetes/secrets.example.yaml");
    let data = |name: &str| -> HashMap<String, String> {
        let doc = secrets
            .iter()
            .find(|d| d["metadata"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no secret {name}"));
        doc["stringData"]
            .as_hash()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().unwrap().to_owned(),
                    v.as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    // Each role's own identity over amqps; the monitor's management API over https.
    for role in ["worker", "feedback", "purge"] {
        let broker = data(&format!("ringpush-broker-{role}"));
        for node in broker["amqp-url"].split(',') {
            assert!(node.starts_with("amqps://"), "{role}: {node}");
        }
    }
    let monitor = data("ringpush-broker-monitor");
    assert!(
        monitor["management-url"].starts_with("https://"),
        "{}",
        monitor["management-url"]
    );
    assert_eq!(monitor["management-tls"], "enable");
    // A CA of the test's own stands in for the mounted one: each URL parses with its TLS
    // settings, as the process would read it.
    let stand_in = std::env::temp_dir().join(format!(
        "ringpush-deploy-ca-{}.pem",
        ringpush::token::random_hex(4)
    ));
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&stand_in, params.self_signed(&key).unwrap().pem()).unwrap();
    let mut ca_files = BTreeSet::new();
    for (key, url) in data("ringpush-database") {
        assert!(url.contains("sslmode=verify-full"), "{key}: {url}");
        let root = url
            .split("sslrootcert=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap();
        let local = url.replace(root, &stand_in.display().to_string());
        let target = ringpush::db::Target::parse(&local).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(target.mode(), ringpush::db::SslMode::VerifyFull, "{key}");
        ca_files.insert(root.to_owned());
    }
    let _ = std::fs::remove_file(&stand_in);
    assert!(data("ringpush-tls").contains_key("ca.crt"));
    let config = load("deploy/kubernetes/config.yaml");
    let amqp_ca = config[0]["data"]["RINGPUSH_AMQP_CA_FILE"].as_str().unwrap();
    ca_files.insert(amqp_ca.to_owned());
    assert_eq!(ca_files.len(), 1, "one CA file: {ca_files:?}");
    let ca = ca_files.into_iter().next().unwrap();
    for file in ["worker", "feedback", "purge", "migrate-job"] {
        let doc = &load(&format!("deploy/kubernetes/{file}.yaml"))[0];
        let pod = &doc["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let mounted = container["volumeMounts"].as_vec().unwrap().iter().any(|m| {
            let volume = m["name"].as_str().unwrap();
            let from_tls = pod["volumes"].as_vec().unwrap().iter().any(|v| {
                v["name"].as_str() == Some(volume)
                    && v["secret"]["secretName"].as_str() == Some("ringpush-tls")
            });
            from_tls && ca.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap()))
        });
        assert!(
            mounted,
            "{file}: {ca} is not mounted from the ringpush-tls secret"
        );
    }
    let keda = load("deploy/kubernetes/keda-scaledobject.yaml");
    let auth = keda[0]["spec"]["secretTargetRef"].as_vec().unwrap();
    for parameter in ["host", "tls", "ca"] {
        assert!(
            auth.iter()
                .any(|r| r["parameter"].as_str() == Some(parameter)),
            "KEDA's TriggerAuthentication has no {parameter}"
        );
    }
}

#[test]
fn the_dashboard_plots_only_metrics_ringpush_exports() {
    // Every family the worker, feedback consumer and purger export.
    let mut registry = ringpush::metrics::registry();
    let counters = Arc::new(ringpush::worker::Counters::default());
    let endpoint = ringpush::apns::request::Endpoint::parse("https://localhost").unwrap();
    let tls = ringpush::tls::client_config(None, None).unwrap();
    let client = ringpush::apns::http2::Client::new(
        ringpush::apns::http2::Settings::new(endpoint.clone(), endpoint),
        tls,
        None,
    );
    counters.register(&mut registry, &client.into());
    let depth = ringpush::metrics::QueueDepth::default();
    depth.register(&mut registry);
    depth.set("ringpush.rings", 0, 0);
    Arc::new(ringpush::feedback::Counters::default()).register(&mut registry);
    Arc::new(ringpush::purge::Counters::default()).register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let families: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect();

    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut plotted = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("ringpush_"))
            {
                let family = ["_total", "_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or(name);
                assert!(
                    families.contains(family),
                    "the dashboard plots {name}, which ringpush does not export ({families:?})"
                );
                plotted += 1;
            }
        }
    }
    assert!(plotted >= 10);
}

/// Every volume a Kubernetes workload mounts is one of its pod's, and no Secret is mounted
/// through `subPath` (a subPath mount never receives the Secret's updates). The worker's
/// apps: `RINGPUSH_APPS_DIR` holds one folder per app, each a whole Secret volume of its own
/// named by an app id, and each Secret in secrets.example.yaml has an `app.json` that the
/// worker reads (its fields, as `ringpush::apps::AppJson` parses them) naming files that are
/// keys of that Secret.
#[test]
fn the_worker_mounts_each_app_from_a_secret_of_its_own_that_updates_in_place() {
    let secrets: HashMap<String, HashMap<String, String>> =
        load("deploy/kubernetes/secrets.example.yaml")
            .iter()
            .filter(|d| d["kind"].as_str() == Some("Secret"))
            .map(|d| {
                let data = d["stringData"]
                    .as_hash()
                    .map(|h| {
                        h.iter()
                            .map(|(k, v)| {
                                (
                                    k.as_str().unwrap().to_owned(),
                                    v.as_str().unwrap_or_default().to_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                (d["metadata"]["name"].as_str().unwrap().to_owned(), data)
            })
            .collect();
    for file in ["worker", "feedback", "purge", "migrate-job"] {
        let doc = &load(&format!("deploy/kubernetes/{file}.yaml"))[0];
        let pod = &doc["spec"]["template"]["spec"];
        let volumes = pod["volumes"].as_vec().cloned().unwrap_or_default();
        for container in pod["containers"].as_vec().unwrap() {
            for m in container["volumeMounts"]
                .as_vec()
                .cloned()
                .unwrap_or_default()
            {
                let name = m["name"].as_str().unwrap();
                let volume = volumes
                    .iter()
                    .find(|v| v["name"].as_str() == Some(name))
                    .unwrap_or_else(|| panic!("{file}: the mount {name} has no volume"));
                assert!(
                    volume["secret"].is_badvalue() || m["subPath"].is_badvalue(),
                    "{file}: the Secret volume {name} is mounted through subPath, which never receives its updates"
                );
            }
        }
    }

    let worker = &load("deploy/kubernetes/worker.yaml")[0];
    let pod = &worker["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let env = container["env"].as_vec().unwrap();
    let value = |var: &str| {
        env.iter()
            .find(|e| e["name"].as_str() == Some(var))
            .and_then(|e| e["value"].as_str())
    };
    let dir = value("RINGPUSH_APPS_DIR").expect("the worker sets RINGPUSH_APPS_DIR");
    // The app `default` stays the single-app variables'.
    assert!(
        value("RINGPUSH_APNS_KEY_FILE").is_some()
            && value("RINGPUSH_FCM_CREDENTIALS_FILE").is_some()
    );
    let mut apps = Vec::new();
    for m in container["volumeMounts"].as_vec().unwrap() {
        let path = m["mountPath"].as_str().unwrap();
        let Some(app) = path.strip_prefix(dir).and_then(|p| p.strip_prefix('/')) else {
            continue;
        };
        let id = ringpush::token::AppId::named(app)
            .unwrap_or_else(|e| panic!("{path}: the folder's name is not an app id: {e}"));
        assert_ne!(
            id,
            ringpush::token::AppId::DEFAULT,
            "{path}: the single-app variables configure the app `default` (the worker refuses both)"
        );
        let volume = pod["volumes"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap();
        let secret = volume["secret"]["secretName"]
            .as_str()
            .unwrap_or_else(|| panic!("{path}: not a Secret's volume"));
        assert!(
            volume["secret"]["items"].is_badvalue(),
            "{path}: every key of {secret} is a file of the app's folder (no `items`)"
        );
        let keys = secrets
            .get(secret)
            .unwrap_or_else(|| panic!("secrets.example.yaml has no {secret} (mounted at {path})"));
        let json = keys
            .get("app.json")
            .unwrap_or_else(|| panic!("{secret} has no app.json"));
        let parsed: ringpush::apps::AppJson = serde_json::from_str(json)
            .unwrap_or_else(|e| panic!("{secret}: app.json is not what the worker reads: {e}"));
        let mut files = Vec::new();
        if let Some(apns) = &parsed.apns {
            files.extend(
                [&apns.key_file, &apns.cert_file, &apns.cert_password_file]
                    .into_iter()
                    .flatten()
                    .cloned(),
            );
        }
        if let Some(fcm) = &parsed.fcm {
            files.push(fcm.credentials_file.clone());
        }
        assert!(!files.is_empty(), "{secret}: app.json names no credentials");
        for f in files {
            assert!(
                keys.contains_key(&f),
                "{secret}: app.json names {f}, which is not a key"
            );
        }
        apps.push(app.to_owned());
    }
    assert!(
        apps.len() >= 2,
        "the example mounts two apps under {dir}: {apps:?}"
    );
}
