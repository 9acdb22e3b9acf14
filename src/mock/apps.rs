//! The mocks' reading of an apps folder (`--apps-dir`, contract v3): `DIR/<app id>/app.json`
//! naming each app's APNs topic and key (or certificate) and its Firebase service account,
//! files relative to the app's folder. Just what the mocks accept from it — each app's key
//! for its team, its topic for that team, its service account; the worker's own loader
//! (reload, errors per app) is not this one.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One app of the folder, as the mocks read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    /// The folder's name.
    pub id: String,
    pub apns: Option<Apns>,
    /// The service-account JSON, resolved against the app's folder.
    pub fcm_credentials: Option<PathBuf>,
}

/// An app's APNs part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Apns {
    pub topic: String,
    /// Token auth: the .p8 file (resolved), its key id and team; `None` for certificate auth,
    /// which the mock takes through its CA alone.
    pub key: Option<(PathBuf, String, String)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppJson {
    apns: Option<ApnsJson>,
    fcm: Option<FcmJson>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApnsJson {
    topic: String,
    key_file: Option<PathBuf>,
    key_id: Option<String>,
    team_id: Option<String>,
    cert_file: Option<PathBuf>,
    cert_password_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FcmJson {
    credentials_file: PathBuf,
}

/// Whether `id` is an app id: 1–64 of `a-z 0-9 _ -`.
pub fn is_app_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Reads every `dir/<app>/app.json`, in the order of the apps' ids. Entries starting with
/// a dot are passed over (a mounted volume's own); any other entry must be an app's folder
/// with a valid `app.json`. Errors name the file.
pub fn read(dir: &Path) -> Result<Vec<App>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("apps folder {}: {e}", dir.display()))?;
    let mut apps = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("apps folder {}: {e}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let folder = entry.path();
        if !is_app_id(&name) {
            return Err(format!(
                "{}: not an app id (1 to 64 of a-z, 0-9, _ and -)",
                folder.display()
            ));
        }
        apps.push(read_app(&name, &folder)?);
    }
    apps.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(apps)
}

fn read_app(id: &str, folder: &Path) -> Result<App, String> {
    let file = folder.join("app.json");
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", file.display());
    let text = std::fs::read(&file).map_err(|e| err(&e))?;
    let json: AppJson = serde_json::from_slice(&text).map_err(|e| err(&e))?;
    let apns = match json.apns {
        None => None,
        Some(a) => {
            let key = match (a.key_file, a.key_id, a.team_id, a.cert_file) {
                (Some(f), Some(k), Some(t), None) => Some((folder.join(f), k, t)),
                (None, None, None, Some(_)) => None,
                _ => {
                    return Err(err(
                        &"apns needs key_file, key_id and team_id, or cert_file",
                    ));
                }
            };
            if a.cert_password_file.is_some() && key.is_some() {
                return Err(err(&"apns: cert_password_file without cert_file"));
            }
            Some(Apns {
                topic: a.topic,
                key,
            })
        }
    };
    Ok(App {
        id: id.to_owned(),
        apns,
        fcm_credentials: json.fcm.map(|f| folder.join(f.credentials_file)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_apps_folder_reads_as_each_apps_key_topic_and_account() {
        let dir =
            std::env::temp_dir().join(format!("ringpush-apps-{}", crate::token::random_hex(6)));
        let write = |app: &str, json: &str| {
            std::fs::create_dir_all(dir.join(app)).unwrap();
            std::fs::write(dir.join(app).join("app.json"), json).unwrap();
        };
        write(
            "brand",
            r#"{"apns": {"topic": "com.brand.doorbell", "key_file": "apns.p8", "key_id": "ABC123DEFG", "team_id": "TEAM123456"}, "fcm": {"credentials_file": "fcm.json"}}"#,
        );
        write(
            "installer_2",
            r#"{"apns": {"topic": "com.installer", "cert_file": "apns.p12", "cert_password_file": "apns.pass"}}"#,
        );
        std::fs::create_dir_all(dir.join("..data")).unwrap();
        let apps = read(&dir).unwrap();
        assert_eq!(
            apps,
            vec![
                App {
                    id: "brand".into(),
                    apns: Some(Apns {
                        topic: "com.brand.doorbell".into(),
                        key: Some((
                            dir.join("brand/apns.p8"),
                            "ABC123DEFG".into(),
                            "TEAM123456".into()
                        )),
                    }),
                    fcm_credentials: Some(dir.join("brand/fcm.json")),
                },
                App {
                    id: "installer_2".into(),
                    apns: Some(Apns {
                        topic: "com.installer".into(),
                        key: None
                    }),
                    fcm_credentials: None,
                },
            ]
        );
        write("half", r#"{"apns": {"topic": "t", "key_file": "apns.p8"}}"#);
        assert!(read(&dir).unwrap_err().contains("half/app.json"));
        std::fs::remove_dir_all(dir.join("half")).unwrap();
        write("Upper", "{}");
        assert!(read(&dir).unwrap_err().contains("not an app id"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(is_app_id("a") && is_app_id(&"a".repeat(64)));
        assert!(!is_app_id("") && !is_app_id(&"a".repeat(65)) && !is_app_id("a.b"));
    }
}
