//! One request through the filter: what it looks like, who sent it, whether the limiter
//! must be asked, and carrying out the verdict.
//!
//! Everything a client controls arrives as bytes ([`HeaderMap`]), and what a value that is
//! not UTF-8 (or is too long) means is decided here, per input:
//! - `:path`, `:authority`, `:method` and the headers rules match on are matched and sent
//!   with each invalid sequence replaced by U+FFFD (they can then match no rule that names
//!   them exactly, and still count);
//! - the API key is hashed as the bytes it is, whatever its length or bytes;
//! - the client header counts as `sha256:<hex>` of its bytes when it is not UTF-8 or longer
//!   than [`crate::identity::MAX_IDENTITY_BYTES`], so that no two values share a counter;
//!   a subject or tier longer than that goes as its digest too;
//! - the path is normalised before anything is matched on it
//!   ([`crate::decision::normalized_path`]), and the path, host, method and matched header
//!   values a check carries are bounded ([`crate::decision::bounded_path`]);
//! - a token or `X-Forwarded-For` that is not UTF-8 is read with U+FFFD, which no token and
//!   no address contains: an invalid token (`on_invalid` applies), a hop that is not an
//!   address (the search stops there);
//! - the cost header, `x-request-id` and `jwt_authn` claims that are not UTF-8 are absent.

use std::rc::Rc;

use sluice_protocol::{Check, CheckRequest, CHECK_PATH, MAX_CALL_BODY_BYTES};

use crate::batch::{Member, Registered, Slot};
use crate::config::FailureMode;
use crate::decision::{self, Failure, ReplyKind, Verdict};
use crate::denial;
use crate::grpc;
use crate::host::{Action, BufferType, Flavour, HeaderMap, Host, LogLevel, MapType};
use crate::identity::{self, Facts, Identity, Known};
use crate::jwt::Claims;
use crate::lists::{self, Listing};
use crate::root::{log, Metric, Worker, MAX_WAITING};
use crate::usage::{self, BodyWait, Meter, MAX_BODY_CHUNK_BYTES, MAX_REQUEST_BODY_BYTES};

/// Longest `x-request-id` echoed in a local reply's body.
const MAX_REQUEST_ID_BYTES: usize = 128;

enum State {
    New,
    /// Waiting for its body: a usage rule that may apply reserves what the body says
    /// (`reserve_from`). Its headers went on to the next filter (a proxy-wasm filter that
    /// holds the headers gets no body until it lets them go); its body is held here until
    /// the check is answered. Nothing is asked yet.
    AwaitingBody {
        check: Box<Check>,
        pointers: Vec<String>,
    },
    /// One callout of its own is out (batching off).
    AwaitingDecision {
        fingerprint: u64,
    },
    /// In a batch; the root leaves the verdict in the slot.
    Batched(Slot),
    /// Going upstream; these headers go on the response, these leases go back at the end,
    /// and the usage rules' reservations settle with what the response says.
    Admitted {
        headers: decision::Headers,
        leases: Vec<String>,
        meter: Option<Meter>,
    },
    /// Answered locally; the local reply already carries its headers.
    Answered,
}

pub struct Stream {
    context_id: u32,
    worker: Rc<Worker>,
    state: State,
    /// What happens if the controller cannot answer (the filter's, or its rules').
    failure_mode: FailureMode,
    /// Set while the filter holds the request's body: from its headers (it waits for the
    /// body) until its check is answered. A body callback that let a piece go before then
    /// would send the request on unchecked.
    body_held: Option<BodyWait>,
}

/// What the filter decided about a request before asking anyone.
enum Triage {
    /// Not limited: exempt path or safelisted.
    Pass,
    /// Answered here: invalid token, denylisted, or a denial the cache holds.
    Answer(Verdict),
    /// The controller decides this check.
    Ask { check: Box<Check>, fingerprint: u64 },
    /// The controller decides this check once the body is in (`reserve_from`): the
    /// request-body pointers its figures are read at.
    AwaitBody {
        check: Box<Check>,
        pointers: Vec<String>,
    },
    /// No decision can be had (Envoy would not hand over the request's headers, or the
    /// controller would refuse its check): the failure mode, for this request alone.
    Fail(Failure),
}

