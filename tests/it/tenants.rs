//! The mocks serve many apps at once (contract v3, "Many apps in one deployment"): each
//! request is taken with its own app's JWT and topic, certificate, or access token and
//! project, and refused with another app's — over real TLS and HTTP/2, with app folders
//! written by `ringpush::local` as the worker will read them. Credentials change while the
//! mocks run: keys and accounts added, rotated and revoked.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use ringpush::apns::http2::Client;
use ringpush::apns::jwt;
use ringpush::apns::request::{Notification, PushType};
use ringpush::apns::{Answer, Environment, Reason};
use ringpush::fcm::answer::{Code, Verdict};
use ringpush::local::{self, AppApns, AppFolder, Layout};
use ringpush::mock::{self, Mock};
use ringpush::mock_fcm::MockFcm;
use ringpush::tls::{self, Identity};
use ringpush::token::{random_hex, DeviceToken};
use tokio_util::sync::CancellationToken;

use crate::support::App;

/// Running mocks and an apps folder, all gone on drop.
struct Tenants {
    dir: PathBuf,
    apps: PathBuf,
    apns: Mock,
    fcm: MockFcm,
    cancel: CancellationToken,
}

impl Drop for Tenants {
    fn drop(&mut self) {
        self.cancel.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Tenants {
    /// Mocks that check nothing yet: every app written adds its own credentials.
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("ringpush-tenants-{}", random_hex(6)));
        let cancel = CancellationToken::new();
        let settings = mock::Settings::local(dir.join("apns-certs"), mock::AuthCheck::default());
        let apns = Mock::start(settings, cancel.clone()).await.unwrap();
        let settings = ringpush::mock_fcm::Settings::local(dir.join("fcm-certs"));
        let fcm = MockFcm::start(settings, cancel.clone()).await.unwrap();
        Self {
            apps: dir.join("apps"),
            dir,
            apns,
            fcm,
            cancel,
        }
    }

    /// A token-auth APNs client signing with the app's key.
    fn apns_client(&self, app: &AppFolder) -> Client {
        let signer = app.key().unwrap().signer().unwrap();
        self.apns.client(Arc::new(signer)).unwrap()
    }

    /// A certificate-auth APNs client with the app's .p12.
    fn cert_client(&self, app: &AppFolder) -> Client {
        let AppApns::Certificate { file, password, .. } = &app.apns else {
            panic!("{} has no certificate", app.id);
        };
        let identity = Identity::from_file(file, password).unwrap();
        let tls = tls::client_config(Some(self.apns.ca_file()), Some(identity)).unwrap();
        Client::new(self.apns.client_settings(), tls, None)
    }

    /// An FCM client with a service-account JSON (its project: `project`, when given).
    fn fcm_client(&self, json: &str, project: Option<&str>) -> ringpush::fcm::Client {
        let mut v: serde_json::Value = serde_json::from_str(json).unwrap();
        if let Some(project) = project {
            v["project_id"] = project.into();
        }
        let account = ringpush::fcm::ServiceAccount::parse(v.to_string().as_bytes()).unwrap();
        let tls = tls::client_config(Some(self.fcm.ca_file()), None).unwrap();
        let url = ringpush::http2::Endpoint::parse(&self.fcm.url()).unwrap();
        ringpush::fcm::Client::new(ringpush::fcm::Settings::new(url), account, tls).unwrap()
    }
}

