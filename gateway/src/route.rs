//! The route vocabulary: what a route carries ([`Protocol`], which the node, the preamble and
//! the proxy's database entry must agree on) and which original destinations a transparent
//! route matches ([`Destination`], [`RouteTable`]).
//!
//! Ground floor: imports nothing of ours.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// What a route carries. The node, the preamble and the proxy's database entry must agree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// PostgreSQL: encryption requests answered at the node, policy on user and database,
    /// certificate login upstream, `ErrorResponse`s, cancel, drain at transaction ends.
    #[default]
    Postgres,
    /// Plain L4: bytes relayed as they are to `upstream.address` (no TLS, no login); the
    /// policy decides on identity and route only. For other TCP databases and for tests.
    Tcp,
}

impl Protocol {
    pub fn is_postgres(&self) -> bool {
        *self == Protocol::Postgres
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Postgres => "postgres",
            Protocol::Tcp => "tcp",
        })
    }
}

/// Why a destination pattern does not parse; the message quotes the pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    #[error("{0:?}: expected ADDRESS:PORT or CIDR:PORT")]
    Shape(String),
    #[error("{pattern:?}: bad port {port:?}")]
    Port { pattern: String, port: String },
    #[error("{pattern:?}: bad address {address:?}")]
    Address { pattern: String, address: String },
    #[error("{pattern:?}: bad prefix length {prefix:?}")]
    Prefix { pattern: String, prefix: String },
}

/// Callers that collect setting errors as text (`validate`, the node's route list) take the
/// message as it is.
impl From<DestinationError> for String {
    fn from(e: DestinationError) -> Self {
        e.to_string()
    }
}

/// A destination pattern: address or network (`None` = any) and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destination {
    pub net: Option<(IpAddr, u8)>,
    pub port: u16,
}

impl Destination {
    pub fn matches(&self, dst: SocketAddr) -> bool {
        if dst.port() != self.port {
            return false;
        }
        let Some((net, prefix)) = self.net else {
            return true;
        };
        // IPv4-mapped IPv6 destinations match IPv4 networks.
        let ip = match dst.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(dst.ip()),
            v4 => v4,
        };
        match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Parses `10.0.3.7:5432`, `10.0.0.0/8:5432`, `[fd00::/8]:5432`, `[::1]:5432`, `*:5432`.
pub fn parse_destination(s: &str) -> Result<Destination, DestinationError> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| DestinationError::Shape(s.to_owned()))?;
    let port: u16 = port.parse().map_err(|_| DestinationError::Port {
        pattern: s.to_owned(),
        port: port.to_owned(),
    })?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host == "*" {
        return Ok(Destination { net: None, port });
    }
    let (addr, prefix) = match host.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (host, None),
    };
    let ip: IpAddr = addr.parse().map_err(|_| DestinationError::Address {
        pattern: s.to_owned(),
        address: addr.to_owned(),
    })?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix =
        match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| {
                DestinationError::Prefix {
                    pattern: s.to_owned(),
                    prefix: p.to_owned(),
                }
            })?,
            None => max,
        };
    Ok(Destination {
        net: Some((ip, prefix)),
        port,
    })
}

/// One destination pattern of a transparent route, with the database route it leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub destination: Destination,
    /// A `databases[].name` of the proxy's policy.
    pub name: String,
    pub protocol: Protocol,
    /// Client TLS at the node: `None` answers `SSLRequest` with `N`.
    pub client_tls: Option<std::sync::Arc<ClientTls>>,
}

/// A route's client TLS: the DNS names its server certificates carry besides the IP the
/// application dialled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    pub server_names: Vec<String>,
}