/// Envoy's `x-request-id` of the current request, for the body of a local reply; one that
/// is not UTF-8 or is too long is left out.
pub fn request_id(host: &dyn Host) -> Option<String> {
    let bytes = host
        .header(MapType::RequestHeaders, "x-request-id")
        .ok()??;
    if bytes.len() > MAX_REQUEST_ID_BYTES {
        return None;
    }
    String::from_utf8(bytes).ok()
}

/// What shows in Envoy's access log (`%RESPONSE_CODE_DETAILS%`) for a local reply.
fn reply_details(kind: ReplyKind) -> &'static str {
    match kind {
        ReplyKind::RateLimited => "sluice_rate_limited",
        ReplyKind::InvalidToken | ReplyKind::UnknownApiKey => "sluice_invalid_token",
        ReplyKind::Denylisted => "sluice_denylisted",
        ReplyKind::Unavailable => "sluice_unavailable",
    }
}

/// Answers the current request with `verdict`'s local reply: as gRPC when the request is
/// gRPC (its `content-type`, read only now that there is a reply to send), with the status
/// `statuses` names for the reply's kind. A reply Envoy refuses is logged; the caller then
/// lets the request go on rather than leave it hanging.
pub fn send_reply(host: &dyn Host, verdict: &Verdict, statuses: &grpc::Statuses) -> bool {
    let Verdict::Reply {
        status,
        headers,
        body,
        kind,
        message,
        retry_after_ms,
    } = verdict
    else {
        return false;
    };
    let content_type = host
        .header(MapType::RequestHeaders, "content-type")
        .ok()
        .flatten();
    let sent = match grpc::protocol(content_type.as_deref()) {
        None => send(host, *status, *kind, headers, body.as_bytes(), None),
        Some(protocol) => {
            let reply = grpc::local_reply(
                &protocol,
                statuses.code(*kind),
                *status,
                headers,
                message,
                *retry_after_ms,
            );
            send(
                host,
                reply.status,
                *kind,
                &reply.headers,
                &reply.body,
                reply.grpc_status,
            )
        }
    };
    match sent {
        Ok(()) => true,
        Err(why) => {
            log(
                host,
                LogLevel::Warn,
                &format!("Envoy refused the local reply {status} ({why}); the request goes on"),
            );
            false
        }
    }
}

fn send(
    host: &dyn Host,
    status: u32,
    kind: ReplyKind,
    headers: &decision::Headers,
    body: &[u8],
    grpc_status: Option<u32>,
) -> Result<(), crate::host::Status> {
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    host.send_local_response(status, reply_details(kind), &headers, body, grpc_status)
}

impl Stream {
    pub fn new(context_id: u32, worker: Rc<Worker>) -> Self {
        let failure_mode = worker.config.failure_mode;
        Stream {
            context_id,
            worker,
            state: State::New,
            failure_mode,
            body_held: None,
        }
    }

    /// Subject and tier that Envoy's `jwt_authn` verified and left in the metadata (bounded
    /// by [`identity::with_token`]).
    fn verified_claims(&self, host: &dyn Host) -> Option<Claims> {
        let jwt = self.worker.config.identity.jwt.as_ref()?;
        let metadata = jwt.metadata.as_ref()?;
        let claim = |name: &str| {
            let path = [
                "metadata",
                "filter_metadata",
                metadata.filter.as_str(),
                metadata.key.as_str(),
                name,
            ];
            host.property(&path)
                .ok()
                .flatten()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .filter(|text| !text.is_empty())
        };
        Some(Claims {
            subject: claim(&jwt.subject_claim)?,
            tier: jwt.tier_claim.as_deref().and_then(claim),
        })
    }

