//! The only module that talks to Envoy: reads what the request looks like, sends the check
//! callouts and carries out the [`Verdict`]s. Decisions are made in [`crate::decision`],
//! batches formed in [`crate::batch`].

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use sluice_protocol::rules::{failure_mode_for, matched_headers};
use sluice_protocol::{
    Check, CheckRequest, Decision, Rule, RulesSnapshot, CHECK_PATH, RELEASE_PATH, RULES_PATH,
};

use crate::batch::{self, Batcher, Member, Registered, Slot};
use crate::config::{FailureMode, FilterConfig};
use crate::decision::{self, Counted, Failure, Verdict};
use crate::denial;
use crate::identity::{self, Facts, Identity};
use crate::jwt::Claims;
use crate::lists::{self, Listing};
use crate::request::RequestHeaders;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(SluiceRoot {
            context_id,
            worker: None,
            delayed: Vec::new(),
            rules_call: None,
            rules_read_at_ms: 0,
        })
    });
}}

/// Most requests that may wait for a batch on one worker; past it they get the failure mode.
const MAX_WAITING: usize = 10_000;
/// How often the root looks for a lost batch (and, while requests are held for a leaky
/// bucket's slot, how often it looks for the ones that are due).
const WATCHDOG_TICK: Duration = Duration::from_secs(1);
const DELAY_TICK: Duration = Duration::from_millis(5);

fn log(level: LogLevel, message: &str) {
    // Logging is best effort: there is nobody to tell if the host refuses a log line.
    let _ = hostcalls::log(level, message);
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |since| since.as_millis() as u64)
}

/// The filter's counters in Envoy's stats (`wasmcustom.sluice_*`, summed over workers).
#[derive(Debug, Clone, Copy)]
enum Metric {
    /// Requests decided by the controller or the denial cache.
    Checks,
    Allowed,
    Limited,
    ShadowLimited,
    FailureAllowed,
    FailureDenied,
    DenialCacheHits,
    CalloutErrors,
    Safelisted,
    Denylisted,
    TokenRejected,
    RulesFetched,
}

impl Metric {
    const ALL: [Metric; 12] = [
        Metric::Checks,
        Metric::Allowed,
        Metric::Limited,
        Metric::ShadowLimited,
        Metric::FailureAllowed,
        Metric::FailureDenied,
        Metric::DenialCacheHits,
        Metric::CalloutErrors,
        Metric::Safelisted,
        Metric::Denylisted,
        Metric::TokenRejected,
        Metric::RulesFetched,
    ];

    fn name(self) -> &'static str {
        match self {
            Metric::Checks => "sluice_checks",
            Metric::Allowed => "sluice_allowed",
            Metric::Limited => "sluice_limited",
            Metric::ShadowLimited => "sluice_shadow_limited",
            Metric::FailureAllowed => "sluice_failure_allowed",
            Metric::FailureDenied => "sluice_failure_denied",
            Metric::DenialCacheHits => "sluice_denial_cache_hits",
            Metric::CalloutErrors => "sluice_callout_errors",
            Metric::Safelisted => "sluice_safelisted",
            Metric::Denylisted => "sluice_denylisted",
            Metric::TokenRejected => "sluice_token_rejected",
            Metric::RulesFetched => "sluice_rules_fetched",
        }
    }
}

/// Metric ids as Envoy gave them; a metric Envoy would not define is not counted.
struct Metrics([Option<u32>; Metric::ALL.len()]);

impl Metrics {
    fn define() -> Self {
        Metrics(
            Metric::ALL
                .map(|metric| hostcalls::define_metric(MetricType::Counter, metric.name()).ok()),
        )
    }

    fn add(&self, metric: Metric, by: u64) {
        if by == 0 {
            return;
        }
        if let Some(Some(id)) = self.0.get(metric as usize) {
            let _ = hostcalls::increment_metric(*id, by as i64);
        }
    }
}

/// What the root context of a worker shares with the requests on that worker. Each Envoy
/// worker runs its own VM, so this is single-threaded.
struct Worker {
    config: FilterConfig,
    batcher: RefCell<Batcher>,
    /// The shared queue a request pokes to wake the root (batching only).
    wake_queue: Option<u32>,
    metrics: Metrics,
    /// The controller's rules as last read, for their failure modes.
    rules: RefCell<Vec<Rule>>,
    /// The request headers those rules match on, sent with each check.
    matched_headers: RefCell<Vec<String>>,
}

