//! App folders against running mocks (contract v3, "Many apps in one deployment"): what the
//! tests, the demo and the bench put in `RINGPUSH_APPS_DIR`. One folder per app with its
//! `app.json`, its APNs key (or certificate) and its Firebase service account, each
//! registered with the mocks as it is written — the key for its team, the topic for that
//! team, the account for its project — so the mocks take that app's credentials and refuse
//! another app's. A rotation writes a new generation (a new key id, service account or
//! certificate) and leaves the old credentials accepted until the caller removes them
//! ([`Mock::remove_key`], [`MockFcm::remove_account`]).
//!
//! Written so that a reader never sees half a generation: as plain files (the new
//! generation's files under new names, then `app.json` written aside and renamed over), or
//! as the kubelet writes a mounted Secret ([`Layout::Secret`]).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::Key;
use crate::mock::{certs, Mock};
use crate::mock_fcm::MockFcm;
use crate::token::random_hex;

/// How an app's folder is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Files in the folder. A rotation writes its files under new names (`apns-2.p8`,
    /// `fcm-2.json`, …), then replaces `app.json` atomically (written aside, renamed over).
    Files,
    /// As the kubelet writes a Secret volume: the files in a hidden folder of their
    /// generation, `..data` a symlink to it and each file name a symlink through `..data`. A
    /// rotation writes a new generation's folder and swaps `..data` at once (a new symlink
    /// renamed over it), then removes the old folder.
    Secret,
}

/// An app's folder as written, and what a test needs of it.
#[derive(Clone)]
pub struct AppFolder {
    /// The app's id: its folder's name.
    pub id: String,
    /// `<apps dir>/<id>`.
    pub dir: PathBuf,
    pub layout: Layout,
    /// The app's APNs topic.
    pub topic: String,
    pub apns: AppApns,
    pub fcm: Option<AppFcm>,
    /// Which writing of the folder this is: 1, then one more per rotation.
    pub generation: u32,
}

/// An app's APNs credentials.
#[derive(Clone)]
pub enum AppApns {
    /// Token auth: the team's key (its PEM, key id and team id) and its .p8 file.
    Key { key: Key, file: PathBuf },
    /// Certificate auth: a .p12 issued by the mock's CA for the app's topic, its password
    /// (in `password_file`) and when it expires.
    Certificate {
        file: PathBuf,
        password_file: PathBuf,
        password: String,
        not_after: SystemTime,
    },
}

/// An app's Firebase service account.
#[derive(Clone)]
pub struct AppFcm {
    pub project: String,
    /// The account's `client_email`: [`MockFcm::remove_account`] takes it.
    pub client_email: String,
    /// Its JSON, as written to `file`.
    pub json: String,
    pub file: PathBuf,
}

impl AppFolder {
    /// `<dir>/app.json`.
    pub fn app_json(&self) -> PathBuf {
        self.dir.join("app.json")
    }

    /// The key, for token auth.
    pub fn key(&self) -> Option<&Key> {
        match &self.apns {
            AppApns::Key { key, .. } => Some(key),
            AppApns::Certificate { .. } => None,
        }
    }

    /// The key's id, for token auth.
    pub fn key_id(&self) -> Option<&str> {
        self.key().map(|k| k.key_id.as_str())
    }

    /// The service account's `client_email`, when the app has one.
    pub fn client_email(&self) -> Option<&str> {
        self.fcm.as_ref().map(|f| f.client_email.as_str())
    }

    /// A new key `key_id` of the same team and, with `fcm`, a new service account of the
    /// same project, written as the folder's next generation and accepted by the mocks; the
    /// old key and account stay accepted until the caller removes them.
    pub fn rotate_key(
        &self,
        key_id: &str,
        mock: &Mock,
        fcm: Option<&MockFcm>,
    ) -> anyhow::Result<AppFolder> {
        let Some(old) = self.key() else {
            anyhow::bail!("app {}: certificate auth has no key to rotate", self.id);
        };
        let key = Key::generate(key_id, &old.team_id)?;
        mock.add_key(key.check()?);
        let apns = Apns::Key(key);
        self.next(apns, mock, fcm)
    }