    /// Who the client is, in two steps with the denylist between them: a client refused by
    /// address, API key or path gets its 403 before its token is looked at, so that no
    /// signature is checked for it (an RS256 check costs about 1.6 ms of Envoy's CPU).
    fn identify(
        &self,
        host: &dyn Host,
        headers: &HeaderMap,
        path: &str,
    ) -> Result<Identity, Triage> {
        let config = &self.worker.config.identity;
        let metrics = &self.worker.metrics;
        let peer = host
            .property(&["source", "address"])
            .ok()
            .flatten()
            .and_then(|bytes| String::from_utf8(bytes).ok());
        let forwarded_for = if config.wants_forwarded_for() {
            headers.get_lossy("x-forwarded-for")
        } else {
            None
        };
        let api_key = config.api_key_header.as_ref().and_then(|h| headers.get(h));
        let client_header = config.client_header.as_ref().and_then(|h| headers.get(h));
        // Read once the denylist has had its say.
        let token_header;
        let mut facts = Facts {
            peer: peer.as_deref(),
            forwarded_for: forwarded_for.as_deref(),
            api_key: api_key.as_deref(),
            client_header: client_header.as_deref(),
            ..Facts::default()
        };
        let known = identity::before_token(config, &facts);
        if self.denied_before_token(host, &known, path) {
            metrics.add(host, Metric::Denylisted, 1);
            return Err(Triage::Answer(decision::denylisted(
                request_id(host).as_deref(),
            )));
        }
        let mut now_s = 0;
        if let Some(jwt) = &config.jwt {
            token_header = headers.get_lossy(&jwt.header);
            facts.token_header = token_header.as_deref();
            facts.verified_claims = self.verified_claims(host);
            // Only tokens need the time.
            now_s = host.now_ms() / 1_000;
        }
        let checks_before = self.signature_checks();
        let identified = identity::with_token(config, known, &facts, now_s);
        let checks = self.signature_checks().saturating_sub(checks_before);
        metrics.add(host, Metric::TokenSignatureChecks, checks);
        if checks > 0 {
            self.worker.debug(host, || {
                let outcome = match &identified {
                    Ok(identity) if identity.invalid_token => "refused (passed over)".to_owned(),
                    Ok(_) => "valid".to_owned(),
                    Err(rejected) => format!("refused: {}", rejected.error),
                };
                format!("a token's signature was checked against {checks} key(s): {outcome}")
            });
        }
        identified.map_err(|rejected| {
            metrics.add(host, Metric::TokenRejected, 1);
            self.worker.invalid_token(&rejected.counted_ip);
            log(
                host,
                LogLevel::Info,
                &format!(
                    "refusing a request with an invalid token: {}",
                    rejected.error
                ),
            );
            Triage::Answer(decision::token_rejected(
                &rejected.error,
                request_id(host).as_deref(),
            ))
        })
    }

    /// Signature checks the filter's own JWT verifier has made on this worker.
    fn signature_checks(&self) -> u64 {
        self.worker
            .config
            .identity
            .jwt
            .as_ref()
            .and_then(|jwt| jwt.verifier.as_ref())
            .map_or(0, |verifier| verifier.borrow().signature_checks())
    }

    /// Whether the denylist refuses the request by what is known before its token.
    fn denied_before_token(&self, host: &dyn Host, known: &Known, path: &str) -> bool {
        let view = self.worker.view.borrow();
        !view.denylist.is_empty()
            && view
                .denylist
                .contains(&known.identity(), path, host.now_ms())
    }