impl Worker {
    /// The verdict for the controller's decision on a request, and how it counts (the caller
    /// adds it to the metrics, a batch at a time); remembers a denial for the denial cache.
    /// `request_id` is asked for only when the verdict is a local reply (it goes in the body).
    fn settle(
        &self,
        decision: &Decision,
        fingerprint: u64,
        request_id: impl FnOnce() -> Option<String>,
    ) -> (Verdict, Counted) {
        let replies = !decision.allowed && !self.config.shadow;
        let request_id = if replies { request_id() } else { None };
        let (verdict, counted) =
            decision::verdict_for_decision(&self.config, decision, request_id.as_deref());
        if let (Counted::Limited, Some(slots)) = (counted, self.config.denial_cache_slots) {
            if let Some(entry) = denial::entry_for(fingerprint, decision, now_ms()) {
                let key = denial::slot_key(fingerprint, slots);
                // Last writer wins; a lost write only costs a later callout.
                let _ = hostcalls::set_shared_data(&key, Some(&denial::encode(&entry)), None);
            }
        }
        (verdict, counted)
    }

    /// Counts decided requests: one host call per kind, however many requests.
    fn count(&self, counted: impl IntoIterator<Item = Counted>) {
        let mut tally = [0u64; 3];
        for outcome in counted {
            if let Some(n) = tally.get_mut(outcome as usize) {
                *n += 1;
            }
        }
        let [allowed, limited, shadow] = tally;
        self.metrics.add(Metric::Checks, allowed + limited + shadow);
        self.metrics.add(Metric::Allowed, allowed);
        self.metrics.add(Metric::Limited, limited);
        self.metrics.add(Metric::ShadowLimited, shadow);
    }

    /// A denial the cache still holds for this check, as the 429 to send.
    fn cached_denial(
        &self,
        fingerprint: u64,
        request_id: impl FnOnce() -> Option<String>,
    ) -> Option<Verdict> {
        let slots = self.config.denial_cache_slots?;
        if self.config.shadow {
            return None;
        }
        let (bytes, _cas) =
            hostcalls::get_shared_data(&denial::slot_key(fingerprint, slots)).ok()?;
        let policy = denial::lookup(&bytes?, fingerprint, now_ms())?;
        self.metrics.add(Metric::DenialCacheHits, 1);
        self.count([Counted::Limited]);
        Some(decision::cached_denial(
            self.config.headers,
            &policy,
            request_id().as_deref(),
        ))
    }

    /// What happens to this check if the controller cannot answer: the failure mode of
    /// the rules that apply to it, else the filter's.
    fn failure_mode_for(&self, check: &Check) -> FailureMode {
        failure_mode_for(self.rules.borrow().iter(), check, self.config.failure_mode)
    }

    /// The verdicts of requests (by their failure modes) whose callout failed; counted and
    /// logged once.
    fn failure_verdicts(&self, failure: &Failure, modes: &[FailureMode]) -> Vec<Verdict> {
        let denied = modes.iter().filter(|m| **m == FailureMode::Deny).count();
        let allowed = modes.len() - denied;
        log_failure(failure, allowed, denied);
        self.metrics.add(Metric::CalloutErrors, 1);
        self.metrics.add(Metric::FailureAllowed, allowed as u64);
        self.metrics.add(Metric::FailureDenied, denied as u64);
        modes
            .iter()
            .map(|mode| decision::verdict_for_failure(*mode))
            .collect()
    }

    /// Takes the controller's answer to `GET /v1/rules`.
    fn take_rules(&self, status: Option<&str>, body: &[u8]) {
        let snapshot = match status {
            Some("200") => serde_json::from_slice::<RulesSnapshot>(body)
                .map_err(|e| format!("malformed ({e})")),
            other => Err(format!("status {}", other.unwrap_or("(none)"))),
        };
        match snapshot {
            Ok(snapshot) => {
                self.metrics.add(Metric::RulesFetched, 1);
                let mut rules = self.rules.borrow_mut();
                if *rules != snapshot.rules {
                    let own = snapshot
                        .rules
                        .iter()
                        .filter(|rule| rule.failure_mode.is_some())
                        .count();
                    log(
                        LogLevel::Info,
                        &format!(
                            "read {} rules from the controller, {own} with a failure mode of their own",
                            snapshot.rules.len()
                        ),
                    );
                    *self.matched_headers.borrow_mut() = matched_headers(&snapshot.rules);
                    *rules = snapshot.rules;
                }
            }
            // The rules last read stay; the next tick tries again.
            Err(why) => log(
                LogLevel::Debug,
                &format!("could not read the controller's rules: {why}"),
            ),
        }
    }