    /// A new certificate for the app's topic valid until `not_after` and, with `fcm`, a new
    /// service account of the same project, written as the folder's next generation.
    pub fn renew_certificate(
        &self,
        not_after: SystemTime,
        mock: &Mock,
        fcm: Option<&MockFcm>,
    ) -> anyhow::Result<AppFolder> {
        if self.key().is_some() {
            anyhow::bail!("app {}: token auth has no certificate to renew", self.id);
        }
        self.next(Apns::Certificate(not_after), mock, fcm)
    }

    fn next(&self, apns: Apns, mock: &Mock, fcm: Option<&MockFcm>) -> anyhow::Result<AppFolder> {
        let fcm = match (fcm, &self.fcm) {
            (Some(mock_fcm), Some(old)) => Some((mock_fcm, old.project.as_str())),
            _ => None,
        };
        let kept = if fcm.is_none() {
            self.fcm.clone()
        } else {
            None
        };
        let apps_dir = self.dir.parent().unwrap_or(Path::new("."));
        let spec = Spec {
            apps_dir,
            id: &self.id,
            topic: &self.topic,
            layout: self.layout,
            generation: self.generation + 1,
        };
        spec.write(apns, mock, fcm, kept)
    }
}

/// Writes the folder `<apps_dir>/<app>` of an app with token auth — a new .p8 key `key_id`
/// of team `team_id` for `topic` and, with `fcm`, a new service account of its project —
/// and registers them with the mocks: the key accepted for its team, the topic taking that
/// team's JWTs only, the account taken for its project.
#[allow(clippy::too_many_arguments)]
pub fn write_app(
    apps_dir: &Path,
    app: &str,
    topic: &str,
    key_id: &str,
    team_id: &str,
    mock: &Mock,
    fcm: Option<(&MockFcm, &str)>,
    layout: Layout,
) -> anyhow::Result<AppFolder> {
    let key = Key::generate(key_id, team_id)?;
    mock.add_key(key.check()?);
    mock.set_topic(topic, team_id);
    let spec = Spec {
        apps_dir,
        id: app,
        topic,
        layout,
        generation: 1,
    };
    spec.write(Apns::Key(key), mock, fcm, None)
}

/// Writes the folder `<apps_dir>/<app>` of an app with certificate auth — a .p12 (and its
/// password file) issued by the mock's CA for `topic` only, valid until `not_after` — and,
/// with `fcm`, a new service account of its project.
pub fn write_cert_app(
    apps_dir: &Path,
    app: &str,
    topic: &str,
    not_after: SystemTime,
    mock: &Mock,
    fcm: Option<(&MockFcm, &str)>,
    layout: Layout,
) -> anyhow::Result<AppFolder> {
    let spec = Spec {
        apps_dir,
        id: app,
        topic,
        layout,
        generation: 1,
    };
    spec.write(Apns::Certificate(not_after), mock, fcm, None)
}

/// What a generation's APNs part is made of.
enum Apns {
    Key(Key),
    /// A certificate valid until then.
    Certificate(SystemTime),
}

/// One generation of a folder, to write.
struct Spec<'a> {
    apps_dir: &'a Path,
    id: &'a str,
    topic: &'a str,
    layout: Layout,
    generation: u32,
}

