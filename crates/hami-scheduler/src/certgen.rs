//! The webhook's certificates without cert-manager, as the Helm chart's
//! two hook Jobs use them (`hami-certgen create` before install, `hami-certgen
//! patch` after): a private CA and a serving certificate in one
//! `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`, `ca.crt`, the layout
//! cert-manager writes too), the CA put into the MutatingWebhookConfiguration,
//! and the Secret owned by the scheduler Deployment so that `helm uninstall`
//! removes it with the Deployment.

use std::collections::BTreeMap;
use std::net::IpAddr;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Annotation on the Secret: the names and addresses the certificate is for,
/// so `create` knows whether an existing Secret still fits.
pub const HOSTS_ANNOTATION: &str = "hami.io/certgen-hosts";
/// Annotation on the Secret: when the certificate expires (RFC 3339).
pub const EXPIRES_ANNOTATION: &str = "hami.io/certgen-not-after";
/// A Secret expiring within this is renewed by the next `create`
/// (every `helm upgrade` runs it).
pub const RENEW_BEFORE: SignedDuration = SignedDuration::from_hours(30 * 24);

/// A CA and a serving certificate signed by it, in PEM.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub ca_crt: String,
    pub tls_crt: String,
    pub tls_key: String,
    pub not_after: Timestamp,
}

/// The hosts a certificate is for, in the annotation's form: sorted, joined
/// with commas.
pub fn hosts_key(dns: &[String], ips: &[IpAddr]) -> String {
    let mut all: Vec<String> = dns.to_vec();
    all.extend(ips.iter().map(|i| i.to_string()));
    all.sort();
    all.dedup();
    all.join(",")
}

/// A fresh CA and a serving certificate for `dns` and `ips`, valid for
/// `days` from now.
pub fn generate(dns: &[String], ips: &[IpAddr], days: i64) -> anyhow::Result<Bundle> {
    anyhow::ensure!(
        !dns.is_empty() || !ips.is_empty(),
        "a certificate needs at least one --dns name or --ip"
    );
    anyhow::ensure!(days > 0, "the validity must be at least one day");
    let now = Timestamp::now();
    let not_after = now + SignedDuration::from_hours(24 * days);
    let to_time = |t: Timestamp| {
        rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(t.as_second() as u64)
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "hami-rs webhook CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = to_time(now - SignedDuration::from_hours(1));
    ca.not_after = to_time(not_after);
    let ca_cert = ca.self_signed(&ca_key)?;
    let ca_crt = ca_cert.pem();
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    let cn = dns.first().cloned().unwrap_or_else(|| ips[0].to_string());
    p.distinguished_name.push(DnType::CommonName, cn);
    for d in dns {
        p.subject_alt_names
            .push(SanType::DnsName(d.clone().try_into()?));
    }
    for ip in ips {
        p.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.not_before = to_time(now - SignedDuration::from_hours(1));
    p.not_after = to_time(not_after);
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Bundle {
        ca_crt,
        tls_crt: cert.pem(),
        tls_key: key.serialize_pem(),
        not_after,
    })
}

/// Whether an existing Secret can stay: it has all three keys, was made for
/// exactly these hosts, and does not expire within [`RENEW_BEFORE`].
pub fn secret_fits(secret: &Secret, hosts: &str, now: Timestamp) -> Result<(), String> {
    let data = secret.data.clone().unwrap_or_default();
    if secret.type_.as_deref() != Some("kubernetes.io/tls") {
        return Err(format!(
            "it is of type {}, not kubernetes.io/tls",
            secret.type_.as_deref().unwrap_or("Opaque")
        ));
    }
    for k in ["tls.crt", "tls.key", "ca.crt"] {
        if data.get(k).is_none_or(|v| v.0.is_empty()) {
            return Err(format!("it has no {k}"));
        }
    }
    let ann = secret.metadata.annotations.clone().unwrap_or_default();
    if ann.get(HOSTS_ANNOTATION).map(String::as_str) != Some(hosts) {
        return Err(format!(
            "it is for {:?}, not {hosts:?}",
            ann.get(HOSTS_ANNOTATION)
        ));
    }
    let expires: Option<Timestamp> = ann.get(EXPIRES_ANNOTATION).and_then(|t| t.parse().ok());
    match expires {
        Some(t) if t - RENEW_BEFORE > now => Ok(()),
        Some(t) => Err(format!("it expires at {t}")),
        None => Err("its expiry is unknown".into()),
    }
}

/// The Secret holding `bundle`.
pub fn secret(namespace: &str, name: &str, hosts: &str, bundle: &Bundle) -> Secret {
    let b = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            annotations: Some(BTreeMap::from([
                (HOSTS_ANNOTATION.to_string(), hosts.to_string()),
                (EXPIRES_ANNOTATION.to_string(), bundle.not_after.to_string()),
            ])),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "hami-certgen".to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("ca.crt".to_string(), b(&bundle.ca_crt)),
            ("tls.crt".to_string(), b(&bundle.tls_crt)),
            ("tls.key".to_string(), b(&bundle.tls_key)),
        ])),
        ..Default::default()
    }
}

/// What [`create`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Created {
    Kept,
    Created,
    Replaced(String),
}

