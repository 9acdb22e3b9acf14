//! An app folder's credentials built into its providers with the deployment's APNs and FCM
//! settings (endpoints, CAs, protocol, timeouts): each app its own clients, connections,
//! JWTs and access tokens.

use std::sync::Arc;
use std::time::Duration;

use super::apns::ApnsArgs;
use super::fcm::FcmArgs;
use crate::apns::jwt::Signer;
use crate::apps::folder::ApnsAuth;
use crate::apps::{Built, Credentials};
use crate::fcm::ServiceAccount;
use crate::provider::Provider;
use crate::tls;

/// Builds an app's providers from its folder's credentials; an error names the `app.json`
/// field whose file is at fault.
pub(super) fn build(
    apns: &ApnsArgs,
    fcm: &FcmArgs,
    refresh: Duration,
    credentials: &Credentials,
) -> Result<Built, String> {
    let mut providers: Vec<Arc<dyn Provider>> = Vec::new();
    let mut expires = Vec::new();
    if let Some(a) = &credentials.apns {
        let (signer, identity) = match &a.auth {
            ApnsAuth::Token {
                pem,
                key_id,
                team_id,
            } => {
                let signer = Signer::from_pem(pem, key_id, team_id, refresh)
                    .map_err(|e| format!("apns.key_file: {e}"))?;
                (Some(signer), None)
            }
            ApnsAuth::Certificate { file, password } => {
                let identity = tls::Identity::from_file(file, password)
                    .map_err(|e| format!("apns.cert_file: {e}"))?;
                if let Some(at) = identity.not_after() {
                    expires.push(("apns", at));
                }
                (None, Some(identity))
            }
        };
        let client = apns
            .client_with(signer, identity)
            .map_err(|e| format!("apns (its certificate, or RINGPUSH_APNS_CA_FILE): {e}"))?;
        let provider = crate::apns::Provider::new(client).with_topic(Some(a.topic.clone()));
        providers.push(Arc::new(provider));
    }
    if let Some(json) = &credentials.fcm {
        let account =
            ServiceAccount::parse(json).map_err(|e| format!("fcm.credentials_file: {e}"))?;
        let client = fcm
            .client_with(account)
            .map_err(|e| format!("fcm (its service account, or RINGPUSH_FCM_CA_FILE): {e}"))?;
        providers.push(Arc::new(crate::fcm::Provider::new(client)));
    }
    Ok(Built { providers, expires })
}
