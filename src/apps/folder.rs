//! One app's folder under `RINGPUSH_APPS_DIR`: `app.json` and the credential files it names
//! (relative to the folder, as a Kubernetes Secret mounts its keys), either part absent:
//!
//! ```json
//! {"apns": {"topic": "com.brand.doorbell", "key_file": "apns.p8", "key_id": "ABC123DEFG", "team_id": "TEAM123456"},
//!  "fcm":  {"credentials_file": "fcm.json"}}
//! ```
//!
//! or, for certificate auth, `"apns": {"topic": "…", "cert_file": "apns.p12",
//! "cert_password_file": "apns.pass"}`. Endpoints, CAs and timeouts are the deployment's.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::Read;

/// `app.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppJson {
    pub apns: Option<ApnsJson>,
    pub fcm: Option<FcmJson>,
}

/// `app.json`'s `apns`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsJson {
    pub topic: String,
    pub key_file: Option<String>,
    pub key_id: Option<String>,
    pub team_id: Option<String>,
    pub cert_file: Option<String>,
    pub cert_password_file: Option<String>,
}

/// `app.json`'s `fcm`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmJson {
    pub credentials_file: String,
}

/// An app's credentials, read and checked (not yet built into clients).
#[derive(Clone)]
pub struct Credentials {
    pub apns: Option<ApnsCredentials>,
    /// The service account's JSON.
    pub fcm: Option<Vec<u8>>,
}

/// An app's APNs credentials: its topic (bundle id) and its auth.
#[derive(Clone)]
pub struct ApnsCredentials {
    pub topic: String,
    pub auth: ApnsAuth,
}

/// Token auth (a team's .p8 key) or certificate auth.
#[derive(Clone)]
pub enum ApnsAuth {
    Token {
        pem: Vec<u8>,
        key_id: String,
        team_id: String,
    },
    Certificate {
        /// The .p12 or PEM file (read by the TLS setup).
        file: PathBuf,
        password: String,
    },
}

/// Reads `dir`'s `app.json` and every file it names. `Err`: `app.json` cannot be read at
/// all; an invalid one is `Ok` with the error in `credentials` (so that a change to it is
/// told from the same mistake read again).
pub(crate) fn read(dir: &Path) -> Result<Read, String> {
    let json_path = dir.join("app.json");
    let json = std::fs::read(&json_path).map_err(|e| format!("{}: {e}", json_path.display()))?;
    let mut files = vec![(json_path.clone(), json.clone())];
    let credentials =
        parse(dir, &json, &mut files).map_err(|e| format!("{}: {e}", json_path.display()));
    Ok(Read {
        files,
        credentials: Some(credentials),
    })
}

/// Parses `app.json` and reads the files it names into `files`.
fn parse(
    dir: &Path,
    json: &[u8],
    files: &mut Vec<(PathBuf, Vec<u8>)>,
) -> Result<Credentials, String> {
    let app: AppJson = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    if app.apns.is_none() && app.fcm.is_none() {
        return Err("names neither `apns` nor `fcm`".into());
    }
    let mut file = |field: &str, name: &str| -> Result<(PathBuf, Vec<u8>), String> {
        let path = inside(dir, field, name)?;
        let bytes =
            std::fs::read(&path).map_err(|e| format!("{field}: {}: {e}", path.display()))?;
        files.push((path.clone(), bytes.clone()));
        Ok((path, bytes))
    };
    let apns = match app.apns {
        None => None,
        Some(a) => {
            let topic = a.topic.trim();
            if topic.is_empty() || topic.len() > 255 || topic.contains(char::is_whitespace) {
                return Err(format!("apns.topic {:?} is not a bundle id", a.topic));
            }
            let token = [&a.key_file, &a.key_id, &a.team_id];
            let auth = match (&a.cert_file, token.iter().any(|f| f.is_some())) {
                (Some(_), true) => {
                    return Err("apns: either cert_file (certificate auth) or key_file, key_id and team_id (token auth), not both".into())
                }
                (Some(cert), false) => {
                    let (cert_path, _) = file("apns.cert_file", cert)?;
                    let password = match &a.cert_password_file {
                        None => String::new(),
                        Some(p) => {
                            let (_, bytes) = file("apns.cert_password_file", p)?;
                            String::from_utf8(bytes)
                                .map_err(|_| "apns.cert_password_file is not UTF-8".to_owned())?
                                .trim_end_matches(['\r', '\n'])
                                .to_owned()
                        }
                    };
                    ApnsAuth::Certificate {
                        file: cert_path,
                        password,
                    }
                }
                (None, _) => {
                    let (Some(key_file), Some(key_id), Some(team_id)) =
                        (&a.key_file, &a.key_id, &a.team_id)
                    else {
                        return Err("apns needs token auth (key_file, key_id, team_id) or certificate auth (cert_file)".into());
                    };
                    for (field, value) in [("apns.key_id", key_id), ("apns.team_id", team_id)] {
                        if value.len() != 10 || !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
                            return Err(format!("{field} {value:?} is not a 10-character Apple id"));
                        }
                    }
                    let (_, pem) = file("apns.key_file", key_file)?;
                    ApnsAuth::Token {
                        pem,
                        key_id: key_id.clone(),
                        team_id: team_id.clone(),
                    }
                }
            };
            Some(ApnsCredentials {
                topic: topic.to_owned(),
                auth,
            })
        }
    };
    let fcm = match app.fcm {
        None => None,
        Some(f) => Some(file("fcm.credentials_file", &f.credentials_file)?.1),
    };
    Ok(Credentials { apns, fcm })
}

