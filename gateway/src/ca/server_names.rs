//! The names the CA may put in server certificates for nodes (client TLS at the node):
//! deny by default. `gateway ca serve --server-names` lists IP addresses, CIDRs, DNS names
//! and `*.suffix` patterns (any name under the suffix); a request is issued only when every
//! name it asks for is on the list.

use std::net::IpAddr;

/// One entry of `--server-names`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Allowed {
    Net(IpAddr, u8),
    Name(String),
    /// `*.example.com`: names ending in `.example.com` (not the suffix itself).
    Under(String),
}

/// The CA's list; empty refuses every server certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerNames(Vec<Allowed>);

/// Why a `--server-names` entry does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ServerNamesError {
    #[error("{0:?} is not an IP address, a CIDR, a DNS name or *.suffix")]
    Entry(String),
}

impl ServerNames {
    /// Parses comma- or whitespace-separated entries.
    pub fn parse(list: &str) -> Result<Self, ServerNamesError> {
        let mut out = Vec::new();
        for e in list.split([',', ' ', '\n']).filter(|e| !e.is_empty()) {
            out.push(parse_entry(e).ok_or_else(|| ServerNamesError::Entry(e.to_owned()))?);
        }
        Ok(Self(out))
    }

    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.iter().any(|a| match (a, ip) {
            (Allowed::Net(IpAddr::V4(n), p), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(*p)).unwrap_or(0);
                u32::from(*n) & mask == u32::from(a) & mask
            }
            (Allowed::Net(IpAddr::V6(n), p), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(*p)).unwrap_or(0);
                u128::from(*n) & mask == u128::from(a) & mask
            }
            _ => false,
        })
    }

    pub fn allows_name(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.0.iter().any(|a| match a {
            Allowed::Name(n) => *n == name,
            Allowed::Under(suffix) => {
                name.len() > suffix.len() + 1
                    && name.ends_with(suffix.as_str())
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
                    && !name[..name.len() - suffix.len() - 1].contains('*')
            }
            Allowed::Net(..) => false,
        })
    }
}

fn parse_entry(e: &str) -> Option<Allowed> {
    if let Some(suffix) = e.strip_prefix("*.") {
        rustls_pki_types::DnsName::try_from(suffix).ok()?;
        return Some(Allowed::Under(suffix.to_ascii_lowercase()));
    }
    let (addr, prefix) = match e.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (e, None),
    };
    if let Ok(ip) = addr.parse::<IpAddr>() {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        return Some(Allowed::Net(ip, prefix));
    }
    if prefix.is_some() || e.contains('*') {
        return None;
    }
    rustls_pki_types::DnsName::try_from(e).ok()?;
    Some(Allowed::Name(e.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_by_default_and_only_what_is_listed() {
        let none = ServerNames::default();
        assert!(!none.allows_ip("10.0.0.1".parse().unwrap()));
        assert!(!none.allows_name("db.example.com"));

        let l =
            ServerNames::parse("10.0.0.0/8, 192.0.2.7 db.example.com,*.rds.amazonaws.com").unwrap();
        assert!(l.allows_ip("10.1.2.3".parse().unwrap()));
        assert!(l.allows_ip("::ffff:10.1.2.3".parse().unwrap()));
        assert!(l.allows_ip("192.0.2.7".parse().unwrap()));
        assert!(!l.allows_ip("192.0.2.8".parse().unwrap()));
        assert!(l.allows_name("db.example.com"));
        assert!(l.allows_name("DB.Example.com"));
        assert!(!l.allows_name("other.example.com"));
        assert!(l.allows_name("x.eu-west-1.rds.amazonaws.com"));
        assert!(!l.allows_name("rds.amazonaws.com"));
        assert!(!l.allows_name("evilrds.amazonaws.com"));
        for bad in ["10.0.0.0/40", "*", "a*.b", "host/8", "exa mple"] {
            assert!(
                ServerNames::parse(bad).is_err() || bad.contains(' '),
                "{bad}"
            );
        }
    }
}
