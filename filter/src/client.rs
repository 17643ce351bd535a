//! The client's address: Envoy's peer by default; behind proxies the rightmost address of
//! `X-Forwarded-For` that no trusted proxy wrote, so that a client cannot pick its identity
//! by writing the header itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// Identity used when Envoy cannot tell the peer address (for example a pipe listener).
/// Such requests share one counter rather than escaping the limit.
pub const UNKNOWN_CLIENT: &str = "unknown";

/// Most `X-Forwarded-For` entries read, from the right; more cannot be trusted anyway.
pub const MAX_FORWARDED_HOPS: usize = 32;

/// Which proxies in front of Envoy are trusted to append to `X-Forwarded-For`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyTrust {
    /// None: the peer is the client, and the header is ignored.
    Nobody,
    /// This many proxies, the peer first: the client is the address the farthest of them
    /// saw.
    Hops(usize),
    /// Any address in these networks: the client is the rightmost address outside them.
    Networks(Vec<IpNet>),
}

/// How the client's address is found and how it is counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpPolicy {
    pub trust: ProxyTrust,
    /// IPv6 clients are counted by this prefix (a host usually has a whole /64).
    pub ipv6_prefix: u8,
    /// Envoy's connection manager appends the peer to `X-Forwarded-For` itself
    /// (`use_remote_address: true`; for a loopback peer it appends its own address
    /// instead). That entry stands for the peer and is not read as a hop of its own.
    pub envoy_appends: bool,
}

impl Default for IpPolicy {
    fn default() -> Self {
        IpPolicy {
            trust: ProxyTrust::Nobody,
            ipv6_prefix: 64,
            envoy_appends: true,
        }
    }
}

/// The IP of an `ip:port`, `[ipv6]:port` or bare address; IPv4-mapped IPv6 is unwrapped so
/// that one client has one identity whichever way the socket was opened.
pub fn peer_ip(address: &str) -> Option<IpAddr> {
    let address = address.trim();
    let ip = match address.parse::<SocketAddr>() {
        Ok(socket) => socket.ip(),
        Err(_) => address.parse::<IpAddr>().ok()?,
    };
    Some(ip.to_canonical())
}

/// The client's address, from Envoy's peer (`source.address`) and `X-Forwarded-For`.
///
/// Hops are read from the right: the peer, then the header's entries (less the one Envoy
/// appended, see [`IpPolicy::envoy_appends`]). An entry that is not an address is where a
/// client wrote into the header: the search stops there, at the last address a trusted
/// proxy vouched for.
pub fn client_ip(
    peer: Option<&str>,
    forwarded_for: Option<&str>,
    policy: &IpPolicy,
) -> Option<IpAddr> {
    let peer = peer.and_then(peer_ip);
    let mut entries = forwarded_for
        .unwrap_or("")
        .rsplit(',')
        .take(MAX_FORWARDED_HOPS)
        .map(str::trim)
        .filter(|entry| !entry.is_empty());
    if policy.envoy_appends {
        entries.next();
    }
    // The hops from the right, as addresses; `None` marks an entry that is not one.
    let hops = peer.into_iter().map(Some).chain(entries.map(peer_ip));
    match &policy.trust {
        ProxyTrust::Nobody => peer,
        ProxyTrust::Hops(trusted) => {
            let mut client = None;
            for (index, hop) in hops.enumerate().take(trusted.saturating_add(1)) {
                match hop {
                    Some(ip) => client = Some(ip),
                    None => break,
                }
                if index == *trusted {
                    break;
                }
            }
            client
        }
        ProxyTrust::Networks(networks) => {
            let mut client = None;
            for hop in hops {
                let Some(ip) = hop else { break };
                client = Some(ip);
                if !networks.iter().any(|net| net.contains(&ip)) {
                    break;
                }
            }
            client
        }
    }
}