/// `name` inside `dir`: a plain relative name (no `..`, not absolute) — a folder's files are
/// its own.
fn inside(dir: &Path, field: &str, name: &str) -> Result<PathBuf, String> {
    let path = Path::new(name);
    let plain = !name.is_empty()
        && path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain {
        return Err(format!(
            "{field} {name:?} must be a file name relative to the app's folder"
        ));
    }
    Ok(dir.join(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(files: &[(&str, &str)]) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        for (name, text) in files {
            std::fs::write(dir.0.join(name), text).unwrap();
        }
        dir
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let dir = std::env::temp_dir()
                    .join(format!("ringpush-app-{}", crate::token::random_hex(6)));
                std::fs::create_dir_all(&dir).unwrap();
                Self(dir)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn error(files: &[(&str, &str)]) -> String {
        let dir = folder(files);
        match read(&dir.0) {
            Ok(r) => match r.credentials.unwrap() {
                Ok(_) => panic!("accepted"),
                Err(e) => e,
            },
            Err(e) => e,
        }
    }

    #[test]
    fn a_folder_with_token_auth_and_fcm_is_read_with_every_file_it_names() {
        let dir = folder(&[
            (
                "app.json",
                r#"{"apns": {"topic": "com.brand.bell", "key_file": "apns.p8", "key_id": "ABC123DEFG", "team_id": "TEAM123456"}, "fcm": {"credentials_file": "fcm.json"}}"#,
            ),
            ("apns.p8", "KEY"),
            ("fcm.json", "{}"),
        ]);
        let read = read(&dir.0).unwrap();
        assert_eq!(read.files.len(), 3, "app.json, the key and the account");
        let c = read.credentials.unwrap().unwrap();
        let apns = c.apns.unwrap();
        assert_eq!(apns.topic, "com.brand.bell");
        assert!(matches!(apns.auth, ApnsAuth::Token { ref key_id, .. } if key_id == "ABC123DEFG"));
        assert_eq!(c.fcm.as_deref(), Some(&b"{}"[..]));
    }

    #[test]
    fn certificate_auth_reads_its_password_without_the_newline() {
        let dir = folder(&[
            (
                "app.json",
                r#"{"apns": {"topic": "com.brand.bell", "cert_file": "apns.p12", "cert_password_file": "apns.pass"}}"#,
            ),
            ("apns.p12", "P12"),
            ("apns.pass", "s3cret\n"),
        ]);
        let c = read(&dir.0).unwrap().credentials.unwrap().unwrap();
        assert!(c.fcm.is_none());
        match c.apns.unwrap().auth {
            ApnsAuth::Certificate { password, .. } => assert_eq!(password, "s3cret"),
            ApnsAuth::Token { .. } => panic!("token auth"),
        }
    }

    #[test]
    fn mistakes_are_named() {
        assert!(error(&[]).contains("app.json"), "no app.json");
        assert!(error(&[("app.json", "{")]).contains("app.json"));
        assert!(error(&[("app.json", "{}")]).contains("neither"));
        assert!(error(&[(
            "app.json",
            r#"{"fcm": {"credentials_file": "x.json"}, "extra": 1}"#
        )])
        .contains("extra"));
        assert!(error(&[(
            "app.json",
            r#"{"fcm": {"credentials_file": "../other/fcm.json"}}"#
        )])
        .contains("relative"));
        assert!(error(&[(
            "app.json",
            r#"{"fcm": {"credentials_file": "/etc/passwd"}}"#
        )])
        .contains("relative"));
        assert!(error(&[(
            "app.json",
            r#"{"fcm": {"credentials_file": "missing.json"}}"#
        )])
        .contains("fcm.credentials_file"));
        let both = r#"{"apns": {"topic": "t", "cert_file": "c", "key_file": "k"}}"#;
        assert!(error(&[("app.json", both)]).contains("not both"));
        let short = r#"{"apns": {"topic": "t", "key_file": "k", "key_id": "SHORT", "team_id": "TEAM123456"}}"#;
        assert!(error(&[("app.json", short), ("k", "x")]).contains("apns.key_id"));
        let half = r#"{"apns": {"topic": "t", "key_file": "k"}}"#;
        assert!(error(&[("app.json", half)]).contains("token auth"));
        let spaced = r#"{"apns": {"topic": "com.a b", "cert_file": "c"}}"#;
        assert!(error(&[("app.json", spaced)]).contains("apns.topic"));
    }
}
