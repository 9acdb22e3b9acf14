//! An app folder's credentials built into its providers with the deployment's APNs and FCM
//! settings (endpoints, CAs, protocol, timeouts), given as plain values: each app its own
//! clients, connections, JWTs and access tokens. `ringpush worker` fills [`Settings`] from
//! its flags; the demo from its mocks.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::folder::ApnsAuth;
use super::{Build, Built, Credentials};
use crate::apns::jwt::Signer;
use crate::apns::{self, binary, http2, Apns};
use crate::fcm::{self, ServiceAccount};
use crate::provider::Provider;
use crate::tls;

/// What every app's providers share: the deployment's APNs and FCM settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub apns: ApnsSettings,
    pub fcm: FcmSettings,
}

/// The deployment's APNs settings: the protocol with its endpoints and timeouts, the extra
/// CA, and how often a token-auth app's JWT is signed again.
#[derive(Debug, Clone)]
pub struct ApnsSettings {
    pub protocol: Protocol,
    /// Trusted besides the public roots (`RINGPUSH_APNS_CA_FILE`).
    pub ca_file: Option<PathBuf>,
    /// `RINGPUSH_APNS_JWT_REFRESH`, checked by the caller.
    pub jwt_refresh: Duration,
}

/// The APNs protocol (`RINGPUSH_APNS_PROTOCOL`) and its client's settings.
#[derive(Debug, Clone)]
pub enum Protocol {
    Http2(http2::Settings),
    /// The legacy binary interface: certificate auth only.
    Binary(binary::Settings),
}

/// The deployment's FCM settings: the client's (endpoint, channels, timeouts) and the extra
/// CA.
#[derive(Debug, Clone)]
pub struct FcmSettings {
    pub client: fcm::Settings,
    /// Trusted besides the public roots for FCM and its token endpoint
    /// (`RINGPUSH_FCM_CA_FILE`).
    pub ca_file: Option<PathBuf>,
}