/// Makes sure the Secret `name` holds a certificate for these hosts: keeps a
/// fitting one (so pods already trusting its CA keep working), else writes a
/// new one.
pub async fn create(
    client: kube::Client,
    namespace: &str,
    name: &str,
    dns: &[String],
    ips: &[IpAddr],
    days: i64,
) -> anyhow::Result<Created> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let hosts = hosts_key(dns, ips);
    let existing = api.get_opt(name).await?;
    let why = match &existing {
        Some(s) => match secret_fits(s, &hosts, Timestamp::now()) {
            Ok(()) => return Ok(Created::Kept),
            Err(why) => Some(why),
        },
        None => None,
    };
    let bundle = generate(dns, ips, days)?;
    let mut fresh = secret(namespace, name, &hosts, &bundle);
    match (existing, why) {
        // A Secret's type cannot change (HAMi's certificate Job leaves an
        // Opaque one of the same name behind): delete it, then create.
        (Some(old), Some(why)) if old.type_.as_deref() != Some("kubernetes.io/tls") => {
            api.delete(name, &Default::default()).await?;
            api.create(&PostParams::default(), &fresh).await?;
            Ok(Created::Replaced(format!(
                "{why}; it was of type {}",
                old.type_.as_deref().unwrap_or("Opaque")
            )))
        }
        (Some(old), Some(why)) => {
            // Replace keeps the owner set by `patch` and guards against a
            // concurrent writer through the resourceVersion.
            fresh.metadata.resource_version = old.metadata.resource_version;
            fresh.metadata.owner_references = old.metadata.owner_references;
            api.replace(name, &PostParams::default(), &fresh).await?;
            Ok(Created::Replaced(why))
        }
        _ => {
            api.create(&PostParams::default(), &fresh).await?;
            Ok(Created::Created)
        }
    }
}

/// Puts the Secret's CA into every webhook of the MutatingWebhookConfiguration
/// `webhook` (when given), and, with `owner`, makes that Deployment own the
/// Secret. Returns how many webhooks were patched.
pub async fn patch(
    client: kube::Client,
    namespace: &str,
    name: &str,
    webhook: Option<&str>,
    owner: Option<&str>,
) -> anyhow::Result<usize> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = secrets.get(name).await?;
    let mut patched = 0;
    if let Some(webhook) = webhook {
        let ca = secret
            .data
            .as_ref()
            .and_then(|d| d.get("ca.crt"))
            .filter(|c| !c.0.is_empty())
            .ok_or_else(|| anyhow::anyhow!("Secret {namespace}/{name} has no ca.crt"))?
            .clone();
        let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        let config = configs.get(webhook).await?;
        patched = config.webhooks.as_ref().map_or(0, Vec::len);
        anyhow::ensure!(
            patched > 0,
            "MutatingWebhookConfiguration {webhook} has no webhooks"
        );
        let ops: Vec<serde_json::Value> = (0..patched)
            .map(|i| {
                serde_json::json!({
                    "op": "add",
                    "path": format!("/webhooks/{i}/clientConfig/caBundle"),
                    "value": ca,
                })
            })
            .collect();
        let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))?;
        configs
            .patch(webhook, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await?;
    }
    if let Some(owner) = owner {
        let deployments: Api<Deployment> = Api::namespaced(client, namespace);
        let d = deployments.get(owner).await?;
        let uid = d
            .metadata
            .uid
            .ok_or_else(|| anyhow::anyhow!("Deployment {owner} has no uid"))?;
        let reference = OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: owner.to_string(),
            uid,
            ..Default::default()
        };
        let body = serde_json::json!({"metadata": {"ownerReferences": [reference]}});
        secrets
            .patch(name, &PatchParams::default(), &Patch::Merge(&body))
            .await?;
    }
    Ok(patched)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dns() -> Vec<String> {
        vec!["hami-scheduler.kube-system.svc".into()]
    }

    #[test]
    fn the_certificate_names_every_host_and_chains_to_its_ca() {
        let ips = ["127.0.0.1".parse().unwrap()];
        let b = generate(&dns(), &ips, 365).unwrap();
        assert!(b.ca_crt.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(b.tls_key.contains("PRIVATE KEY"));
        // The serving certificate verifies against the CA for both names.
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut b.ca_crt.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            rustls::crypto::ring::default_provider().into(),
        )
        .build()
        .unwrap();
        let leaf = rustls_pemfile::certs(&mut b.tls_crt.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        use rustls::client::danger::ServerCertVerifier as _;
        let now = rustls::pki_types::UnixTime::now();
        for host in ["hami-scheduler.kube-system.svc", "127.0.0.1"] {
            let name = rustls::pki_types::ServerName::try_from(host).unwrap();
            verifier
                .verify_server_cert(&leaf, &[], &name, &[], now)
                .unwrap_or_else(|e| panic!("{host}: {e}"));
        }
        let other = rustls::pki_types::ServerName::try_from("evil.example").unwrap();
        assert!(
            verifier
                .verify_server_cert(&leaf, &[], &other, &[], now)
                .is_err()
        );
    }

    #[test]
    fn a_secret_is_kept_only_for_the_same_hosts_and_far_from_expiry() {
        let ips: [IpAddr; 1] = ["127.0.0.1".parse().unwrap()];
        let hosts = hosts_key(&dns(), &ips);
        let b = generate(&dns(), &ips, 365).unwrap();
        let s = secret("kube-system", "tls", &hosts, &b);
        let now = Timestamp::now();
        assert_eq!(secret_fits(&s, &hosts, now), Ok(()));
        assert!(secret_fits(&s, "other.svc", now).is_err());
        let later = b.not_after - SignedDuration::from_hours(24);
        assert!(
            secret_fits(&s, &hosts, later)
                .unwrap_err()
                .contains("expires")
        );
        let mut empty = s.clone();
        empty
            .data
            .as_mut()
            .unwrap()
            .insert("tls.key".into(), ByteString(vec![]));
        assert!(
            secret_fits(&empty, &hosts, now)
                .unwrap_err()
                .contains("tls.key")
        );
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(generate(&[], &[], 365).is_err());
        assert!(generate(&dns(), &[], 0).is_err());
    }
}