/// How an address is counted: IPv4 as it is, IPv6 by its network of `ipv6_prefix` bits
/// (`2001:db8:1:2::/64`).
pub fn counted_ip(ip: IpAddr, ipv6_prefix: u8) -> String {
    match ip {
        IpAddr::V4(v4) => dotted_quad(v4),
        IpAddr::V6(v6) if ipv6_prefix >= 128 => v6.to_string(),
        IpAddr::V6(v6) => {
            let prefix = u32::from(ipv6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
            let network = Ipv6Addr::from(u128::from(v6) & mask);
            format!("{network}/{prefix}")
        }
    }
}

/// An IPv4 address as `Ipv4Addr`'s `Display` writes it, without the formatting machinery:
/// this runs for every request identified by address, where `Display` costs about 1,300
/// instructions (`make bench`'s instruction counts) and this a tenth of that.
fn dotted_quad(v4: Ipv4Addr) -> String {
    let mut text = String::with_capacity(15);
    for (index, octet) in v4.octets().into_iter().enumerate() {
        if index > 0 {
            text.push('.');
        }
        if octet >= 100 {
            text.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            text.push(char::from(b'0' + octet / 10 % 10));
        }
        text.push(char::from(b'0' + octet % 10));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// A policy for an Envoy that does not append to the header (the tests' headers are
    /// as Envoy received them).
    fn policy(trust: ProxyTrust) -> IpPolicy {
        IpPolicy {
            trust,
            ipv6_prefix: 64,
            envoy_appends: false,
        }
    }

    #[test]
    fn strips_the_port_and_unwraps_ipv4_mapped_ipv6() {
        assert_eq!(peer_ip("192.0.2.7:51234"), Some(ip("192.0.2.7")));
        assert_eq!(peer_ip("[2001:db8::1]:443"), Some(ip("2001:db8::1")));
        assert_eq!(peer_ip("2001:db8::1"), Some(ip("2001:db8::1")));
        assert_eq!(peer_ip("[::ffff:192.0.2.7]:80"), Some(ip("192.0.2.7")));
        assert_eq!(peer_ip("pipe:/tmp/x"), None);
        assert_eq!(peer_ip(""), None);
    }

    #[test]
    fn without_trusted_proxies_the_header_is_ignored() {
        let found = client_ip(
            Some("203.0.113.9:4000"),
            Some("1.2.3.4"),
            &policy(ProxyTrust::Nobody),
        );
        assert_eq!(found, Some(ip("203.0.113.9")));
    }

    #[test]
    fn trusted_hops_take_the_address_the_farthest_proxy_saw() {
        let one = policy(ProxyTrust::Hops(1));
        // The proxy (peer 10.0.0.2) appended the client it saw; the client wrote the rest.
        let found = client_ip(Some("10.0.0.2:80"), Some("6.6.6.6, 198.51.100.4"), &one);
        assert_eq!(found, Some(ip("198.51.100.4")));
        // Envoy appended the peer itself (use_remote_address), or its own address for a
        // loopback peer: that entry is the peer, not a hop of its own.
        let appending = IpPolicy {
            envoy_appends: true,
            ..one.clone()
        };
        for appended in ["10.0.0.2", "192.0.2.2"] {
            let header = format!("6.6.6.6, 198.51.100.4,{appended}");
            let found = client_ip(Some("10.0.0.2:80"), Some(&header), &appending);
            assert_eq!(found, Some(ip("198.51.100.4")), "{header}");
        }
        // Fewer hops than trusted: the farthest address there is.
        assert_eq!(
            client_ip(Some("10.0.0.2:80"), None, &one),
            Some(ip("10.0.0.2"))
        );
        let two = policy(ProxyTrust::Hops(2));
        let found = client_ip(
            Some("10.0.0.2:80"),
            Some("6.6.6.6, 198.51.100.4, 10.0.0.7"),
            &two,
        );
        assert_eq!(found, Some(ip("198.51.100.4")));
    }

    #[test]
    fn trusted_networks_take_the_rightmost_untrusted_address() {
        let trusted = policy(ProxyTrust::Networks(vec![
            "10.0.0.0/8".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ]));
        let found = client_ip(
            Some("10.0.0.2:80"),
            Some("6.6.6.6, 198.51.100.4, 10.1.1.1"),
            &trusted,
        );
        assert_eq!(found, Some(ip("198.51.100.4")));
        // The peer itself is untrusted: it is the client, whatever it wrote.
        let found = client_ip(Some("198.51.100.9:80"), Some("6.6.6.6"), &trusted);
        assert_eq!(found, Some(ip("198.51.100.9")));
        // Every hop trusted: the farthest one.
        let found = client_ip(Some("10.0.0.2:80"), Some("10.3.3.3"), &trusted);
        assert_eq!(found, Some(ip("10.3.3.3")));
    }

    #[test]
    fn garbage_in_the_header_stops_at_the_last_vouched_address() {
        let trusted = policy(ProxyTrust::Networks(vec!["10.0.0.0/8".parse().unwrap()]));
        let found = client_ip(Some("10.0.0.2:80"), Some("1.1.1.1, not-an-ip"), &trusted);
        assert_eq!(found, Some(ip("10.0.0.2")));
        let hops = policy(ProxyTrust::Hops(2));
        let found = client_ip(Some("10.0.0.2:80"), Some("1.1.1.1, bogus, 10.0.0.3"), &hops);
        assert_eq!(found, Some(ip("10.0.0.3")));
    }

    #[test]
    fn a_spoofed_header_never_changes_the_identity() {
        let one = policy(ProxyTrust::Hops(1));
        let honest = client_ip(Some("10.0.0.2:80"), Some("198.51.100.4"), &one);
        for spoof in ["1.1.1.1", "1.1.1.1, 2.2.2.2", "garbage", "::1", ",,,"] {
            let header = format!("{spoof}, 198.51.100.4");
            assert_eq!(
                client_ip(Some("10.0.0.2:80"), Some(&header), &one),
                honest,
                "{spoof}"
            );
        }
    }

    #[test]
    fn ipv6_is_counted_by_prefix() {
        assert_eq!(
            counted_ip(ip("2001:db8:1:2:aaaa::1"), 64),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            counted_ip(ip("2001:db8:1:2:bbbb::9"), 64),
            "2001:db8:1:2::/64"
        );
        assert_eq!(counted_ip(ip("2001:db8:1:2::1"), 128), "2001:db8:1:2::1");
        assert_eq!(counted_ip(ip("2001:db8::1"), 0), "::/0");
        assert_eq!(counted_ip(ip("192.0.2.7"), 64), "192.0.2.7");
    }

    #[test]
    fn a_dotted_quad_is_what_display_writes() {
        for octet in 0..=255u8 {
            for other in [0u8, 1, 9, 10, 99, 100, 199, 255] {
                for v4 in [
                    Ipv4Addr::new(octet, other, octet, other),
                    Ipv4Addr::new(other, octet, other, octet),
                ] {
                    assert_eq!(dotted_quad(v4), v4.to_string());
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn any_dotted_quad_is_what_display_writes(bits: u32) {
            let v4 = Ipv4Addr::from(bits);
            proptest::prop_assert_eq!(dotted_quad(v4), v4.to_string());
        }
    }
}
