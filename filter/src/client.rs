//! Who the client is. For now: the address of the connection's peer as Envoy reports it.
//! Trusted-proxy handling (`X-Forwarded-For` read from the right), JWT and API keys plug in
//! here later, each producing a [`ClientId`].

use std::net::{IpAddr, SocketAddr};

use sluice_protocol::ClientId;

/// Identity used when Envoy cannot tell the peer address (for example a pipe listener).
/// Such requests share one counter rather than escaping the limit.
pub const UNKNOWN_CLIENT: &str = "unknown";

/// The client of a request whose peer is `source_address` (Envoy's `source.address`,
/// `ip:port` or `[ipv6]:port`).
pub fn identify(source_address: Option<&str>) -> ClientId {
    ClientId::ip(
        source_address
            .and_then(peer_ip)
            .map_or_else(|| UNKNOWN_CLIENT.to_owned(), |ip| ip.to_string()),
    )
}

/// The IP of an `ip:port`, `[ipv6]:port` or bare address; IPv4-mapped IPv6 is unwrapped so
/// that one client has one identity whichever way the socket was opened.
pub fn peer_ip(address: &str) -> Option<IpAddr> {
    let ip = match address.parse::<SocketAddr>() {
        Ok(socket) => socket.ip(),
        Err(_) => address.parse::<IpAddr>().ok()?,
    };
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_the_port_from_ipv4_and_ipv6() {
        assert_eq!(identify(Some("192.0.2.7:51234")), ClientId::ip("192.0.2.7"));
        assert_eq!(
            identify(Some("[2001:db8::1]:443")),
            ClientId::ip("2001:db8::1")
        );
        assert_eq!(identify(Some("2001:db8::1")), ClientId::ip("2001:db8::1"));
    }

    #[test]
    fn unwraps_ipv4_mapped_ipv6() {
        assert_eq!(
            identify(Some("[::ffff:192.0.2.7]:80")),
            ClientId::ip("192.0.2.7")
        );
    }

    #[test]
    fn missing_or_garbage_address_is_the_unknown_client() {
        assert_eq!(identify(None), ClientId::ip(UNKNOWN_CLIENT));
        assert_eq!(identify(Some("pipe:/tmp/x")), ClientId::ip(UNKNOWN_CLIENT));
        assert_eq!(identify(Some("")), ClientId::ip(UNKNOWN_CLIENT));
    }
}
