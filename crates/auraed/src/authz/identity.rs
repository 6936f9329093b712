//! Who a connection is: the names in its verified client certificate.

use std::{fmt, sync::Arc};

/// The names a verified client certificate carries: its subject's common
/// names and its subject alternative names (DNS, URI, email). A policy
/// entry matches the certificate if it equals any of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The name used in messages and logs: the first CN, else the first
    /// SAN.
    pub display: String,
    pub names: Vec<String>,
}

impl PeerIdentity {
    /// The identity in `der`. A certificate that made it through the TLS
    /// verifier parses; one that does not (or has no name) yields an
    /// identity no policy entry but `*` matches.
    pub fn from_der(der: &[u8]) -> Self {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let mut names = Vec::new();
        if let Ok((_, cert)) = X509Certificate::from_der(der) {
            for cn in cert.subject().iter_common_name() {
                if let Ok(s) = cn.as_str() {
                    names.push(s.to_owned());
                }
            }
            if let Ok(Some(san)) = cert.subject_alternative_name() {
                for n in &san.value.general_names {
                    match n {
                        GeneralName::DNSName(s)
                        | GeneralName::URI(s)
                        | GeneralName::RFC822Name(s) => names.push((*s).to_owned()),
                        _ => {}
                    }
                }
            }
        }
        names.dedup();
        Self::named(names)
    }

    pub fn named(names: Vec<String>) -> Self {
        Self {
            display: names
                .first()
                .cloned()
                .unwrap_or_else(|| "(a certificate without a name)".to_owned()),
            names,
        }
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.display)
    }
}

/// The connection's identity, as tonic hands it to every request of the
/// connection (`Connected::ConnectInfo`, in the request's extensions).
#[derive(Debug, Clone, Default)]
pub struct Peer(pub Option<Arc<PeerIdentity>>);

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    use super::*;

    #[test]
    fn names_come_from_cn_and_sans() {
        let mut p = CertificateParams::new(vec!["alice.example".to_owned()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "alice");
        p.subject_alt_names
            .push(SanType::Rfc822Name("alice@example.com".try_into().unwrap()));
        p.subject_alt_names
            .push(SanType::URI("spiffe://example/alice".try_into().unwrap()));
        let key = KeyPair::generate().unwrap();
        let der = p.self_signed(&key).unwrap().der().to_vec();
        let id = PeerIdentity::from_der(&der);
        assert_eq!(id.display, "alice");
        assert_eq!(
            id.names,
            [
                "alice",
                "alice.example",
                "alice@example.com",
                "spiffe://example/alice"
            ]
        );
        let none = PeerIdentity::from_der(b"junk");
        assert!(none.names.is_empty());
    }
}
