//! What a worker tells the controller once a second ([`sluice_protocol::Report`]): its
//! upstream's answers, for the automatic system state, and invalid tokens by address, for
//! brute-force protection. Only what the controller's view asks for is tallied; nothing is
//! when it asks for nothing.

use std::collections::HashMap;

use sluice_protocol::{AddressCount, Report, MAX_REPORTED_ADDRESSES};

#[derive(Debug, Default)]
pub struct Tally {
    responses: u64,
    server_errors: u64,
    invalid_tokens: HashMap<String, u64>,
    /// Invalid tokens from addresses past [`MAX_REPORTED_ADDRESSES`] in one second: not
    /// reported (a flood from that many addresses is for the denylist by network).
    pub dropped: u64,
}

impl Tally {
    /// One upstream answer with `status` (`:status` as Envoy gave it).
    pub fn response(&mut self, status: Option<&[u8]>) {
        self.responses += 1;
        if status.is_some_and(|s| s.len() == 3 && s.first() == Some(&b'5')) {
            self.server_errors += 1;
        }
    }

    /// One request with an invalid token from `ip` (as limits count it).
    pub fn invalid_token(&mut self, ip: &str) {
        if let Some(count) = self.invalid_tokens.get_mut(ip) {
            *count += 1;
        } else if self.invalid_tokens.len() < MAX_REPORTED_ADDRESSES {
            self.invalid_tokens.insert(ip.to_owned(), 1);
        } else {
            self.dropped += 1;
        }
    }

    /// The report of everything tallied since the last one, if there is anything.
    pub fn take(&mut self) -> Option<Report> {
        if self.responses == 0 && self.invalid_tokens.is_empty() {
            return None;
        }
        let mut invalid_tokens: Vec<AddressCount> = self
            .invalid_tokens
            .drain()
            .map(|(ip, count)| AddressCount { ip, count })
            .collect();
        invalid_tokens.sort_by(|a, b| a.ip.cmp(&b.ip));
        let report = Report {
            responses: self.responses,
            server_errors: self.server_errors,
            invalid_tokens,
        };
        self.responses = 0;
        self.server_errors = 0;
        Some(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_and_invalid_tokens_add_up_until_taken() {
        let mut tally = Tally::default();
        assert_eq!(tally.take(), None, "nothing seen, nothing sent");
        for status in [&b"200"[..], b"503", b"500", b"404", b"5", b"5000"] {
            tally.response(Some(status));
        }
        tally.response(None);
        tally.invalid_token("192.0.2.7");
        tally.invalid_token("192.0.2.7");
        tally.invalid_token("192.0.2.1");
        let report = tally.take().unwrap();
        assert_eq!((report.responses, report.server_errors), (7, 2));
        assert_eq!(
            report.invalid_tokens,
            vec![
                AddressCount {
                    ip: "192.0.2.1".into(),
                    count: 1
                },
                AddressCount {
                    ip: "192.0.2.7".into(),
                    count: 2
                },
            ]
        );
        assert_eq!(
            tally.take(),
            None,
            "taken: the next report starts from zero"
        );
    }

    #[test]
    fn one_report_names_a_bounded_number_of_addresses() {
        let mut tally = Tally::default();
        for i in 0..MAX_REPORTED_ADDRESSES + 10 {
            tally.invalid_token(&format!("10.0.{}.{}", i / 256, i % 256));
        }
        tally.invalid_token("10.0.0.0");
        let report = tally.take().unwrap();
        assert_eq!(report.invalid_tokens.len(), MAX_REPORTED_ADDRESSES);
        assert_eq!(
            tally.dropped, 10,
            "new addresses past the bound are dropped"
        );
        assert!(report
            .invalid_tokens
            .iter()
            .any(|a| a.ip == "10.0.0.0" && a.count == 2));
    }
}