    fn triage(&mut self, host: &dyn Host, end_of_stream: bool) -> Triage {
        let config = &self.worker.config;
        let metrics = &self.worker.metrics;
        let headers = match host.header_map(MapType::RequestHeaders) {
            Ok(headers) => headers,
            Err(status) => {
                return Triage::Fail(Failure::Dispatch(format!(
                    "Envoy would not hand over the request headers ({status})"
                )))
            }
        };
        if let Some(name) = &config.test_only_abort_header {
            if headers.get(name).is_some() {
                log(
                    host,
                    LogLevel::Critical,
                    "aborting the VM on purpose (test_only_abort_header)",
                );
                std::process::abort();
            }
        }
        let full_path = headers.get_lossy(":path").unwrap_or_default();
        // One spelling per path (`/stats/../x` is `/x`), whatever the client wrote and
        // whether or not Envoy normalised it.
        let path = decision::normalized_path(&full_path);
        let path = path.as_ref();
        if config.exempt.contains_path(path) {
            return Triage::Pass;
        }
        let identity = match self.identify(host, &headers, path) {
            Ok(identity) => identity,
            Err(triage) => return triage,
        };
        if identity.invalid_token {
            self.worker.invalid_token(&identity.counted_ip);
        }
        let view = self.worker.view.borrow();
        let listing = lists::listing(
            &view.safelist,
            &view.denylist,
            &identity,
            path,
            host.now_ms(),
        );
        let version = view.version.unwrap_or(0);
        drop(view);
        match listing {
            Listing::Denylisted => {
                metrics.add(host, Metric::Denylisted, 1);
                return Triage::Answer(decision::denylisted(request_id(host).as_deref()));
            }
            Listing::Safelisted => {
                metrics.add(host, Metric::Safelisted, 1);
                return Triage::Pass;
            }
            Listing::Neither => {}
        }
        let cost = match &config.cost_header {
            Some(name) => decision::cost_from_header(headers.get_utf8(name).as_deref()),
            None => 1,
        };
        // ngx_wasm_module's `:authority` is its own server name and port: the client's is
        // in `host` there.
        let authority = match host.flavour() {
            Flavour::Envoy => headers.get_lossy(":authority"),
            Flavour::Ngx => headers
                .get_lossy("host")
                .or_else(|| headers.get_lossy(":authority")),
        };
        let mut check = decision::check_for(
            &identity,
            &authority.unwrap_or_default(),
            &headers.get_lossy(":method").unwrap_or_default(),
            path,
            cost,
        );
        let view = self.worker.view.borrow();
        for name in view.matched_headers.iter() {
            if let Some(value) = headers.get_lossy(name) {
                let value = decision::bounded_field(&value).to_owned();
                check.headers.insert(name.clone(), value);
            }
        }
        if self.worker.sampled_for_log(view.limited_log_sample) {
            check.sampled = true;
            check.request_id = headers
                .get_lossy("x-request-id")
                .filter(|id| id.len() <= MAX_REQUEST_ID_BYTES);
        }
        let leased = view.leased && self.worker.config.batching;
        drop(view);
        // A denial holds for the configuration it was made under: a change (a limit raised,
        // a client safelisted) makes every denial cached before it a miss.
        let fingerprint = denial::fingerprint(&check, version);
        if leased {
            let now = host.now_ms();
            if let Some(verdict) = self.worker.leased_admission(&check, fingerprint, now) {
                return Triage::Answer(verdict);
            }
            check.lease = self.worker.leases.borrow_mut().may_ask(fingerprint, now);
        }
        self.failure_mode = self.worker.failure_mode_for(&check);
        // A check the controller would refuse would take its whole batch down with it.
        if let Some(why) = decision::unsendable(&check) {
            if check.lease {
                self.worker.leases.borrow_mut().answered(fingerprint);
            }
            log(host, LogLevel::Warn, &format!("{why}: failure mode for it"));
            return Triage::Fail(Failure::Dispatch(why));
        }
        if !end_of_stream {
            let pointers = self.body_pointers(host, &headers, &check);
            if !pointers.is_empty() {
                // Its figures are part of what it is decided on: its denials are kept and
                // looked up under a fingerprint that has them, and it asks for no lease.
                if check.lease {
                    self.worker.leases.borrow_mut().answered(fingerprint);
                    check.lease = false;
                }
                return Triage::AwaitBody {
                    check: Box::new(check),
                    pointers,
                };
            }
        }
        if let Some(verdict) = self
            .worker
            .cached_denial(host, &check, fingerprint, || request_id(host))
        {
            if check.lease {
                // Its lease ask goes nowhere: the kind may ask again.
                self.worker.leases.borrow_mut().answered(fingerprint);
            }
            return Triage::Answer(verdict);
        }
        Triage::Ask {
            check: Box::new(check),
            fingerprint,
        }
    }

    /// Carries out a verdict. Returns the action for a callback that is still running.
    fn apply(&mut self, host: &dyn Host, verdict: Verdict) -> Action {
        match verdict {
            Verdict::Continue {
                response_headers,
                leases,
                usage,
                ..
            } => {
                self.state = State::Admitted {
                    headers: response_headers,
                    leases,
                    meter: Meter::new(usage),
                };
                Action::Continue
            }
            reply @ Verdict::Reply { .. } => {
                self.state = State::Answered;
                if send_reply(host, &reply, &self.worker.config.grpc_status) {
                    Action::Pause
                } else {
                    Action::Continue
                }
            }
        }
    }

    fn fail(&mut self, host: &dyn Host, failure: &Failure) -> Action {
        let verdicts = self
            .worker
            .failure_verdicts(host, failure, &[self.failure_mode]);
        match verdicts.into_iter().next() {
            Some(verdict) => self.apply(host, verdict),
            None => Action::Continue,
        }
    }

