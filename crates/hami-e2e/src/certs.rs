//! Throw-away PKI for one test cluster: a CA, serving certificates for the
//! API server and hami-scheduler, and the service-account signing key.
//! (Clients authenticate with a token; see cluster.rs.)

use std::net::{IpAddr, Ipv4Addr};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A PEM certificate and its PEM private key.
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// Everything a cluster needs.
pub struct Pki {
    pub ca: Pem,
    pub apiserver: Pem,
    pub scheduler: Pem,
    /// A client certificate (for kube-scheduler calling the extender with
    /// `tlsConfig.certFile`).
    pub client: Pem,
    /// Service-account signing key (private) and its public half.
    pub sa_key: String,
    pub sa_pub: String,
}

fn params(cn: &str, org: Option<&str>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    if let Some(o) = org {
        p.distinguished_name.push(DnType::OrganizationName, o);
    }
    p
}

fn serving(cn: &str, dns: &[&str]) -> anyhow::Result<CertificateParams> {
    let mut p = params(cn, None);
    p.subject_alt_names = vec![
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1))),
    ];
    for d in dns {
        p.subject_alt_names.push(SanType::DnsName((*d).try_into()?));
    }
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    Ok(p)
}

impl Pki {
    pub fn generate() -> anyhow::Result<Pki> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = params("hami-e2e-ca", None);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca = Pem {
            cert: ca_cert.pem(),
            key: ca_key.serialize_pem(),
        };
        let issuer = Issuer::new(ca_params, ca_key);
        let sign = |p: CertificateParams| -> anyhow::Result<Pem> {
            let key = KeyPair::generate()?;
            let cert = p.signed_by(&key, &issuer)?;
            Ok(Pem {
                cert: cert.pem(),
                key: key.serialize_pem(),
            })
        };
        let apiserver = sign(serving(
            "kube-apiserver",
            &[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
            ],
        )?)?;
        let scheduler = sign(serving("hami-scheduler", &["localhost"])?)?;
        let mut client_params = params("kube-scheduler", None);
        client_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = sign(client_params)?;
        let sa = KeyPair::generate()?;
        Ok(Pki {
            ca,
            apiserver,
            scheduler,
            client,
            sa_key: sa.serialize_pem(),
            sa_pub: sa.public_key_pem(),
        })
    }
}
