//! The demo's deployment of several apps ([`seed::APPS`]): one folder per app under its
//! `RINGPUSH_APPS_DIR`, written against the running mocks (each app's key for its team,
//! its topic for that team, its service account for its project), read by the worker's
//! [`Apps`] and built into providers as `ringpush worker` builds them
//! ([`crate::apps::build`]) — with the mocks' endpoints and CAs. And a brand's key rotated
//! while the worker runs.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::seed::{self, APPS};
use crate::apns::binary;
use crate::apps::{build, Apps};
use crate::local::{self, AppFolder, Layout};
use crate::mock::Mock;
use crate::mock_fcm::MockFcm;

/// The apps as written, and the worker's reading of them.
pub(super) struct Deployment {
    pub apps: Arc<Apps>,
    pub folders: Vec<AppFolder>,
}

/// A key rotated while the worker ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub app: String,
    pub from: String,
    pub to: String,
}

/// Writes every app's folder under `dir` and reads them as the worker does. Over HTTP/2 each
/// app has token auth (its team's key); over the binary interface, which knows only
/// certificates, a certificate for its topic from the mock's CA (a year ahead).
pub(super) fn start(
    dir: &Path,
    mock: &Mock,
    fcm: &MockFcm,
    gateway: Option<binary::Address>,
) -> anyhow::Result<Deployment> {
    let mut folders = Vec::new();
    for app in &APPS {
        let fcm = Some((fcm, app.project));
        let folder = match gateway {
            None => local::write_app(
                dir,
                app.id,
                app.topic,
                app.key_id,
                app.team_id,
                mock,
                fcm,
                Layout::Files,
            )?,
            Some(_) => {
                let year = SystemTime::now() + Duration::from_secs(365 * 86_400);
                local::write_cert_app(dir, app.id, app.topic, year, mock, fcm, Layout::Files)?
            }
        };
        folders.push(folder);
    }
    let protocol = match gateway {
        None => build::Protocol::Http2(mock.client_settings()),
        Some(gateway) => build::Protocol::Binary(binary::Settings::new(gateway)),
    };
    let fcm_url = crate::http2::Endpoint::parse(&fcm.url()).map_err(anyhow::Error::msg)?;
    let settings = build::Settings {
        apns: build::ApnsSettings {
            protocol,
            ca_file: Some(mock.ca_file().to_owned()),
            jwt_refresh: crate::apns::jwt::DEFAULT_REFRESH,
        },
        fcm: build::FcmSettings {
            client: crate::fcm::Settings::new(fcm_url),
            ca_file: Some(fcm.ca_file().to_owned()),
        },
    };
    let apps = Apps::start(Some(dir.to_owned()), None, settings.into_build())?;
    Ok(Deployment { apps, folders })
}

impl Deployment {
    /// Gives the app [`seed::ROTATED`] a new key (its folder's next generation, the mock
    /// taking it) and has the worker read its apps again, as a poll or a SIGHUP would: every
    /// push from now on is signed with the new key; the old one is then revoked (the mock
    /// refuses it). `None` when the app has no key (certificate auth).
    pub async fn rotate(&mut self, mock: &Mock) -> anyhow::Result<Option<Rotation>> {
        let (id, key_id) = seed::ROTATED;
        let Some(folder) = self.folders.iter_mut().find(|f| f.id == id) else {
            anyhow::bail!("no app {id} to rotate");
        };
        let Some(from) = folder.key_id().map(str::to_owned) else {
            return Ok(None);
        };
        *folder = folder.rotate_key(key_id, mock, None)?;
        self.apps.reload("demo").await;
        mock.remove_key(&from);
        Ok(Some(Rotation {
            app: id.to_owned(),
            from,
            to: key_id.to_owned(),
        }))
    }
}
