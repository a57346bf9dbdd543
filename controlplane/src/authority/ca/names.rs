//! Request validation: subject, names and lifetime.

use super::{CaError, IssueRequest, MAX_LIFETIME, MAX_NAMES, MAX_SUBJECT_LEN, Usage};
use rcgen::SanType;
use std::net::IpAddr;

pub(super) fn validate(request: &IssueRequest) -> Result<(), CaError> {
    if request.subject.trim().is_empty() {
        return Err(CaError::EmptySubject);
    }
    let len = request.subject.chars().count();
    if len > MAX_SUBJECT_LEN {
        return Err(CaError::SubjectTooLong {
            len,
            max: MAX_SUBJECT_LEN,
        });
    }
    if request.subject.chars().any(char::is_control) {
        return Err(CaError::SubjectControlCharacters);
    }
    let count = request.dns_names.len() + request.ip_addresses.len();
    if count > MAX_NAMES {
        return Err(CaError::TooManyNames {
            count,
            max: MAX_NAMES,
        });
    }
    if count == 0 && request.usage == Usage::Server {
        return Err(CaError::NoNames);
    }
    for name in &request.dns_names {
        check_dns_name(name).map_err(|reason| CaError::InvalidDnsName {
            name: name.clone(),
            reason,
        })?;
    }
    if request.lifetime.as_secs() == 0 {
        return Err(CaError::ZeroLifetime);
    }
    if request.lifetime > MAX_LIFETIME {
        return Err(CaError::LifetimeTooLong {
            requested: request.lifetime,
            max: MAX_LIFETIME,
        });
    }
    Ok(())
}

/// A host name of letters, digits and hyphens (RFC 1123), optionally with a
/// wildcard as the whole leftmost label of a name with two more labels.
fn check_dns_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > 253 {
        return Err("it is longer than 253 characters");
    }
    if name.parse::<IpAddr>().is_ok() {
        return Err("it is an IP address; put it in ip_addresses");
    }
    let labels: Vec<&str> = name.split('.').collect();
    for (i, label) in labels.iter().enumerate() {
        if *label == "*" {
            if i != 0 || labels.len() < 3 {
                return Err(
                    "a wildcard must be the whole leftmost label of a name with at least two more labels",
                );
            }
            continue;
        }
        if label.is_empty() {
            return Err("it has an empty label (leading, trailing or double dot)");
        }
        if label.len() > 63 {
            return Err("a label is longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("only letters, digits, hyphens and dots are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label starts or ends with a hyphen");
        }
    }
    if labels
        .last()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("the last label is all digits");
    }
    Ok(())
}

/// The subject alternative names of a validated request.
pub(super) fn san(request: &IssueRequest) -> Result<Vec<SanType>, CaError> {
    let mut names = Vec::with_capacity(request.dns_names.len() + request.ip_addresses.len());
    for name in &request.dns_names {
        names.push(SanType::DnsName(name.as_str().try_into()?));
    }
    names.extend(request.ip_addresses.iter().copied().map(SanType::IpAddress));
    Ok(names)
}

/// What a certificate names its holder: the subject CN and the DNS and IP
/// entries of its SubjectAltName.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertificateNames {
    pub subject: String,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
}

/// The names of a parsed certificate (entries of other kinds are skipped).
pub fn certificate_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> CertificateNames {
    use x509_parser::extensions::GeneralName;
    let subject = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut names = CertificateNames {
        subject,
        ..CertificateNames::default()
    };
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => names.dns_names.push((*dns).to_owned()),
                GeneralName::IPAddress(bytes) => {
                    if let Some(ip) = ip_from_bytes(bytes) {
                        names.ip_addresses.push(ip);
                    }
                }
                _ => {}
            }
        }
    }
    names
}

/// Whether two certificate names are one name: ASCII case-insensitively
/// (RFC 4343 §3: DNS names have no case), with an absolute name's trailing
/// dot dropped. IP addresses in their usual text form compare as text.
pub fn same_name(a: &str, b: &str) -> bool {
    fn bare(name: &str) -> &str {
        name.strip_suffix('.').unwrap_or(name)
    }
    bare(a).eq_ignore_ascii_case(bare(b))
}

/// An IP address from its SubjectAltName octets (4 or 16 bytes).
pub fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}