    /// Calls the controller from the current context: `POST` with a JSON body (check,
    /// release), `GET` without one (rules).
    fn call_controller(&self, path: &str, body: Option<&[u8]>) -> Result<u32, String> {
        let config = &self.config;
        let mut headers = vec![
            (":method", if body.is_some() { "POST" } else { "GET" }),
            (":path", path),
            (":authority", config.controller_authority.as_str()),
        ];
        if body.is_some() {
            headers.push(("content-type", "application/json"));
        }
        hostcalls::dispatch_http_call(
            &config.controller_cluster,
            headers,
            body,
            vec![],
            config.timeout,
        )
        .map_err(|status| format!("{status:?}"))
    }

    fn release(&self, leases: Vec<String>) {
        if leases.is_empty() {
            return;
        }
        if let Err(status) =
            self.call_controller(RELEASE_PATH, Some(&decision::release_request(leases)))
        {
            log(
                LogLevel::Warn,
                &format!("could not release concurrency slots ({status}); they free themselves when their lease expires"),
            );
        }
    }
}

/// Whether the request that waits on `slot` is still there. Envoy may run a batch's reply
/// in the same event-loop turn in which it finished a request whose client left: the
/// request's context then still exists for `set_effective_context`, but the SDK has dropped
/// it, and a local reply to it would reach the SDK as a callback for an unknown context (a
/// panic). The request drops its end of the slot when it finishes, so the count tells.
fn still_here(slot: &Slot) -> bool {
    Rc::strong_count(slot) > 1
}

/// The `:status` and body of the callout response being delivered.
fn call_response(body_size: usize) -> (Option<String>, Vec<u8>) {
    let status = hostcalls::get_map_value(
        proxy_wasm::types::MapType::HttpCallResponseHeaders,
        ":status",
    )
    .ok()
    .flatten();
    let body = hostcalls::get_buffer(
        proxy_wasm::types::BufferType::HttpCallResponseBody,
        0,
        body_size,
    )
    .ok()
    .flatten()
    .unwrap_or_default();
    (status, body)
}

/// Envoy's `x-request-id` of a request in a batch, read from the root (only for the body of
/// a local reply, so that allowed requests do not pay for it).
fn request_id_of(member: &Member) -> Option<String> {
    if !still_here(&member.slot) {
        return None;
    }
    hostcalls::set_effective_context(member.context_id).ok()?;
    hostcalls::get_map_value(
        proxy_wasm::types::MapType::HttpRequestHeaders,
        "x-request-id",
    )
    .ok()
    .flatten()
}

fn log_failure(failure: &Failure, allowed: usize, denied: usize) {
    let what = |n: usize| {
        if n == 1 {
            "the request".to_owned()
        } else {
            format!("{n} requests")
        }
    };
    let outcome = match (allowed, denied) {
        (allowed, 0) => format!("allowing {} (failure mode allow)", what(allowed)),
        (0, denied) => format!("refusing {} (failure mode deny)", what(denied)),
        (allowed, denied) => format!(
            "allowing {allowed} and refusing {denied} of {} requests (by their rules' failure modes)",
            allowed + denied
        ),
    };
    log(
        LogLevel::Warn,
        &format!("no decision, {outcome}: {failure}"),
    );
}

struct SluiceRoot {
    context_id: u32,
    worker: Option<Rc<Worker>>,
    /// Requests admitted for a later slot (leaky bucket), as (due ms, context id, slot).
    delayed: Vec<(u64, u32, Slot)>,
    /// The read of the controller's rules that is out, and when the last one left.
    rules_call: Option<u32>,
    rules_read_at_ms: u64,
}