    /// Batching: join the next batch and wait for the root to deliver the verdict.
    fn join_batch(&mut self, host: &dyn Host, check: Check, fingerprint: u64) -> Action {
        let slot: Slot = Rc::default();
        let member = Member {
            context_id: self.context_id,
            slot: Rc::clone(&slot),
            fingerprint,
            failure_mode: self.failure_mode,
        };
        let asked_for_lease = check.lease;
        let registered = self.worker.batcher.borrow_mut().register(member, &check);
        // Not queued: its lease ask, if it made one, will have no answer.
        let not_queued = |worker: &Worker| {
            if asked_for_lease {
                worker.leases.borrow_mut().answered(fingerprint);
            }
        };
        match registered {
            Registered::Wait => {}
            Registered::WakeRoot => {
                let woken = self
                    .worker
                    .wake_queue
                    .ok_or_else(|| "no batching queue".to_owned())
                    .and_then(|queue| {
                        host.enqueue_shared_queue(queue, &[])
                            .map_err(|status| status.to_string())
                    });
                if let Err(why) = woken {
                    let mut batcher = self.worker.batcher.borrow_mut();
                    let cancelled = batcher.cancel(self.context_id);
                    batcher.wake_failed();
                    drop(batcher);
                    if let Some(fingerprint) = cancelled {
                        self.worker.leases.borrow_mut().answered(fingerprint);
                    }
                    return self.fail(
                        host,
                        &Failure::Dispatch(format!("cannot wake the batcher: {why}")),
                    );
                }
            }
            Registered::Overloaded => {
                not_queued(&self.worker);
                return self.fail(
                    host,
                    &Failure::Dispatch(format!(
                        "{MAX_WAITING} requests already wait for a decision on this worker"
                    )),
                );
            }
            Registered::TooLarge { bytes } => {
                not_queued(&self.worker);
                return self.too_large(host, bytes);
            }
        }
        self.state = State::Batched(slot);
        Action::Pause
    }

    /// A check too large for any call to the controller (only possible with very many
    /// matched headers, as every field is bounded): this request alone gets the failure
    /// mode, and says why.
    fn too_large(&mut self, host: &dyn Host, bytes: usize) -> Action {
        let why = format!(
            "the request's check takes {bytes} bytes, more than a call to the controller \
             carries ({MAX_CALL_BODY_BYTES} bytes)"
        );
        log(host, LogLevel::Warn, &format!("{why}: failure mode for it"));
        self.fail(host, &Failure::Dispatch(why))
    }

    /// Without batching: a callout of its own.
    fn ask_alone(&mut self, host: &dyn Host, check: Check, fingerprint: u64) -> Action {
        let request = CheckRequest {
            checks: vec![check],
            hold_delays: true,
            // Leases are for batching workers (a lease's life starts when its batch left).
            lease_holder: None,
            settles: self.worker.view.borrow().settles,
        };
        let body = match serde_json::to_vec(&request) {
            Ok(body) if body.len() > MAX_CALL_BODY_BYTES => {
                return self.too_large(host, body.len())
            }
            Ok(body) => body,
            Err(error) => {
                return self.fail(
                    host,
                    &Failure::Dispatch(format!("cannot encode the check: {error}")),
                )
            }
        };
        match self
            .worker
            .call_controller(host, CHECK_PATH, Some(&body), &[])
        {
            Ok(token) => {
                self.worker.stream_call_sent(token, self.context_id);
                self.state = State::AwaitingDecision { fingerprint };
                Action::Pause
            }
            Err(status) => self.fail(host, &Failure::Dispatch(status)),
        }
    }

    /// Batching: what the root decided, once it has (the slot is read once).
    fn settle_batched(&mut self) {
        let State::Batched(slot) = &self.state else {
            return;
        };
        let verdict = slot.borrow_mut().take();
        self.state = match verdict {
            Some(Verdict::Continue {
                response_headers,
                leases,
                usage,
                ..
            }) => State::Admitted {
                headers: response_headers,
                leases,
                meter: Meter::new(usage),
            },
            Some(Verdict::Reply { .. }) => State::Answered,
            None => return,
        };
    }

    pub fn on_request_headers(&mut self, host: &dyn Host, end_of_stream: bool) -> Action {
        if !matches!(self.state, State::New) {
            return Action::Continue;
        }
        match self.triage(host, end_of_stream) {
            Triage::Pass => Action::Continue,
            Triage::Answer(verdict) => self.apply(host, verdict),
            Triage::Fail(failure) => self.fail(host, &failure),
            Triage::Ask { check, fingerprint } => self.ask(host, *check, fingerprint),
            // Its headers go on (a proxy-wasm host gives a filter that holds them no
            // body); its body is held from the first piece.
            Triage::AwaitBody { check, pointers } => {
                self.state = State::AwaitingBody { check, pointers };
                self.body_held = Some(BodyWait::new(self.context_id));
                Action::Continue
            }
        }
    }

