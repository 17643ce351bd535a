//! The request headers as Envoy hands them over in one host call: each header read from
//! Envoy on its own costs a host call and an allocation inside the VM, and a request that
//! needs a decision reads several (`:path`, `:authority`, `:method`, identity headers, the
//! headers rules match on).

use std::borrow::Cow;

/// Header names as Envoy gives them: lower-case.
#[derive(Debug)]
pub struct RequestHeaders(Vec<(String, String)>);

impl RequestHeaders {
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        RequestHeaders(pairs)
    }

    /// The value of `name` (lower-case); a header sent more than once reads as its values
    /// joined by `, `, as HTTP defines a repeated field (this matters for `X-Forwarded-For`,
    /// whose rightmost entries are the trusted ones).
    pub fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        let mut values = self
            .0
            .iter()
            .filter(|(key, _)| key == name)
            .map(|(_, value)| value.as_str());
        let first = values.next()?;
        match values.next() {
            None => Some(Cow::Borrowed(first)),
            Some(second) => {
                let mut joined = format!("{first}, {second}");
                for value in values {
                    joined.push_str(", ");
                    joined.push_str(value);
                }
                Some(Cow::Owned(joined))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> RequestHeaders {
        RequestHeaders::new(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn reads_a_header_without_copying_it() {
        let headers = headers(&[(":path", "/a"), ("x-client", "ann")]);
        assert!(matches!(
            headers.get("x-client"),
            Some(Cow::Borrowed("ann"))
        ));
        assert_eq!(headers.get(":path").as_deref(), Some("/a"));
        assert_eq!(headers.get("x-missing"), None);
    }

    #[test]
    fn a_repeated_header_reads_as_its_values_joined_in_order() {
        let headers = headers(&[
            ("x-forwarded-for", "198.51.100.1"),
            (":path", "/"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "192.0.2.2"),
        ]);
        assert_eq!(
            headers.get("x-forwarded-for").as_deref(),
            Some("198.51.100.1, 203.0.113.9, 192.0.2.2")
        );
    }
}