impl Context for SluiceRoot {
    /// The reply to a batch (or to a release, which needs nothing).
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let Some(worker) = self.worker.clone() else {
            return;
        };
        let members = worker.batcher.borrow_mut().complete(token);
        let Some(members) = members else {
            if self.rules_call == Some(token) {
                self.rules_call = None;
                let (status, body) = call_response(body_size);
                worker.take_rules(status.as_deref(), &body);
            }
            return;
        };
        let (status, body) = call_response(body_size);
        match decision::decisions_from_reply(status.as_deref(), &body, members.len()) {
            Ok(decisions) => {
                let (verdicts, counted): (Vec<Verdict>, Vec<Counted>) = members
                    .iter()
                    .zip(&decisions)
                    .map(|(member, decision)| {
                        worker.settle(decision, member.fingerprint, || request_id_of(member))
                    })
                    .unzip();
                worker.count(counted);
                self.deliver(&worker, members, verdicts);
            }
            Err(failure) => self.fail(&worker, members, &failure),
        }
        self.send_next_batch(&worker);
    }
}

impl SluiceRoot {
    /// Sends the batches that may leave now (see [`Batcher::next_batch`]). The callout is
    /// made with the root as Envoy's current context, so that it belongs to the root and
    /// outlives any one request.
    fn send_next_batch(&mut self, worker: &Worker) {
        loop {
            let next = worker.batcher.borrow_mut().next_batch();
            let Some((members, request)) = next else {
                return;
            };
            let sent = serde_json::to_vec(&request)
                .map_err(|e| format!("cannot encode the batch: {e}"))
                .and_then(|body| {
                    hostcalls::set_effective_context(self.context_id)
                        .map_err(|status| format!("{status:?}"))?;
                    worker.call_controller(CHECK_PATH, Some(&body))
                });
            match sent {
                Ok(token) => worker.batcher.borrow_mut().sent(token, members, now_ms()),
                Err(why) => self.fail(worker, members, &Failure::Dispatch(why)),
            }
        }
    }

    fn fail(&mut self, worker: &Worker, members: Vec<Member>, failure: &Failure) {
        let modes: Vec<FailureMode> = members.iter().map(|m| m.failure_mode).collect();
        let verdicts = worker.failure_verdicts(failure, &modes);
        self.deliver(worker, members, verdicts);
    }

    /// Hands each request its verdict and resumes or answers it. A request whose client is
    /// gone is skipped; the concurrency slots it was given go back at once.
    fn deliver(&mut self, worker: &Worker, members: Vec<Member>, verdicts: Vec<Verdict>) {
        let mut orphaned_leases = Vec::new();
        for (member, verdict) in members.into_iter().zip(verdicts) {
            if !still_here(&member.slot)
                || hostcalls::set_effective_context(member.context_id).is_err()
            {
                if let Verdict::Continue { leases, .. } = verdict {
                    orphaned_leases.extend(leases);
                }
                continue;
            }
            match &verdict {
                Verdict::Continue { delay_ms, .. } if *delay_ms > 0 => {
                    self.delayed.push((
                        now_ms().saturating_add(*delay_ms),
                        member.context_id,
                        Rc::clone(&member.slot),
                    ));
                    *member.slot.borrow_mut() = Some(verdict);
                }
                Verdict::Continue { .. } => {
                    *member.slot.borrow_mut() = Some(verdict);
                    let _ = hostcalls::resume_http_request();
                }
                Verdict::Reply {
                    status,
                    headers,
                    body,
                } => {
                    let headers: Vec<(&str, &str)> = headers
                        .iter()
                        .map(|(name, value)| (*name, value.as_str()))
                        .collect();
                    let _ = hostcalls::send_http_response(*status, headers, Some(body.as_bytes()));
                    *member.slot.borrow_mut() = Some(verdict);
                }
            }
        }
        if !orphaned_leases.is_empty() && hostcalls::set_effective_context(self.context_id).is_ok()
        {
            worker.release(orphaned_leases);
        }
        if !self.delayed.is_empty() {
            let _ = hostcalls::set_tick_period(DELAY_TICK);
        }
    }

    /// Reads the controller's rules every `rules_poll_ms`, one read at a time.
    fn read_rules_when_due(&mut self, worker: &Worker) {
        let Some(interval) = worker.config.rules_poll else {
            return;
        };
        let now = now_ms();
        let due = now.saturating_sub(self.rules_read_at_ms) >= interval.as_millis() as u64;
        // A read whose answer never came is given up after a few intervals.
        let stuck = now.saturating_sub(self.rules_read_at_ms) >= 4 * interval.as_millis() as u64;
        if !due || (self.rules_call.is_some() && !stuck) {
            return;
        }
        self.rules_read_at_ms = now;
        self.rules_call = worker.call_controller(RULES_PATH, None).ok();
    }