    fn ask(&mut self, host: &dyn Host, check: Check, fingerprint: u64) -> Action {
        if self.worker.config.batching {
            self.join_batch(host, check, fingerprint)
        } else {
            self.ask_alone(host, check, fingerprint)
        }
    }

    /// The request-body pointers the request's check waits for: those of the
    /// `reserve_from` rules that may apply to it, when its body is one the filter reads
    /// whole: JSON, not compressed, no longer than it reads (by `content-length`), and not
    /// a stream (an upgrade, `CONNECT`) whose data would stall while held. Only in Envoy,
    /// whose body callbacks are the ones tested.
    fn body_pointers(&self, host: &dyn Host, headers: &HeaderMap, check: &Check) -> Vec<String> {
        if host.flavour() != Flavour::Envoy {
            return Vec::new();
        }
        let pointers = self.worker.view.borrow().request_pointers(check);
        if pointers.is_empty() {
            return pointers;
        }
        let json = headers.get_lossy("content-type").is_some_and(|value| {
            let media = value
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase();
            media == "application/json" || media.ends_with("+json")
        });
        let compressed = headers
            .get_lossy("content-encoding")
            .is_some_and(|value| !value.trim().eq_ignore_ascii_case("identity"));
        let too_long = headers
            .get_lossy("content-length")
            .and_then(|value| value.trim().parse::<usize>().ok())
            .is_some_and(|length| length > MAX_REQUEST_BODY_BYTES);
        let streaming = headers.get("upgrade").is_some()
            || headers
                .get_lossy(":method")
                .is_some_and(|method| method.eq_ignore_ascii_case("CONNECT"));
        if json && !compressed && !too_long && !streaming {
            pointers
        } else {
            Vec::new()
        }
    }

    /// A piece of the request body is in (`body_size`: all the filter holds of it; `None`
    /// when the body cannot be measured, as at the trailers), or the body ended. A request
    /// waiting for its body is checked once the body is whole or longer than the filter
    /// reads, with the figures its rules reserve from, and its body is held until the
    /// answer; `None` when the request was not waiting (the callback lets the piece go).
    pub fn on_request_body(
        &mut self,
        host: &dyn Host,
        body_size: Option<usize>,
        end: bool,
    ) -> Option<Action> {
        // A verdict the root holds back for a leaky bucket's slot is not yet an answer.
        let delayed = match &self.state {
            State::Batched(slot) => matches!(
                &*slot.borrow(),
                Some(Verdict::Continue { delay_ms, .. }) if *delay_ms > 0
            ),
            _ => false,
        };
        if delayed && self.body_held.is_some() {
            return Some(Action::Pause);
        }
        self.settle_batched();
        match &self.state {
            State::AwaitingBody { .. } => {}
            // Asked, not yet answered: its answer resumes it with the body held.
            State::Batched(_) | State::AwaitingDecision { .. } if self.body_held.is_some() => {
                return Some(Action::Pause);
            }
            // Answered: the body goes on. Continue when it was held (a callback deferred
            // while the filter was busy then resumes it), nothing to say otherwise.
            _ => {
                let held = self.body_held.take().is_some();
                return (held && matches!(self.state, State::Admitted { .. }))
                    .then_some(Action::Continue);
            }
        }
        let too_long = body_size.is_some_and(|size| size > MAX_REQUEST_BODY_BYTES);
        if !end && !too_long {
            // Envoy holds the pieces until the request is resumed.
            return Some(Action::Pause);
        }
        let State::AwaitingBody {
            mut check,
            pointers,
            ..
        } = std::mem::replace(&mut self.state, State::New)
        else {
            return None;
        };
        if !too_long {
            let read = body_size.unwrap_or(MAX_REQUEST_BODY_BYTES + 1);
            if let Ok(Some(body)) = host.buffer(BufferType::HttpRequestBody, read) {
                if body.len() <= MAX_REQUEST_BODY_BYTES {
                    check.request_figures = usage::request_figures(&body, &pointers);
                }
            }
        }
        if end {
            // No piece comes after the last: nothing more to hold.
            self.body_held = None;
        }
        let version = self.worker.view.borrow().version.unwrap_or(0);
        let fingerprint = denial::fingerprint(&check, version);
        if let Some(verdict) = self
            .worker
            .cached_denial(host, &check, fingerprint, || request_id(host))
        {
            return Some(self.apply(host, verdict));
        }
        Some(self.ask(host, *check, fingerprint))
    }

