//! The only module that talks to Envoy: reads what the request looks like, dispatches the
//! check callout and carries out the [`Verdict`]. Decisions are made in [`crate::decision`].

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use sluice_protocol::{CHECK_PATH, RELEASE_PATH};

use crate::client;
use crate::config::FilterConfig;
use crate::decision::{self, Failure, Verdict};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(SluiceRoot::default()) });
}}

fn log(level: LogLevel, message: &str) {
    // Logging is best effort: there is nobody to tell if the host refuses a log line.
    let _ = proxy_wasm::hostcalls::log(level, message);
}

#[derive(Default)]
struct SluiceRoot {
    config: Option<Rc<FilterConfig>>,
}

impl Context for SluiceRoot {}

impl RootContext for SluiceRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match FilterConfig::parse(&bytes) {
            Ok(config) => {
                self.config = Some(Rc::new(config));
                true
            }
            Err(error) => {
                log(LogLevel::Error, &error.to_string());
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.clone()?;
        Some(Box::new(SluiceRequest {
            config,
            state: State::New,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

enum State {
    New,
    AwaitingDecision,
    /// Going upstream; these headers go on the response, these leases go back at the end.
    Admitted {
        headers: decision::Headers,
        leases: Vec<String>,
    },
    /// Answered locally; the local reply already carries its headers.
    Answered,
}

struct SluiceRequest {
    config: Rc<FilterConfig>,
    state: State,
}

impl SluiceRequest {
    fn header(&self, name: &str) -> String {
        self.get_http_request_header(name).unwrap_or_default()
    }

    fn source_address(&self) -> Option<String> {
        let bytes = self.get_property(vec!["source", "address"])?;
        String::from_utf8(bytes).ok()
    }

    /// Carries out a verdict. Returns the action for a callback that is still running.
    fn apply(&mut self, verdict: Verdict) -> Action {
        match verdict {
            Verdict::Continue {
                response_headers,
                leases,
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

    fn fail(&mut self, failure: &Failure, verdict: Verdict) -> Action {
        let mode = match verdict {
            Verdict::Continue { .. } => "allowing the request (failure mode allow)",
            Verdict::Reply { .. } => "refusing the request (failure mode deny)",
        };
        log(LogLevel::Warn, &format!("no decision, {mode}: {failure}"));
        self.apply(verdict)
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
        if !matches!(self.state, State::AwaitingDecision) {
            return;
        }
        let status = self.get_http_call_response_header(":status");
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        let action = match decision::verdict_for_reply(&self.config, status.as_deref(), &body) {
            Ok(verdict) => self.apply(verdict),
            Err((failure, verdict)) => self.fail(&failure, verdict),
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
        let client = client::identify(self.source_address().as_deref());
        let cost = match &self.config.cost_header {
            Some(name) => decision::cost_from_header(self.get_http_request_header(name).as_deref()),
            None => 1,
        };
        let request = decision::check_request(
            client,
            &self.header(":authority"),
            &self.header(":method"),
            &self.header(":path"),
            cost,
        );
        let body = match serde_json::to_vec(&request) {
            Ok(body) => body,
            Err(error) => {
                let failure = Failure::Dispatch(format!("cannot encode the check: {error}"));
                return self.fail(&failure, decision::verdict_for_failure(&self.config));
            }
        };
        let dispatched = self.dispatch_http_call(
            &self.config.controller_cluster,
            vec![
                (":method", "POST"),
                (":path", CHECK_PATH),
                (":authority", &self.config.controller_authority),
                ("content-type", "application/json"),
            ],
            Some(&body),
            vec![],
            self.config.timeout,
        );
        match dispatched {
            Ok(_token) => {
                self.state = State::AwaitingDecision;
                Action::Pause
            }
            Err(status) => {
                let failure = Failure::Dispatch(format!("{status:?}"));
                self.fail(&failure, decision::verdict_for_failure(&self.config))
            }
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if let State::Admitted { headers, .. } = &self.state {
            for (name, value) in headers {
                self.set_http_response_header(name, Some(value));
            }
        }
        Action::Continue
    }

    /// The stream is over (completed, reset or refused upstream): concurrency slots go back.
    /// Nobody waits for the answer; a lost release frees itself when its lease expires.
    fn on_log(&mut self) {
        let State::Admitted { leases, .. } = &mut self.state else {
            return;
        };
        if leases.is_empty() {
            return;
        }
        let body = decision::release_request(std::mem::take(leases));
        let dispatched = self.dispatch_http_call(
            &self.config.controller_cluster,
            vec![
                (":method", "POST"),
                (":path", RELEASE_PATH),
                (":authority", &self.config.controller_authority),
                ("content-type", "application/json"),
            ],
            Some(&body),
            vec![],
            self.config.timeout,
        );
        if let Err(status) = dispatched {
            log(
                LogLevel::Warn,
                &format!("could not release concurrency slots ({status:?}); they free themselves when their lease expires"),
            );
        }
    }
}