async fn push(client: &Client, topic: &str, push_type: PushType) -> Answer {
    let notification = Notification {
        push_type,
        token: DeviceToken::parse(&random_hex(32)).unwrap(),
        topic: topic.into(),
        collapse_id: random_hex(8),
        expiration: jwt::unix_now() + 60,
        payload: Bytes::from_static(br#"{"aps":{"alert":"ring"}}"#),
    };
    client
        .send(Environment::Production, &notification)
        .await
        .unwrap()
}

fn refused(answer: &Answer) -> Option<Reason> {
    match answer {
        Answer::Accepted => None,
        Answer::Rejected(r) => Some(r.reason.clone()),
    }
}

#[tokio::test]
async fn each_app_is_taken_with_its_own_key_and_topic_and_refused_with_anothers() {
    let t = Tenants::start().await;
    let brand = local::write_app(
        &t.apps,
        "brand",
        "com.brand.doorbell",
        "KEYBRAND01",
        "TEAMBRAND1",
        &t.apns,
        None,
        Layout::Files,
    )
    .unwrap();
    let partner = local::write_app(
        &t.apps,
        "partner",
        "com.partner.bell",
        "KEYPARTNR1",
        "TEAMPARTN1",
        &t.apns,
        None,
        Layout::Secret,
    )
    .unwrap();
    let (brand_client, partner_client) = (t.apns_client(&brand), t.apns_client(&partner));
    assert_eq!(
        refused(&push(&brand_client, "com.brand.doorbell", PushType::Alert).await),
        None
    );
    assert_eq!(
        refused(&push(&brand_client, "com.brand.doorbell.voip", PushType::Voip).await),
        None
    );
    assert_eq!(
        refused(&push(&partner_client, "com.partner.bell", PushType::Alert).await),
        None
    );
    // Another app's topic: its team is not the JWT's.
    assert_eq!(
        refused(&push(&brand_client, "com.partner.bell", PushType::Alert).await),
        Some(Reason::TopicDisallowed)
    );
    assert_eq!(
        refused(&push(&partner_client, "com.brand.doorbell.voip", PushType::Voip).await),
        Some(Reason::TopicDisallowed)
    );
    // A key the mock was never given, of a known team.
    let stranger = ringpush::local::Key::generate("KEYSTRANGE", "TEAMBRAND1").unwrap();
    let stranger = t.apns.client(Arc::new(stranger.signer().unwrap())).unwrap();
    assert_eq!(
        refused(&push(&stranger, "com.brand.doorbell", PushType::Alert).await),
        Some(Reason::InvalidProviderToken)
    );
    // Each request is kept with the topic, key and team it carried.
    let carried: Vec<_> = t
        .apns
        .received()
        .iter()
        .map(|r| {
            (
                r.status,
                r.topic.clone().unwrap(),
                r.key_id.clone().unwrap(),
                r.team_id.clone().unwrap(),
            )
        })
        .collect();
    let row = |status: u16, topic: &str, key: &str, team: &str| {
        (status, topic.to_owned(), key.to_owned(), team.to_owned())
    };
    assert_eq!(
        carried,
        vec![
            row(200, "com.brand.doorbell", "KEYBRAND01", "TEAMBRAND1"),
            row(200, "com.brand.doorbell.voip", "KEYBRAND01", "TEAMBRAND1"),
            row(200, "com.partner.bell", "KEYPARTNR1", "TEAMPARTN1"),
            row(400, "com.partner.bell", "KEYBRAND01", "TEAMBRAND1"),
            row(400, "com.brand.doorbell.voip", "KEYPARTNR1", "TEAMPARTN1"),
            row(403, "com.brand.doorbell", "KEYSTRANGE", "TEAMBRAND1"),
        ]
    );
    // The folders say what the worker needs, through a Secret's symlinks too.
    for app in [&brand, &partner] {
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(app.app_json()).unwrap()).unwrap();
        assert_eq!(json["apns"]["key_id"], app.key_id().unwrap());
        let key_file = app.dir.join(json["apns"]["key_file"].as_str().unwrap());
        let pem = std::fs::read(key_file).unwrap();
        assert_eq!(pem, app.key().unwrap().pem.as_bytes());
    }
    assert!(std::fs::symlink_metadata(partner.app_json())
        .unwrap()
        .is_symlink());
}

#[tokio::test]
async fn a_rotated_key_is_taken_beside_the_old_until_the_old_is_revoked() {
    let t = Tenants::start().await;
    for layout in [Layout::Files, Layout::Secret] {
        let id = format!("brand-{layout:?}").to_lowercase();
        let (topic, old_key, new_key) = match layout {
            Layout::Files => ("com.files.bell", "KEYFILES01", "KEYFILES02"),
            Layout::Secret => ("com.secret.bell", "KEYSECRT01", "KEYSECRT02"),
        };
        let old = local::write_app(
            &t.apps,
            &id,
            topic,
            old_key,
            "TEAMBRAND1",
            &t.apns,
            Some((&t.fcm, "proj-brand")),
            layout,
        )
        .unwrap();
        let old_client = t.apns_client(&old);
        assert_eq!(
            refused(&push(&old_client, topic, PushType::Alert).await),
            None
        );
        let new = old.rotate_key(new_key, &t.apns, Some(&t.fcm)).unwrap();
        assert_eq!(new.generation, 2);
        assert_ne!(
            new.client_email(),
            old.client_email(),
            "a new service account"
        );
        // The folder names the new key and account, the old files aside or gone.
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(new.app_json()).unwrap()).unwrap();
        assert_eq!(json["apns"]["key_id"], new_key);
        let key_file = new.dir.join(json["apns"]["key_file"].as_str().unwrap());
        assert_eq!(
            std::fs::read(&key_file).unwrap(),
            new.key().unwrap().pem.as_bytes()
        );
        let fcm_file = new
            .dir
            .join(json["fcm"]["credentials_file"].as_str().unwrap());
        let account: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fcm_file).unwrap()).unwrap();
        assert_eq!(account["client_email"], new.client_email().unwrap());
        if layout == Layout::Secret {
            let generations = std::fs::read_dir(&new.dir)
                .unwrap()
                .filter(|e| {
                    let name = e.as_ref().unwrap().file_name();
                    let name = name.to_string_lossy();
                    name.starts_with("..") && name != "..data"
                })
                .count();
            assert_eq!(generations, 1, "the old generation is removed");
        }
        // Both keys are taken until the old one is revoked.
        let new_client = t.apns_client(&new);
        assert_eq!(
            refused(&push(&new_client, topic, PushType::Alert).await),
            None
        );
        assert_eq!(
            refused(&push(&old_client, topic, PushType::Alert).await),
            None
        );
        t.apns.remove_key(old_key);
        assert_eq!(
            refused(&push(&old_client, topic, PushType::Alert).await),
            Some(Reason::InvalidProviderToken)
        );
        assert_eq!(
            refused(&push(&new_client, topic, PushType::Alert).await),
            None
        );
    }
}

