//! Changes that touch some fields of an object keep the others: the command reads the
//! object, changes only the fields it was given, and writes it back with `If-Match` naming
//! the version it read. If another change got in between, the controller answers `409
//! version_mismatch` and nothing is lost: the command reads again and retries, at most
//! [`ATTEMPTS`] times. With `--if-match`, the operator's version is sent instead, and a
//! `409` is final (they asked for "only if still at that version").

use serde_json::Value;

use crate::client::{Answer, Api, Refusal};
use crate::exit::Failure;

/// Reads and writes at most this many times before giving up on a busy configuration.
pub const ATTEMPTS: usize = 5;

/// The write a read-modify-write makes from what it read.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    pub method: &'static str,
    pub path: String,
    pub body: Value,
}

/// Reads `read_path` (a 404 is "absent": `None`), lets `edit` make the write from what it read, and
/// sends it with `If-Match` of the version read (of `pinned`, `--if-match`, when given).
/// Retried, with a new read, when another change got in first: `409 version_mismatch`, or
/// `409 conflict` for a create that met an object made meanwhile.
pub fn read_modify_write(
    api: &dyn Api,
    read_path: &str,
    pinned: Option<u64>,
    edit: &dyn Fn(Option<&Value>) -> Result<Write, Failure>,
) -> Result<Answer, Failure> {
    let mut last: Option<Refusal> = None;
    for _ in 0..ATTEMPTS {
        let (current, version) = match api.call("GET", read_path, None, None) {
            Ok(answer) => {
                let value: Value = answer.json()?;
                (Some(value), answer.version)
            }
            Err(refusal) if refusal.status() == Some(404) => (None, None),
            Err(refusal) => return Err(refusal.into()),
        };
        let creating = current.is_none();
        // A create refused as a duplicate, with still nothing to read: the conflict is about
        // something else (a configuration managed by a file), and is the answer.
        if let Some(refusal) = last.take() {
            if creating && refusal.code() == Some("conflict") {
                return Err(refusal.into());
            }
        }
        let write = edit(current.as_ref())?;
        // A create has no version to name: a create that meets an object made meanwhile is
        // refused as a duplicate (409 conflict), and retried as a change.
        let if_match = pinned.or(if creating { None } else { version });
        match api.call(
            write.method,
            &write.path,
            Some(("application/json", write.body.to_string())),
            if_match,
        ) {
            Ok(answer) => return Ok(answer),
            Err(refusal) if pinned.is_none() && raced(&refusal, creating) => {
                last = Some(refusal);
            }
            Err(refusal) => return Err(refusal.into()),
        }
    }
    let said = last.map(|refusal| Failure::from(refusal).message);
    Err(Failure::refused(format!(
        "the configuration kept changing while this change was made ({ATTEMPTS} tries): {}",
        said.unwrap_or_default()
    )))
}