impl Spec<'_> {
    /// A file's name in this generation: `apns.p8`, or `apns-2.p8` in a later generation of
    /// a plain folder (a Secret's names stay: its generations are apart).
    fn name(&self, stem: &str, ext: &str) -> String {
        match (self.layout, self.generation) {
            (Layout::Files, g) if g > 1 => format!("{stem}-{g}.{ext}"),
            _ => format!("{stem}.{ext}"),
        }
    }

    /// Makes the generation's files, registers the new service account (`fcm`; `kept`: the
    /// current one, unchanged), and writes the folder.
    fn write(
        &self,
        apns: Apns,
        mock: &Mock,
        fcm: Option<(&MockFcm, &str)>,
        kept: Option<AppFcm>,
    ) -> anyhow::Result<AppFolder> {
        let dir = self.apps_dir.join(self.id);
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        let (apns_json, apns) = match apns {
            Apns::Key(key) => {
                let name = self.name("apns", "p8");
                files.push((name.clone(), key.pem.clone().into_bytes()));
                let json = serde_json::json!({
                    "topic": self.topic, "key_file": name,
                    "key_id": key.key_id, "team_id": key.team_id,
                });
                let file = dir.join(&name);
                (json, AppApns::Key { key, file })
            }
            Apns::Certificate(not_after) => {
                let pem = certs::topic_identity_pem(mock.cert_dir(), self.topic, not_after)?;
                let password = random_hex(8);
                let (name, pass_name) = (self.name("apns", "p12"), self.name("apns", "pass"));
                files.push((name.clone(), p12_of(&pem, &password)?));
                files.push((pass_name.clone(), password.clone().into_bytes()));
                let json = serde_json::json!({
                    "topic": self.topic, "cert_file": name, "cert_password_file": pass_name,
                });
                let apns = AppApns::Certificate {
                    file: dir.join(&name),
                    password_file: dir.join(&pass_name),
                    password,
                    not_after,
                };
                (json, apns)
            }
        };
        let fcm = match (fcm, kept) {
            (Some((mock_fcm, project)), _) => {
                let json = mock_fcm.new_account(project)?;
                let account = crate::fcm::ServiceAccount::parse(json.as_bytes())?;
                let name = self.name("fcm", "json");
                files.push((name.clone(), json.clone().into_bytes()));
                Some(AppFcm {
                    project: project.to_owned(),
                    client_email: account.client_email.clone(),
                    json,
                    file: dir.join(name),
                })
            }
            (None, Some(kept)) => {
                // The same account, carried into the new generation.
                let name = self.name("fcm", "json");
                files.push((name.clone(), kept.json.clone().into_bytes()));
                Some(AppFcm {
                    file: dir.join(name),
                    ..kept
                })
            }
            (None, None) => None,
        };
        let mut app_json = serde_json::json!({ "apns": apns_json });
        if let Some(f) = &fcm {
            let name = f.file.file_name().map(|n| n.to_string_lossy().into_owned());
            app_json["fcm"] = serde_json::json!({ "credentials_file": name });
        }
        files.push(("app.json".into(), app_json.to_string().into_bytes()));
        std::fs::create_dir_all(&dir)?;
        match self.layout {
            Layout::Files => write_files(&dir, &files)?,
            Layout::Secret => write_secret(&dir, &files)?,
        }
        Ok(AppFolder {
            id: self.id.to_owned(),
            dir,
            layout: self.layout,
            topic: self.topic.to_owned(),
            apns,
            fcm,
            generation: self.generation,
        })
    }
}

/// Plain files: every file but `app.json` written in place (their names are the
/// generation's own), then `app.json` written aside and renamed over the old one.
fn write_files(dir: &Path, files: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    for (name, data) in files.iter().filter(|(n, _)| n != "app.json") {
        write_private(&dir.join(name), data)?;
    }
    if let Some((_, data)) = files.iter().find(|(n, _)| n == "app.json") {
        let aside = dir.join(".app.json.tmp");
        write_private(&aside, data)?;
        std::fs::rename(&aside, dir.join("app.json"))?;
    }
    Ok(())
}

/// As the kubelet's atomic writer updates a Secret volume: the files in a new hidden folder,
/// a `..data_tmp` symlink to it renamed over `..data`, a symlink `<name> -> ..data/<name>`
/// for each name not linked yet (and none left for names gone), the old folder removed.
fn write_secret(dir: &Path, files: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    let data = dir.join("..data");
    let old = std::fs::read_link(&data).ok();
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    let generation = format!("..{stamp}.{}", random_hex(2));
    std::fs::create_dir(dir.join(&generation))?;
    for (name, bytes) in files {
        write_private(&dir.join(&generation).join(name), bytes)?;
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&generation, &tmp)?;
    std::fs::rename(&tmp, &data)?;
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link)?;
        }
    }
    if let Some(old) = old {
        for entry in std::fs::read_dir(dir.join(&old))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if !files.iter().any(|(n, _)| *n == name) {
                let _ = std::fs::remove_file(dir.join(&name));
            }
        }
        std::fs::remove_dir_all(dir.join(old))?;
    }
    Ok(())
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(data)
}