#[tokio::test]
async fn a_certificate_sends_to_its_own_topic_only() {
    let t = Tenants::start().await;
    let in_ten_days = SystemTime::now() + Duration::from_secs(10 * 86_400);
    let installer = local::write_cert_app(
        &t.apps,
        "installer",
        "com.installer.bell",
        in_ten_days,
        &t.apns,
        None,
        Layout::Secret,
    )
    .unwrap();
    // A token-auth app beside it, whose topic the certificate may not use.
    local::write_app(
        &t.apps,
        "brand",
        "com.brand.doorbell",
        "KEYBRAND01",
        "TEAMBRAND1",
        &t.apns,
        None,
        Layout::Files,
    )
    .unwrap();
    let client = t.cert_client(&installer);
    assert_eq!(
        refused(&push(&client, "com.installer.bell", PushType::Alert).await),
        None
    );
    assert_eq!(
        refused(&push(&client, "com.installer.bell.voip", PushType::Voip).await),
        None
    );
    assert_eq!(
        refused(&push(&client, "com.brand.doorbell", PushType::Alert).await),
        Some(Reason::TopicDisallowed)
    );
    let received = t.apns.received();
    assert_eq!(received.len(), 3);
    for r in &received {
        assert!(r.certificate);
        assert_eq!(r.certificate_topic.as_deref(), Some("com.installer.bell"));
        assert_eq!((r.key_id.as_deref(), r.team_id.as_deref()), (None, None));
    }
    // A renewed certificate is the folder's next generation, and is taken as well.
    let renewed = installer
        .renew_certificate(
            in_ten_days + Duration::from_secs(365 * 86_400),
            &t.apns,
            None,
        )
        .unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(renewed.app_json()).unwrap()).unwrap();
    assert_eq!(json["apns"]["cert_file"], "apns.p12");
    let client = t.cert_client(&renewed);
    assert_eq!(
        refused(&push(&client, "com.installer.bell", PushType::Alert).await),
        None
    );
}

#[tokio::test]
async fn each_service_account_sends_for_its_own_project_and_tokens_for_theirs() {
    let t = Tenants::start().await;
    let json_a = t.fcm.new_account("proj-a").unwrap();
    let json_b = t.fcm.new_account("proj-b").unwrap();
    let email = |json: &str| {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        v["client_email"].as_str().unwrap().to_owned()
    };
    let (a, b) = (t.fcm_client(&json_a, None), t.fcm_client(&json_b, None));
    // A's key, sending under B's project.
    let a_as_b = t.fcm_client(&json_a, Some("proj-b"));
    let ring = App::ring("gw-tenants", Duration::ZERO);
    let alert = ringpush::apns::request::AlertTemplate::default();
    let style = ringpush::fcm::message::Style {
        alert: &alert,
        channel: "doorbell",
    };
    let message =
        ringpush::fcm::message::Template::new(&ring, "Door", ringpush::token::Kind::Alert, &style);
    let expiration = ring.expires_at(Duration::from_secs(60));
    let phone = DeviceToken::parse_fcm("phone-of-b:APA91b").unwrap();
    let send = |client: &ringpush::fcm::Client| {
        let (message, phone) = (&message, &phone);
        let client = client.clone();
        async move { client.send(message, phone, expiration).await.unwrap() }
    };
    assert_eq!(send(&a).await, Verdict::Accepted);
    assert_eq!(send(&b).await, Verdict::Accepted);
    assert_eq!(
        send(&a_as_b).await,
        Verdict::Rejected {
            code: Code::PermissionDenied,
            ours: true
        }
    );
    // The phone registered with B's project: A's sends are answered as FCM answers them.
    t.fcm.bind_token(phone.as_str(), "proj-b");
    assert_eq!(send(&a).await, Verdict::Dead(Code::SenderIdMismatch));
    assert_eq!(send(&b).await, Verdict::Accepted);
    let seen: Vec<_> = t
        .fcm
        .received()
        .iter()
        .map(|r| (r.status, r.project.clone(), r.account.clone().unwrap()))
        .collect();
    let (ea, eb) = (email(&json_a), email(&json_b));
    assert_eq!(
        seen,
        vec![
            (200, "proj-a".to_owned(), ea.clone()),
            (200, "proj-b".to_owned(), eb.clone()),
            (403, "proj-b".to_owned(), ea.clone()),
            (403, "proj-a".to_owned(), ea.clone()),
            (200, "proj-b".to_owned(), eb.clone()),
        ]
    );
    // A deleted account: its token is answered 401 and its assertions refused; B sends on.
    t.fcm.remove_account(&ea);
    assert!(a.send(&message, &phone, expiration).await.is_err());
    let stats = t.fcm.stats();
    assert!(
        stats.unauthenticated >= 1 && stats.token_refusals >= 1,
        "{stats:?}"
    );
    assert_eq!(send(&b).await, Verdict::Accepted);
    assert_eq!(t.fcm.accounts(), vec![eb]);
}
