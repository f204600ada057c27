//! The agent address of transparent mode: the kernel programs send intercepted connections
//! to it, so it must be an address of this host. If it is not one yet, the agent adds it
//! with `ip` (iproute2) on a bridge with no ports, so nothing sent to it can leave the node.
//! Runs once at start-up, on the main thread.

use std::net::IpAddr;
use std::process::{Command, Output};

#[derive(Debug, thiserror::Error)]
pub enum InterfaceError {
    #[error("failed to run `ip` (package iproute2) to add the agent address: {0}")]
    Spawn(std::io::Error),
    #[error("failed to create interface {interface} for the agent address: {stderr}")]
    Create { interface: String, stderr: String },
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
}

/// Makes `ip` an address of this host if it is not one yet, on bridge `interface`, so pods
/// can reach the agent address.
pub fn ensure_local_address(interface: &str, ip: IpAddr) -> Result<(), InterfaceError> {
    // Binding port 0 succeeds exactly when the address is local.
    if std::net::TcpListener::bind((ip, 0)).is_ok() {
        return Ok(());
    }
    let ip_cmd = |args: &[&str]| -> Result<Output, InterfaceError> {
        Command::new("ip")
            .args(args)
            .output()
            .map_err(InterfaceError::Spawn)
    };
    if !ip_cmd(&["link", "show", interface])?.status.success() {
        let o = ip_cmd(&["link", "add", interface, "type", "bridge"])?;
        if !o.status.success() {
            return Err(InterfaceError::Create {
                interface: interface.to_owned(),
                stderr: String::from_utf8_lossy(&o.stderr).trim().to_owned(),
            });
        }
    }
    for args in [add_address_args(interface, ip), link_up_args(interface)] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = ip_cmd(&args)?;
        let stderr = String::from_utf8_lossy(&o.stderr);
        if !(o.status.success() || stderr.contains("File exists")) {
            return Err(InterfaceError::Ip {
                args: args.join(" "),
                stderr: stderr.trim().to_owned(),
            });
        }
    }
    tracing::info!(%ip, interface, "agent address added");
    Ok(())
}

/// `ip addr add` for one host address. A portless bridge has no carrier, so IPv6 duplicate
/// address detection would never finish and the address would stay unusable: skip it (the
/// address is ours by config).
fn add_address_args(interface: &str, ip: IpAddr) -> Vec<String> {
    let mut add = vec!["addr".to_owned(), "add".into()];
    match ip {
        IpAddr::V4(_) => add.extend([format!("{ip}/32"), "dev".into(), interface.into()]),
        IpAddr::V6(_) => add.extend([
            format!("{ip}/128"),
            "dev".into(),
            interface.into(),
            "nodad".into(),
        ]),
    }
    add
}

fn link_up_args(interface: &str) -> Vec<String> {
    vec![
        "link".to_owned(),
        "set".into(),
        interface.into(),
        "up".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_host_addresses_and_skips_dad_for_ipv6() {
        assert_eq!(
            add_address_args("dbgw0", "169.254.77.1".parse().unwrap()).join(" "),
            "addr add 169.254.77.1/32 dev dbgw0"
        );
        assert_eq!(
            add_address_args("dbgw0", "fd00::77".parse().unwrap()).join(" "),
            "addr add fd00::77/128 dev dbgw0 nodad"
        );
        assert_eq!(link_up_args("dbgw0").join(" "), "link set dbgw0 up");
    }

    #[test]
    fn a_local_address_needs_no_ip_call() {
        // Loopback is always local: no `ip` is run (none may be installed).
        ensure_local_address("dbgw-unused0", "127.0.0.1".parse().unwrap()).unwrap();
    }
}
