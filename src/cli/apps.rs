//! An app folder's credentials built into its providers with the deployment's APNs and FCM
//! flags (endpoints, CAs, protocol, timeouts), through [`crate::apps::build`]: each app its
//! own clients, connections, JWTs and access tokens.

use std::time::Duration;

use super::apns::ApnsArgs;
use super::fcm::FcmArgs;
use crate::apps::{build, Built, Credentials};

/// The deployment's settings every app folder is built with, from the flags.
fn settings(apns: &ApnsArgs, fcm: &FcmArgs, refresh: Duration) -> build::Settings {
    build::Settings {
        apns: apns.app_settings(refresh),
        fcm: fcm.app_settings(),
    }
}

/// Builds an app's providers from its folder's credentials; an error names the `app.json`
/// field whose file is at fault.
pub(super) fn build(
    apns: &ApnsArgs,
    fcm: &FcmArgs,
    refresh: Duration,
    credentials: &Credentials,
) -> Result<Built, String> {
    settings(apns, fcm, refresh).build(credentials)
}