/// The node's transparent routes in configuration order: the first pattern that matches
/// an original destination wins, so a narrow pattern listed before a wide one takes
/// precedence over it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Adds the patterns of one configured route, after those added before; a bad pattern
    /// leaves the table as it was.
    pub fn add<'a>(
        &mut self,
        patterns: impl IntoIterator<Item = &'a str>,
        name: &str,
        protocol: Protocol,
    ) -> Result<(), DestinationError> {
        self.add_with_tls(patterns, name, protocol, None)
    }

    /// [`Self::add`] for a route with client TLS (`Some`, its certificate's DNS names).
    pub fn add_with_tls<'a>(
        &mut self,
        patterns: impl IntoIterator<Item = &'a str>,
        name: &str,
        protocol: Protocol,
        client_tls: Option<ClientTls>,
    ) -> Result<(), DestinationError> {
        let client_tls = client_tls.map(std::sync::Arc::new);
        let added = patterns
            .into_iter()
            .map(|p| {
                Ok(Route {
                    destination: parse_destination(p)?,
                    name: name.to_owned(),
                    protocol,
                    client_tls: client_tls.clone(),
                })
            })
            .collect::<Result<Vec<_>, DestinationError>>()?;
        self.routes.extend(added);
        Ok(())
    }

    /// The route for a connection that was going to `dst`, if any pattern matches it.
    pub fn lookup(&self, dst: SocketAddr) -> Option<&Route> {
        self.routes.iter().find(|r| r.destination.matches(dst))
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse_and_match() {
        let d = parse_destination("10.0.0.0/8:5432").unwrap();
        assert!(d.matches("10.1.2.3:5432".parse().unwrap()));
        assert!(d.matches("[::ffff:10.1.2.3]:5432".parse().unwrap()));
        assert!(!d.matches("10.1.2.3:5433".parse().unwrap()));
        assert!(!d.matches("11.1.2.3:5432".parse().unwrap()));
        let one = parse_destination("10.0.3.7:5432").unwrap();
        assert!(one.matches("10.0.3.7:5432".parse().unwrap()));
        assert!(!one.matches("10.0.3.8:5432".parse().unwrap()));
        let v6 = parse_destination("[fd00::/8]:5432").unwrap();
        assert!(v6.matches("[fd12::1]:5432".parse().unwrap()));
        assert!(
            parse_destination("*:5432")
                .unwrap()
                .matches("[::1]:5432".parse().unwrap())
        );
        for bad in ["10.0.0.0/33:5432", "nonsense", "10.0.0.1:port", "host:5432"] {
            assert!(parse_destination(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn families_do_not_cross_and_prefix_zero_matches_its_family() {
        let any4 = parse_destination("0.0.0.0/0:5432").unwrap();
        assert!(any4.matches("192.0.2.1:5432".parse().unwrap()));
        assert!(any4.matches("[::ffff:192.0.2.1]:5432".parse().unwrap()));
        assert!(!any4.matches("[2001:db8::1]:5432".parse().unwrap()));
        let any6 = parse_destination("[::/0]:5432").unwrap();
        assert!(any6.matches("[2001:db8::1]:5432".parse().unwrap()));
        assert!(!any6.matches("192.0.2.1:5432".parse().unwrap()));
    }

    #[test]
    fn errors_name_the_pattern_and_the_bad_part() {
        let msg = |s: &str| parse_destination(s).unwrap_err().to_string();
        assert_eq!(
            msg("nonsense"),
            "\"nonsense\": expected ADDRESS:PORT or CIDR:PORT"
        );
        assert_eq!(msg("10.0.0.1:port"), "\"10.0.0.1:port\": bad port \"port\"");
        assert_eq!(msg("host:5432"), "\"host:5432\": bad address \"host\"");
        assert_eq!(
            msg("10.0.0.0/33:5432"),
            "\"10.0.0.0/33:5432\": bad prefix length \"33\""
        );
        let as_text: String = parse_destination("x:1").unwrap_err().into();
        assert_eq!(as_text, "\"x:1\": bad address \"x\"");
    }

    #[test]
    fn the_first_matching_route_wins() {
        let mut table = RouteTable::default();
        table
            .add(["10.0.3.7:5432"], "primary", Protocol::Postgres)
            .unwrap();
        table
            .add(["10.0.0.0/8:5432", "*:6379"], "wide", Protocol::Tcp)
            .unwrap();
        let at = |s: &str| table.lookup(s.parse().unwrap()).map(|r| r.name.as_str());
        assert_eq!(at("10.0.3.7:5432"), Some("primary"));
        assert_eq!(at("10.0.3.8:5432"), Some("wide"));
        assert_eq!(at("192.0.2.1:6379"), Some("wide"));
        assert_eq!(at("192.0.2.1:5432"), None);
        assert_eq!(
            table
                .lookup("10.9.9.9:5432".parse().unwrap())
                .unwrap()
                .protocol,
            Protocol::Tcp
        );
        assert_eq!(table.routes().len(), 3);
        // A bad pattern is refused and names itself.
        let e = table
            .add(
                ["10.0.0.1:5432", "10.0.0.0/40:5432"],
                "bad",
                Protocol::Postgres,
            )
            .unwrap_err();
        assert_eq!(
            e,
            DestinationError::Prefix {
                pattern: "10.0.0.0/40:5432".into(),
                prefix: "40".into()
            }
        );
        assert_eq!(
            table.routes().len(),
            3,
            "nothing of the bad route was added"
        );
    }

    #[test]
    fn protocol_spells_like_the_config() {
        assert_eq!(Protocol::default(), Protocol::Postgres);
        assert_eq!(Protocol::Tcp.to_string(), "tcp");
        assert_eq!(
            serde_json::to_string(&Protocol::Postgres).unwrap(),
            "\"postgres\""
        );
        assert_eq!(
            serde_json::from_str::<Protocol>("\"tcp\"").unwrap(),
            Protocol::Tcp
        );
        assert!(Protocol::Postgres.is_postgres() && !Protocol::Tcp.is_postgres());
    }
}