/// A PKCS#12 file of a PEM identity (certificates, then the key), as Keychain exports one.
fn p12_of(pem: &str, password: &str) -> anyhow::Result<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| Ok(p12_keystore::Certificate::from_der(c?.as_ref())?))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let key = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())?;
    let key = p12_keystore::PrivateKey::from_der(key.secret_pkcs8_der())?;
    let entry = p12_keystore::PrivateKeyChain::new(random_hex(4).into_bytes(), key, chain);
    let mut store = p12_keystore::KeyStore::new();
    store.add_entry("apns", p12_keystore::KeyStoreEntry::PrivateKeyChain(entry));
    Ok(store.writer(password).write()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apps::folder::{self, ApnsAuth};
    use std::time::Duration;

    /// What the worker's reader makes of an app folder: topic, key id or certificate
    /// password, service account.
    fn read_back(app: &AppFolder) -> (String, String, Option<String>) {
        let read = folder::read(&app.dir).unwrap();
        let credentials = read.credentials.unwrap().unwrap();
        let apns = credentials.apns.unwrap();
        let auth = match apns.auth {
            ApnsAuth::Token { pem, key_id, .. } => {
                assert_eq!(pem, app.key().unwrap().pem.as_bytes());
                key_id
            }
            ApnsAuth::Certificate { file, password } => {
                crate::tls::Identity::from_file(&file, &password).unwrap();
                password
            }
        };
        let fcm = credentials.fcm.map(|json| {
            let account = crate::fcm::ServiceAccount::parse(&json).unwrap();
            account.client_email.clone()
        });
        (apns.topic, auth, fcm)
    }

    #[tokio::test]
    async fn the_worker_reads_every_generation_of_a_folder_as_written() {
        let dir = std::env::temp_dir().join(format!("ringpush-appdirs-{}", random_hex(6)));
        let cancel = tokio_util::sync::CancellationToken::new();
        let settings =
            crate::mock::Settings::local(dir.join("apns"), crate::mock::AuthCheck::default());
        let mock = Mock::start(settings, cancel.clone()).await.unwrap();
        let fcm = MockFcm::start(
            crate::mock_fcm::Settings::local(dir.join("fcm")),
            cancel.clone(),
        )
        .await
        .unwrap();
        let apps = dir.join("apps");
        for layout in [Layout::Files, Layout::Secret] {
            let id = format!("{layout:?}").to_lowercase();
            let topic = format!("com.{id}.bell");
            let one = write_app(
                &apps,
                &id,
                &topic,
                "KEY0000001",
                "TEAM000001",
                &mock,
                Some((&fcm, "proj")),
                layout,
            )
            .unwrap();
            let email = one.client_email().map(str::to_owned);
            assert_eq!(read_back(&one), (topic.clone(), "KEY0000001".into(), email));
            // A new key, the same account.
            let two = one.rotate_key("KEY0000002", &mock, None).unwrap();
            assert_eq!(two.client_email(), one.client_email());
            let email = one.client_email().map(str::to_owned);
            assert_eq!(read_back(&two), (topic.clone(), "KEY0000002".into(), email));
            // A new key and a new account.
            let three = two.rotate_key("KEY0000003", &mock, Some(&fcm)).unwrap();
            assert_ne!(three.client_email(), two.client_email());
            let email = three.client_email().map(str::to_owned);
            assert_eq!(
                read_back(&three),
                (topic.clone(), "KEY0000003".into(), email)
            );

            let cert_id = format!("{id}-cert");
            let soon = SystemTime::now() + Duration::from_secs(10 * 86_400);
            let cert =
                write_cert_app(&apps, &cert_id, "com.cert", soon, &mock, None, layout).unwrap();
            let AppApns::Certificate { password, .. } = &cert.apns else {
                panic!("a certificate app")
            };
            assert_eq!(
                read_back(&cert),
                ("com.cert".into(), password.clone(), None)
            );
            let later = soon + Duration::from_secs(365 * 86_400);
            let renewed = cert.renew_certificate(later, &mock, None).unwrap();
            let AppApns::Certificate { password, .. } = &renewed.apns else {
                panic!("a certificate app")
            };
            assert_eq!(
                read_back(&renewed),
                ("com.cert".into(), password.clone(), None)
            );
        }
        cancel.cancel();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