    /// The reply to this request's own callout (batching off).
    pub fn on_http_call_response(&mut self, host: &dyn Host, body_size: usize) {
        let State::AwaitingDecision { fingerprint } =
            std::mem::replace(&mut self.state, State::New)
        else {
            return;
        };
        let (status, body) = crate::root::call_response(host, body_size);
        let decided =
            decision::decisions_from_reply(status.as_deref(), &body, 1).and_then(|decisions| {
                decisions
                    .into_iter()
                    .next()
                    .ok_or_else(|| Failure::MalformedReply("no decision".into()))
            });
        let action = match decided {
            // Without batching the controller has already held a leaky bucket's delay.
            Ok(decision) => {
                self.worker.debug(host, || {
                    let outcome = if decision.allowed {
                        "allowed"
                    } else {
                        "denied"
                    };
                    format!("a check was decided: {outcome}")
                });
                let (verdict, counted) =
                    self.worker
                        .settle(host, &decision, fingerprint, None, || request_id(host));
                self.worker.count(host, [counted]);
                self.apply(host, verdict)
            }
            Err(failure) => self.fail(host, &failure),
        };
        if action == Action::Continue {
            let _ = host.resume_request();
        }
    }

    pub fn on_response_headers(&mut self, host: &dyn Host) -> Action {
        self.settle_batched();
        // The upstream's answer, for the automatic system state (not the filter's own).
        if !matches!(self.state, State::Answered)
            && self.worker.view.borrow().report.upstream_status
        {
            let status = host
                .header(MapType::ResponseHeaders, ":status")
                .ok()
                .flatten();
            self.worker.tally.borrow_mut().response(status.as_deref());
        }
        if let State::Admitted { headers, meter, .. } = &mut self.state {
            if let Some(meter) = meter {
                meter.on_response_headers(|name| {
                    let value = host.header(MapType::ResponseHeaders, name).ok()??;
                    String::from_utf8(value).ok()
                });
            }
            for (name, value) in headers.iter() {
                let _ = host.replace_header(MapType::ResponseHeaders, name, value);
            }
        }
        Action::Continue
    }

    /// The response's trailers: its body has ended, whatever its last piece said.
    pub fn on_response_trailers(&mut self) {
        if let State::Admitted {
            meter: Some(meter), ..
        } = &mut self.state
        {
            if meter.reads_body() {
                meter.on_body(&[], true);
            }
        }
    }

    /// A piece of the response body passed while the filter could not read it.
    pub fn body_missed(&mut self) {
        if let State::Admitted {
            meter: Some(meter), ..
        } = &mut self.state
        {
            meter.body_unreadable();
        }
    }

    /// A piece of the response body passes: read for usage when a reservation needs it,
    /// never held back.
    pub fn on_response_body(&mut self, host: &dyn Host, body_size: usize, end: bool) -> Action {
        if let State::Admitted {
            meter: Some(meter), ..
        } = &mut self.state
        {
            if meter.reads_body() {
                let chunk = if body_size > MAX_BODY_CHUNK_BYTES {
                    None
                } else {
                    host.buffer(BufferType::HttpResponseBody, body_size).ok()
                };
                match chunk {
                    Some(chunk) => meter.on_body(&chunk.unwrap_or_default(), end),
                    None => meter.body_unreadable(),
                }
            }
        }
        Action::Continue
    }

    /// The stream is over (completed, reset or refused upstream). A request still waiting
    /// for its batch leaves it; concurrency slots go back. Nobody waits for the release's
    /// answer; a lost release frees itself when its lease expires.
    pub fn on_log(&mut self, host: &dyn Host) {
        self.settle_batched();
        match &mut self.state {
            State::Batched(_) => {
                let cancelled = self.worker.batcher.borrow_mut().cancel(self.context_id);
                if let Some(fingerprint) = cancelled {
                    self.worker.leases.borrow_mut().answered(fingerprint);
                }
                // Let go of the slot: the root must not answer this request any more.
                self.state = State::Answered;
            }
            State::Admitted { leases, meter, .. } => {
                let leases = std::mem::take(leases);
                let settlements = meter.take().map(Meter::settlements).unwrap_or_default();
                self.worker
                    .release_at_end(host, self.context_id, leases, settlements);
            }
            _ => {}
        }
    }
}