impl Settings {
    /// Builds an app's providers from its folder's credentials; an error names the
    /// `app.json` field whose file is at fault.
    pub fn build(&self, credentials: &Credentials) -> Result<Built, String> {
        let mut providers: Vec<Arc<dyn Provider>> = Vec::new();
        let mut expires = Vec::new();
        if let Some(a) = &credentials.apns {
            let (signer, identity) = match &a.auth {
                ApnsAuth::Token {
                    pem,
                    key_id,
                    team_id,
                } => {
                    let signer = Signer::from_pem(pem, key_id, team_id, self.apns.jwt_refresh)
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
            let client = self
                .apns
                .client(signer, identity)
                .map_err(|e| format!("apns (its certificate, or RINGPUSH_APNS_CA_FILE): {e}"))?;
            let provider = apns::Provider::new(client).with_topic(Some(a.topic.clone()));
            providers.push(Arc::new(provider));
        }
        if let Some(json) = &credentials.fcm {
            let account =
                ServiceAccount::parse(json).map_err(|e| format!("fcm.credentials_file: {e}"))?;
            let client = self
                .fcm
                .client(account)
                .map_err(|e| format!("fcm (its service account, or RINGPUSH_FCM_CA_FILE): {e}"))?;
            providers.push(Arc::new(fcm::Provider::new(client)));
        }
        Ok(Built { providers, expires })
    }

    /// [`Settings::build`] as [`super::Apps::start`] takes it: every folder's app alike.
    pub fn into_build(self) -> Build {
        Arc::new(move |_app, credentials| self.build(credentials))
    }
}

impl ApnsSettings {
    /// A client of an app's own credentials — a signer (token auth) or a client certificate
    /// — with the deployment's endpoints, CA, protocol and timeouts. Its own connections: two
    /// apps never share one.
    pub fn client(
        &self,
        signer: Option<Signer>,
        identity: Option<tls::Identity>,
    ) -> Result<Apns, String> {
        let ca = self.ca_file.as_deref();
        match &self.protocol {
            Protocol::Binary(settings) => {
                let Some(identity) = identity else {
                    return Err(
                        "the binary protocol (RINGPUSH_APNS_PROTOCOL) needs certificate auth (cert_file)"
                            .into(),
                    );
                };
                let mut config =
                    (*tls::client_config(ca, Some(identity)).map_err(|e| e.to_string())?).clone();
                config.alpn_protocols.clear();
                Ok(binary::Client::new(settings.clone(), Arc::new(config)).into())
            }
            Protocol::Http2(settings) => {
                let tls = tls::client_config(ca, identity).map_err(|e| e.to_string())?;
                Ok(http2::Client::new(settings.clone(), tls, signer.map(Arc::new)).into())
            }
        }
    }
}

impl FcmSettings {
    /// A client of an app's own service account with the deployment's endpoint, CA,
    /// channels and timeouts: its own connections and access tokens.
    pub fn client(&self, account: ServiceAccount) -> Result<fcm::Client, String> {
        let tls = tls::client_config(self.ca_file.as_deref(), None).map_err(|e| e.to_string())?;
        fcm::Client::new(self.client.clone(), account, tls).map_err(|e| e.to_string())
    }
}

#[cfg(all(test, feature = "kit"))]
mod tests {
    use super::*;
    use crate::apps::folder::ApnsCredentials;
    use crate::token::Platform;

    fn settings(protocol: Protocol) -> Settings {
        let fcm_url = crate::http2::Endpoint::parse("https://localhost:1").unwrap();
        Settings {
            apns: ApnsSettings {
                protocol,
                ca_file: None,
                jwt_refresh: crate::apns::jwt::DEFAULT_REFRESH,
            },
            fcm: FcmSettings {
                client: fcm::Settings::new(fcm_url),
                ca_file: None,
            },
        }
    }

    fn http2() -> Protocol {
        let url = apns::request::Endpoint::parse("https://localhost:1").unwrap();
        Protocol::Http2(http2::Settings::new(url.clone(), url))
    }

    /// Token auth for `com.brand.bell` with a new key, and a new service account.
    fn credentials() -> Credentials {
        // A .p8 key as Apple issues one: P-256, PEM PKCS#8.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let account = fcm::credentials::generate(
            "brand-project",
            "push@brand-project.iam.gserviceaccount.com",
            "https://localhost:1/token",
        )
        .unwrap();
        Credentials {
            apns: Some(ApnsCredentials {
                topic: "com.brand.bell".into(),
                auth: ApnsAuth::Token {
                    pem: key.serialize_pem().into_bytes(),
                    key_id: "KEY0000001".into(),
                    team_id: "TEAM000001".into(),
                },
            }),
            fcm: Some(account.into_bytes()),
        }
    }

    #[tokio::test]
    async fn a_folder_with_a_key_and_a_service_account_becomes_an_apns_and_an_fcm_provider() {
        let built = settings(http2()).build(&credentials()).unwrap();
        let platforms: Vec<Platform> = built.providers.iter().map(|p| p.platform()).collect();
        assert_eq!(platforms, [Platform::APNS, Platform::FCM]);
        assert!(built.expires.is_empty(), "token auth expires nothing");
    }

    #[tokio::test]
    async fn each_mistake_names_the_field_of_app_json_at_fault() {
        let mut bad_key = credentials();
        if let Some(ApnsCredentials {
            auth: ApnsAuth::Token { pem, .. },
            ..
        }) = &mut bad_key.apns
        {
            *pem = b"not a key".to_vec();
        }
        let error = settings(http2()).build(&bad_key).err().unwrap();
        assert!(error.starts_with("apns.key_file: "), "{error}");

        let mut bad_account = credentials();
        bad_account.fcm = Some(b"{}".to_vec());
        let error = settings(http2()).build(&bad_account).err().unwrap();
        assert!(error.starts_with("fcm.credentials_file: "), "{error}");

        let gateway = binary::Address::parse("localhost:1").unwrap();
        let binary = settings(Protocol::Binary(binary::Settings::new(gateway)));
        let error = binary.build(&credentials()).err().unwrap();
        assert!(error.contains("certificate auth (cert_file)"), "{error}");
    }
}