fn raced(refusal: &Refusal, creating: bool) -> bool {
    refusal.status() == Some(409)
        && (refusal.code() == Some("version_mismatch")
            || (creating && refusal.code() == Some("conflict")))
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use serde_json::json;
    use sluice_protocol::admin::ErrorBody;

    use super::*;

    /// A call as the scripted controller received it: method, path, body, If-Match.
    type Sent = (String, String, Option<String>, Option<u64>);

    /// A controller that answers from a script, and records what it was sent.
    struct Scripted {
        answers: RefCell<Vec<Result<Answer, Refusal>>>,
        sent: RefCell<Vec<Sent>>,
    }

    impl Scripted {
        fn new(answers: Vec<Result<Answer, Refusal>>) -> Scripted {
            Scripted {
                answers: RefCell::new(answers.into_iter().rev().collect()),
                sent: RefCell::new(Vec::new()),
            }
        }
    }

    impl Api for Scripted {
        fn call(
            &self,
            method: &str,
            path: &str,
            body: Option<(&str, String)>,
            if_match: Option<u64>,
        ) -> Result<Answer, Refusal> {
            self.sent.borrow_mut().push((
                method.to_owned(),
                path.to_owned(),
                body.map(|(_, text)| text),
                if_match,
            ));
            self.answers
                .borrow_mut()
                .pop()
                .expect("the script has an answer")
        }
    }

    fn ok(version: u64, body: Value) -> Result<Answer, Refusal> {
        Ok(Answer {
            version: Some(version),
            body: body.to_string(),
        })
    }

    fn refused(status: u16, code: &str, version: Option<u64>) -> Result<Answer, Refusal> {
        Err(Refusal::Status {
            status,
            error: Some(ErrorBody {
                error: code.to_owned(),
                field: None,
                message: code.to_owned(),
            }),
            raw: String::new(),
            version,
        })
    }

    /// Sets `limit` to 7 and keeps everything else.
    fn set_limit(current: Option<&Value>) -> Result<Write, Failure> {
        let mut tier = current.cloned().unwrap_or(json!({ "name": "pro" }));
        tier["limit"] = json!(7);
        Ok(Write {
            method: if current.is_some() { "PUT" } else { "POST" },
            path: if current.is_some() {
                "/tiers/pro".to_owned()
            } else {
                "/tiers".to_owned()
            },
            body: tier,
        })
    }

    #[test]
    fn a_change_that_lost_the_race_reads_again_and_keeps_what_the_other_wrote() {
        let api = Scripted::new(vec![
            ok(4, json!({ "name": "pro", "limit": 1 })),
            refused(409, "version_mismatch", Some(5)),
            // The other change gave the tier DEGRADED limits: they survive.
            ok(
                5,
                json!({ "name": "pro", "limit": 1, "degraded": { "limit": 2 } }),
            ),
            ok(6, json!({})),
        ]);
        let answer = read_modify_write(&api, "/tiers/pro", None, &set_limit).expect("written");
        assert_eq!(answer.version, Some(6));
        let sent = api.sent.borrow();
        assert_eq!(sent.len(), 4);
        assert_eq!(sent[1].3, Some(4), "the first write names the version read");
        assert_eq!(sent[3].3, Some(5), "the retry names the version read again");
        let body: Value = serde_json::from_str(sent[3].2.as_deref().expect("a body")).unwrap();
        assert_eq!(
            body,
            json!({ "name": "pro", "limit": 7, "degraded": { "limit": 2 } })
        );
    }

    #[test]
    fn a_pinned_version_is_final() {
        let api = Scripted::new(vec![
            ok(4, json!({ "name": "pro", "limit": 1 })),
            refused(409, "version_mismatch", Some(5)),
        ]);
        let failure =
            read_modify_write(&api, "/tiers/pro", Some(3), &set_limit).expect_err("refused");
        assert_eq!(failure.code, crate::exit::REFUSED);
        assert_eq!(api.sent.borrow()[1].3, Some(3), "the operator's version");
        assert_eq!(api.sent.borrow().len(), 2, "no retry");
    }

    #[test]
    fn a_create_that_meets_one_made_meanwhile_becomes_a_change() {
        let api = Scripted::new(vec![
            refused(404, "not_found", None),
            refused(409, "conflict", None),
            ok(8, json!({ "name": "pro", "limit": 1, "burst": 3 })),
            ok(9, json!({})),
        ]);
        read_modify_write(&api, "/tiers/pro", None, &set_limit).expect("written");
        let sent = api.sent.borrow();
        assert_eq!((sent[1].0.as_str(), sent[1].3), ("POST", None));
        assert_eq!((sent[3].0.as_str(), sent[3].3), ("PUT", Some(8)));
    }

    #[test]
    fn a_configuration_that_keeps_moving_is_given_up_on() {
        let mut script = Vec::new();
        for version in 0..ATTEMPTS as u64 {
            script.push(ok(version, json!({ "name": "pro", "limit": 1 })));
            script.push(refused(409, "version_mismatch", Some(version + 1)));
        }
        let api = Scripted::new(script);
        let failure =
            read_modify_write(&api, "/tiers/pro", None, &set_limit).expect_err("given up");
        assert!(failure.message.contains("kept changing"), "{failure:?}");
    }

    #[test]
    fn a_create_refused_for_another_reason_is_not_retried() {
        let api = Scripted::new(vec![
            refused(404, "not_found", None),
            refused(409, "conflict", None),
            refused(404, "not_found", None),
        ]);
        let failure = read_modify_write(&api, "/tiers/pro", None, &set_limit).expect_err("refused");
        assert_eq!(failure.message, "409: conflict");
        assert_eq!(api.sent.borrow().len(), 3);
    }

    #[test]
    fn other_refusals_are_not_retried() {
        let api = Scripted::new(vec![
            ok(4, json!({ "name": "pro", "limit": 1 })),
            refused(400, "invalid_request", None),
        ]);
        read_modify_write(&api, "/tiers/pro", None, &set_limit).expect_err("refused");
        assert_eq!(api.sent.borrow().len(), 2);
    }
}