    fn resume_due(&mut self) {
        let now = now_ms();
        self.delayed.retain(|(due, context_id, slot)| {
            if *due > now {
                return true;
            }
            if still_here(slot) && hostcalls::set_effective_context(*context_id).is_ok() {
                let _ = hostcalls::resume_http_request();
            }
            false
        });
        if self.delayed.is_empty() {
            let _ = hostcalls::set_tick_period(WATCHDOG_TICK);
        }
    }
}

impl RootContext for SluiceRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let config = match FilterConfig::parse(&bytes) {
            Ok(config) => config,
            Err(error) => {
                log(LogLevel::Error, &error.to_string());
                return false;
            }
        };
        let wake_queue = if config.batching {
            // One queue per worker VM: a queue wakes the root that registered it, so the
            // name must differ between VMs. Workers start at the same moment and may read
            // the same clock; std's hasher keys are random per VM (WASI random_get).
            let name = format!("sluice-wake-{}-{:016x}", self.context_id, random_u64());
            match hostcalls::register_shared_queue(&name) {
                Ok(queue) => Some(queue),
                Err(status) => {
                    log(
                        LogLevel::Error,
                        &format!("cannot register the batching queue: {status:?}"),
                    );
                    return false;
                }
            }
        } else {
            None
        };
        let batcher = Batcher::new(batch::Limits {
            max_batch: config.max_batch_size,
            max_in_flight: config.max_batches_in_flight,
            max_waiting: MAX_WAITING,
        });
        self.worker = Some(Rc::new(Worker {
            config,
            batcher: RefCell::new(batcher),
            wake_queue,
            metrics: Metrics::define(),
            rules: RefCell::new(Vec::new()),
            matched_headers: RefCell::new(Vec::new()),
        }));
        let _ = hostcalls::set_tick_period(WATCHDOG_TICK);
        true
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
        if let Some(worker) = self.worker.clone() {
            self.send_next_batch(&worker);
        }
    }

    fn on_tick(&mut self) {
        self.resume_due();
        let Some(worker) = self.worker.clone() else {
            return;
        };
        self.read_rules_when_due(&worker);
        let limit = worker.config.timeout.as_millis() as u64 + 1_000;
        let overdue = worker.batcher.borrow_mut().overdue(now_ms(), limit);
        if !overdue.is_empty() {
            self.fail(
                &worker,
                overdue,
                &Failure::Status("(none: the batch was lost)".into()),
            );
            self.send_next_batch(&worker);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let worker = self.worker.clone()?;
        let failure_mode = worker.config.failure_mode;
        Some(Box::new(SluiceRequest {
            context_id,
            worker,
            state: State::New,
            failure_mode,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

enum State {
    New,
    /// One callout of its own is out (batching off).
    AwaitingDecision {
        fingerprint: u64,
    },
    /// In a batch; the root leaves the verdict in the slot.
    Batched(Slot),
    /// Going upstream; these headers go on the response, these leases go back at the end.
    Admitted {
        headers: decision::Headers,
        leases: Vec<String>,
    },
    /// Answered locally; the local reply already carries its headers.
    Answered,
}

struct SluiceRequest {
    context_id: u32,
    worker: Rc<Worker>,
    state: State,
    /// What happens if the controller cannot answer (the filter's, or its rules').
    failure_mode: FailureMode,
}

/// What the filter decided about a request before asking anyone.
enum Triage {
    /// Not limited: exempt path or safelisted.
    Pass,
    /// Answered here: invalid token, denylisted, or a denial the cache holds.
    Answer(Verdict),
    /// The controller decides this check.
    Ask { check: Check, fingerprint: u64 },
}

impl SluiceRequest {
    /// Envoy's `x-request-id`, for the body of a local reply (read only for one).
    fn request_id(&self) -> Option<String> {
        self.get_http_request_header("x-request-id")
    }

    fn property_text(&self, path: Vec<&str>) -> Option<String> {
        String::from_utf8(self.get_property(path)?).ok()
    }

    /// Subject and tier that Envoy's `jwt_authn` verified and left in the metadata.
    fn verified_claims(&self) -> Option<Claims> {
        let jwt = self.worker.config.identity.jwt.as_ref()?;
        let metadata = jwt.metadata.as_ref()?;
        let claim = |name: &str| {
            self.property_text(vec![
                "metadata",
                "filter_metadata",
                &metadata.filter,
                &metadata.key,
                name,
            ])
            .filter(|text| !text.is_empty() && text.len() <= crate::jwt::MAX_CLAIM_BYTES)
        };
        Some(Claims {
            subject: claim(&jwt.subject_claim)?,
            tier: jwt.tier_claim.as_deref().and_then(claim),
        })
    }

    fn identify(&self, headers: &RequestHeaders) -> Result<Identity, crate::jwt::TokenError> {
        let config = &self.worker.config.identity;
        let peer = self.property_text(vec!["source", "address"]);
        let forwarded_for = if config.wants_forwarded_for() {
            headers.get("x-forwarded-for")
        } else {
            None
        };
        let token_header = config.jwt.as_ref().and_then(|jwt| headers.get(&jwt.header));
        let api_key = config.api_key_header.as_ref().and_then(|h| headers.get(h));
        let client_header = config.client_header.as_ref().and_then(|h| headers.get(h));
        let facts = Facts {
            peer: peer.as_deref(),
            forwarded_for: forwarded_for.as_deref(),
            token_header: token_header.as_deref(),
            verified_claims: self.verified_claims(),
            api_key: api_key.as_deref(),
            client_header: client_header.as_deref(),
        };
        // Only tokens need the time.
        let now_s = if config.jwt.is_some() {
            now_ms() / 1_000
        } else {
            0
        };
        identity::identify(config, &facts, now_s)
    }

    fn triage(&mut self) -> Triage {
        let config = &self.worker.config;
        let metrics = &self.worker.metrics;
        let headers = RequestHeaders::new(self.get_http_request_headers());
        let full_path = headers.get(":path").unwrap_or_default();
        let path = decision::path_only(&full_path);
        if config.exempt.contains_path(path) {
            return Triage::Pass;
        }
        let identity = match self.identify(&headers) {
            Ok(identity) => identity,
            Err(error) => {
                metrics.add(Metric::TokenRejected, 1);
                log(
                    LogLevel::Info,
                    &format!("refusing a request with an invalid token: {error}"),
                );
                return Triage::Answer(decision::token_rejected(
                    &error,
                    self.request_id().as_deref(),
                ));
            }
        };
        match lists::listing(&config.safelist, &config.denylist, &identity, path) {
            Listing::Denylisted => {
                metrics.add(Metric::Denylisted, 1);
                return Triage::Answer(decision::denylisted(self.request_id().as_deref()));
            }
            Listing::Safelisted => {
                metrics.add(Metric::Safelisted, 1);
                return Triage::Pass;
            }
            Listing::Neither => {}
        }
        let cost = match &config.cost_header {
            Some(name) => decision::cost_from_header(headers.get(name).as_deref()),
            None => 1,
        };
        let mut check = decision::check_for(
            &identity,
            &headers.get(":authority").unwrap_or_default(),
            &headers.get(":method").unwrap_or_default(),
            path,
            cost,
        );
        for name in self.worker.matched_headers.borrow().iter() {
            if let Some(value) = headers.get(name) {
                check.headers.insert(name.clone(), value.into_owned());
            }
        }
        self.failure_mode = self.worker.failure_mode_for(&check);
        let fingerprint = denial::fingerprint(&check);
        if let Some(verdict) = self.worker.cached_denial(fingerprint, || self.request_id()) {
            return Triage::Answer(verdict);
        }
        Triage::Ask { check, fingerprint }
    }

    /// Carries out a verdict. Returns the action for a callback that is still running.
    fn apply(&mut self, verdict: Verdict) -> Action {
        match verdict {
            Verdict::Continue {
                response_headers,
                leases,
                ..
            } => {
                self.state = State::Admitted {
                    headers: response_headers,
                    leases,
                };
                Action::Continue
            }
            Verdict::Reply {
                status,
                headers,
                body,
            } => {
                self.state = State::Answered;
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(name, value)| (*name, value.as_str()))
                    .collect();
                self.send_http_response(status, headers, Some(body.as_bytes()));
                Action::Pause
            }
        }
    }

    fn fail(&mut self, failure: &Failure) -> Action {
        let verdicts = self.worker.failure_verdicts(failure, &[self.failure_mode]);
        match verdicts.into_iter().next() {
            Some(verdict) => self.apply(verdict),
            None => Action::Continue,
        }
    }

    /// Batching: join the next batch and wait for the root to deliver the verdict.
    fn join_batch(&mut self, check: Check, fingerprint: u64) -> Action {
        let slot: Slot = Rc::new(RefCell::new(None));
        let member = Member {
            context_id: self.context_id,
            slot: Rc::clone(&slot),
            fingerprint,
            failure_mode: self.failure_mode,
        };
        let registered = self.worker.batcher.borrow_mut().register(member, check);
        match registered {
            Registered::Wait => {}
            Registered::WakeRoot => {
                let woken = self
                    .worker
                    .wake_queue
                    .ok_or_else(|| "no batching queue".to_owned())
                    .and_then(|queue| {
                        hostcalls::enqueue_shared_queue(queue, None).map_err(|s| format!("{s:?}"))
                    });
                if let Err(why) = woken {
                    self.worker.batcher.borrow_mut().cancel(self.context_id);
                    return self.fail(&Failure::Dispatch(format!(
                        "cannot wake the batcher: {why}"
                    )));
                }
            }
            Registered::Overloaded => {
                return self.fail(&Failure::Dispatch(format!(
                    "{MAX_WAITING} requests already wait for a decision on this worker"
                )));
            }
        }
        self.state = State::Batched(slot);
        Action::Pause
    }

    /// Without batching: a callout of its own.
    fn ask_alone(&mut self, check: Check, fingerprint: u64) -> Action {
        let request = CheckRequest {
            checks: vec![check],
            hold_delays: true,
        };
        let body = match serde_json::to_vec(&request) {
            Ok(body) => body,
            Err(error) => {
                return self.fail(&Failure::Dispatch(format!(
                    "cannot encode the check: {error}"
                )))
            }
        };
        match self.worker.call_controller(CHECK_PATH, Some(&body)) {
            Ok(_token) => {
                self.state = State::AwaitingDecision { fingerprint };
                Action::Pause
            }
            Err(status) => self.fail(&Failure::Dispatch(status)),
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
                ..
            }) => State::Admitted {
                headers: response_headers,
                leases,
            },
            Some(Verdict::Reply { .. }) => State::Answered,
            None => return,
        };
    }
}

impl Context for SluiceRequest {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let State::AwaitingDecision { fingerprint } =
            std::mem::replace(&mut self.state, State::New)
        else {
            return;
        };
        let (status, body) = call_response(body_size);
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
                let (verdict, counted) = self
                    .worker
                    .settle(&decision, fingerprint, || self.request_id());
                self.worker.count([counted]);
                self.apply(verdict)
            }
            Err(failure) => self.fail(&failure),
        };
        if action == Action::Continue {
            self.resume_http_request();
        }
    }
}

impl HttpContext for SluiceRequest {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if !matches!(self.state, State::New) {
            return Action::Continue;
        }
        match self.triage() {
            Triage::Pass => Action::Continue,
            Triage::Answer(verdict) => self.apply(verdict),
            Triage::Ask { check, fingerprint } => {
                if self.worker.config.batching {
                    self.join_batch(check, fingerprint)
                } else {
                    self.ask_alone(check, fingerprint)
                }
            }
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        self.settle_batched();
        if let State::Admitted { headers, .. } = &self.state {
            for (name, value) in headers {
                self.set_http_response_header(name, Some(value));
            }
        }
        Action::Continue
    }

    /// The stream is over (completed, reset or refused upstream). A request still waiting
    /// for its batch leaves it; concurrency slots go back. Nobody waits for the release's
    /// answer; a lost release frees itself when its lease expires.
    fn on_log(&mut self) {
        self.settle_batched();
        match &mut self.state {
            State::Batched(_) => {
                self.worker.batcher.borrow_mut().cancel(self.context_id);
                // Let go of the slot: the root must not answer this request any more.
                self.state = State::Answered;
            }
            State::Admitted { leases, .. } => self.worker.release(std::mem::take(leases)),
            _ => {}
        }
    }
}
