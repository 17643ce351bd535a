//! A host for native tests: [`MockHost`] answers the filter's host calls from state a test
//! sets (any bytes, any status), and [`MockEnvoy`] drives the [`Dispatcher`] through the
//! callbacks in the order Envoy makes them. It is what lets the request path, not only its
//! parts, be tested and fuzzed without Envoy.
//!
//! The mock behaves as Envoy does, or, with [`MockState::profile`] set to
//! [`Flavour::Ngx`], as Kong's ngx_wasm_module does where the two differ: a second tick
//! period, a shared queue, a callout from `on_log` or from the response headers, and
//! `proxy_continue_stream` from the root context trap (recorded in [`MockState::traps`]);
//! `set_effective_context` is a no-op; CAS 0 does not overwrite; `on_queue_ready` never
//! comes; a callout's reply runs in the context that made it; callout targets are
//! `host:port`.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;

use crate::dispatch::{Dispatcher, Event};
use crate::flavour::Portable;
use crate::host::{Action, BufferType, Flavour, HeaderMap, Host, LogLevel, MapType, Status};

/// A callout the filter made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub token: u32,
    /// The context the reply goes to: the root, whichever context made the call.
    pub owner: u32,
    /// The context that was current when the call was made.
    pub caller: u32,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u32,
}

/// A local reply the filter sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub details: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The `grpc_status` argument: Envoy makes the reply gRPC with it.
    pub grpc_status: Option<u32>,
}

/// Host calls a test can make fail, each with the status it should return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostCall {
    HeaderMap,
    Header,
    Property,
    Buffer,
    HttpCall,
    SendLocalResponse,
    Resume,
    SetEffectiveContext,
    SharedData,
    SetSharedData,
    Enqueue,
    ReplaceHeader,
}

#[derive(Debug, Default)]
pub struct MockState {
    /// Which host the mock behaves as.
    pub profile: Flavour,
    /// Host calls that would have trapped in the profile's host (killing the VM, or the
    /// nginx worker): a test of a profile expects none.
    pub traps: Vec<String>,
    /// Whether the current callback is one in which ngx_wasm_module refuses a callout
    /// (`on_log`, the response headers).
    pub in_log_or_response: bool,
    /// Every tick period the host was given, in order.
    pub tick_periods: Vec<u32>,
    /// The contexts that set a non-zero tick period.
    pub ticking: Vec<u32>,
    pub now_ms: u64,
    pub plugin_configuration: Vec<u8>,
    /// The worker's root context: every callout belongs to it, as in Envoy.
    pub root: u32,
    /// The context the current callback is for, and the one host calls act on.
    pub current: u32,
    pub effective: u32,
    pub live: HashSet<u32>,
    /// Serialised request header maps (any bytes: a malformed map is a host error).
    pub request_headers: HashMap<u32, Vec<u8>>,
    /// Properties by context and NUL-joined path.
    pub properties: HashMap<u32, HashMap<Vec<u8>, Vec<u8>>>,
    pub response_headers: HashMap<u32, Vec<(String, String)>>,
    pub local_replies: HashMap<u32, LocalReply>,
    pub resumed: Vec<u32>,
    pub calls: Vec<Call>,
    next_token: u32,
    /// The response being delivered: serialised headers and body.
    pub call_response: (Vec<u8>, Vec<u8>),
    /// The piece of a response body passing now.
    pub response_body: Vec<u8>,
    /// The request body Envoy holds for the current request (it buffers while the filter
    /// pauses).
    pub request_body: Vec<u8>,
    pub shared_data: HashMap<String, Vec<u8>>,
    /// Each shared-data key's CAS (a key written by a test directly has none: 0).
    pub shared_cas: HashMap<String, u32>,
    next_cas: u32,
    /// Registered queues: name, owning root, items.
    pub queues: Vec<(String, u32, VecDeque<Vec<u8>>)>,
    pub tick_period_ms: u32,
    pub metric_names: Vec<String>,
    pub metric_values: Vec<i64>,
    pub logs: Vec<(LogLevel, String)>,
    pub failing: HashMap<HostCall, Status>,
}

#[derive(Debug, Default)]
pub struct MockHost {
    pub state: RefCell<MockState>,
}

impl MockHost {
    fn fails(&self, call: HostCall) -> Result<(), Status> {
        match self.state.borrow().failing.get(&call) {
            Some(status) => Err(*status),
            None => Ok(()),
        }
    }

    fn effective(&self) -> u32 {
        self.state.borrow().effective
    }

    fn ngx(&self) -> bool {
        self.state.borrow().profile == Flavour::Ngx
    }

    /// Notes a call that would trap, and answers what the filter would see if it did not.
    fn trap(&self, why: &str) -> Status {
        self.state.borrow_mut().traps.push(why.to_owned());
        Status::InternalFailure
    }

    /// The value of counter `name` (`sluice_checks`), 0 if never counted.
    pub fn metric(&self, name: &str) -> i64 {
        let state = self.state.borrow();
        state
            .metric_names
            .iter()
            .position(|n| n == name)
            .and_then(|id| state.metric_values.get(id).copied())
            .unwrap_or(0)
    }
}

fn owned_pairs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect()
}

impl Host for MockHost {
    fn log(&self, level: LogLevel, message: &str) {
        self.state
            .borrow_mut()
            .logs
            .push((level, message.to_owned()));
    }

    fn now_ms(&self) -> u64 {
        self.state.borrow().now_ms
    }

    fn buffer(&self, buffer: BufferType, max_size: usize) -> Result<Option<Vec<u8>>, Status> {
        self.fails(HostCall::Buffer)?;
        let state = self.state.borrow();
        let bytes = match buffer {
            BufferType::PluginConfiguration => &state.plugin_configuration,
            BufferType::CallResponseBody => &state.call_response.1,
            BufferType::HttpResponseBody => &state.response_body,
            BufferType::HttpRequestBody => &state.request_body,
        };
        Ok(Some(bytes.iter().take(max_size).copied().collect()))
    }

    fn header_map(&self, map: MapType) -> Result<HeaderMap, Status> {
        self.fails(HostCall::HeaderMap)?;
        let effective = self.effective();
        let state = self.state.borrow();
        let bytes = match map {
            MapType::RequestHeaders => state
                .request_headers
                .get(&effective)
                .cloned()
                .unwrap_or_default(),
            MapType::CallResponseHeaders => state.call_response.0.clone(),
            MapType::ResponseHeaders => {
                let pairs = state.response_headers.get(&effective).cloned();
                HeaderMap::serialize(&pairs.unwrap_or_default())
            }
        };
        HeaderMap::parse(bytes).ok_or(Status::SerializationFailure)
    }

    fn header(&self, map: MapType, name: &str) -> Result<Option<Vec<u8>>, Status> {
        self.fails(HostCall::Header)?;
        let map = self.header_map(map)?;
        Ok(map.get(name).map(|value| value.into_owned()))
    }

    fn replace_header(&self, map: MapType, name: &str, value: &str) -> Result<(), Status> {
        self.fails(HostCall::ReplaceHeader)?;
        if map != MapType::ResponseHeaders {
            return Err(Status::BadArgument);
        }
        let effective = self.effective();
        let mut state = self.state.borrow_mut();
        let headers = state.response_headers.entry(effective).or_default();
        headers.retain(|(n, _)| n != name);
        headers.push((name.to_owned(), value.to_owned()));
        Ok(())
    }

    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
        self.fails(HostCall::Property)?;
        let effective = self.effective();
        let state = self.state.borrow();
        Ok(state
            .properties
            .get(&effective)
            .and_then(|props| props.get(crate::host::property_path(path).as_slice()))
            .cloned())
    }

    fn send_local_response(
        &self,
        status: u32,
        details: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        grpc_status: Option<u32>,
    ) -> Result<(), Status> {
        self.fails(HostCall::SendLocalResponse)?;
        let effective = self.effective();
        let mut state = self.state.borrow_mut();
        if !state.live.contains(&effective) || state.local_replies.contains_key(&effective) {
            return Err(Status::BadArgument);
        }
        state.local_replies.insert(
            effective,
            LocalReply {
                status,
                details: details.to_owned(),
                headers: owned_pairs(headers),
                body: body.to_vec(),
                grpc_status,
            },
        );
        Ok(())
    }

    fn resume_request(&self) -> Result<(), Status> {
        self.fails(HostCall::Resume)?;
        let effective = self.effective();
        if self.ngx() && effective == self.state.borrow().root {
            return Err(self.trap("proxy_continue_stream from the root context"));
        }
        let mut state = self.state.borrow_mut();
        if !state.live.contains(&effective) {
            return Err(Status::BadArgument);
        }
        state.resumed.push(effective);
        Ok(())
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), Status> {
        self.fails(HostCall::SetEffectiveContext)?;
        if self.ngx() {
            // A no-op that answers Ok, whatever the id.
            return Ok(());
        }
        let mut state = self.state.borrow_mut();
        if !state.live.contains(&context_id) {
            return Err(Status::BadArgument);
        }
        state.effective = context_id;
        Ok(())
    }

    fn http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u32,
    ) -> Result<u32, Status> {
        self.fails(HostCall::HttpCall)?;
        if self.ngx() {
            if self.state.borrow().in_log_or_response {
                return Err(self.trap("proxy_dispatch_http_call from on_log or response headers"));
            }
            // No clusters: the upstream is `host:port`.
            let port = cluster
                .rsplit_once(':')
                .map(|(_, port)| port.parse::<u16>());
            if !matches!(port, Some(Ok(_))) {
                return Err(Status::BadArgument);
            }
        }
        let mut state = self.state.borrow_mut();
        state.next_token += 1;
        let token = state.next_token;
        let owner = state.root;
        let caller = state.effective;
        state.calls.push(Call {
            token,
            owner,
            caller,
            cluster: cluster.to_owned(),
            headers: owned_pairs(headers),
            body: body.to_vec(),
            timeout_ms,
        });
        Ok(token)
    }

    fn shared_data_with_cas(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, Status> {
        self.fails(HostCall::SharedData)?;
        let state = self.state.borrow();
        let cas = state.shared_cas.get(key).copied().unwrap_or(0);
        Ok(state.shared_data.get(key).map(|value| (value.clone(), cas)))
    }

    fn set_shared_data_if(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
        self.fails(HostCall::SetSharedData)?;
        let ngx = self.ngx();
        let mut state = self.state.borrow_mut();
        let current = state
            .shared_data
            .contains_key(key)
            .then(|| state.shared_cas.get(key).copied().unwrap_or(0));
        let takes = match (current, cas) {
            // Envoy: 0 writes whatever is there; ngx: only where nothing is.
            (None, 0) => true,
            (Some(_), 0) => !ngx,
            (current, cas) => current == Some(cas),
        };
        if !takes {
            return Err(Status::CasMismatch);
        }
        state.next_cas += 1;
        let next = state.next_cas;
        state.shared_cas.insert(key.to_owned(), next);
        state.shared_data.insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    fn register_shared_queue(&self, name: &str) -> Result<u32, Status> {
        if self.ngx() {
            // Only queues nginx's configuration declares (`shm_queue`) may be registered.
            return Err(self.trap("proxy_register_shared_queue of an undeclared queue"));
        }
        let mut state = self.state.borrow_mut();
        let owner = state.effective;
        state.queues.push((name.to_owned(), owner, VecDeque::new()));
        u32::try_from(state.queues.len()).map_err(|_| Status::InternalFailure)
    }

    fn enqueue_shared_queue(&self, queue_id: u32, value: &[u8]) -> Result<(), Status> {
        self.fails(HostCall::Enqueue)?;
        let mut state = self.state.borrow_mut();
        let index = (queue_id as usize).checked_sub(1).ok_or(Status::NotFound)?;
        let queue = state.queues.get_mut(index).ok_or(Status::NotFound)?;
        queue.2.push_back(value.to_vec());
        Ok(())
    }

    fn dequeue_shared_queue(&self, queue_id: u32) -> Result<Option<Vec<u8>>, Status> {
        let mut state = self.state.borrow_mut();
        let index = (queue_id as usize).checked_sub(1).ok_or(Status::NotFound)?;
        let queue = state.queues.get_mut(index).ok_or(Status::NotFound)?;
        Ok(queue.2.pop_front())
    }

    fn set_tick_period_ms(&self, _root_context_id: u32, period_ms: u32) -> Result<(), Status> {
        if self.ngx() {
            let (root, effective, ticking) = {
                let state = self.state.borrow();
                let ticking = state.ticking.contains(&state.effective);
                (state.root, state.effective, ticking)
            };
            if effective != root {
                return Err(self.trap("proxy_set_tick_period_milliseconds outside the root"));
            }
            if ticking && period_ms != 0 {
                return Err(self.trap("a second proxy_set_tick_period_milliseconds"));
            }
        }
        let mut state = self.state.borrow_mut();
        state.tick_period_ms = period_ms;
        state.tick_periods.push(period_ms);
        if period_ms != 0 {
            let effective = state.effective;
            state.ticking.push(effective);
        }
        Ok(())
    }

    fn define_counter(&self, name: &str) -> Result<u32, Status> {
        let mut state = self.state.borrow_mut();
        if let Some(id) = state.metric_names.iter().position(|n| n == name) {
            return u32::try_from(id).map_err(|_| Status::InternalFailure);
        }
        state.metric_names.push(name.to_owned());
        state.metric_values.push(0);
        u32::try_from(state.metric_names.len() - 1).map_err(|_| Status::InternalFailure)
    }

    fn increment_metric(&self, metric_id: u32, by: i64) -> Result<(), Status> {
        let mut state = self.state.borrow_mut();
        let value = state
            .metric_values
            .get_mut(metric_id as usize)
            .ok_or(Status::NotFound)?;
        *value = value.saturating_add(by);
        Ok(())
    }
}

/// Envoy as the filter sees it: one worker with one root context, requests created and
/// called back in Envoy's order.
pub struct MockEnvoy {
    /// The mock, as the filter sees it (through the portable layer).
    pub host: Rc<Portable<MockHost>>,
    dispatcher: Dispatcher,
    pub root: u32,
    next_context: u32,
}

impl MockEnvoy {
    /// A worker whose root was created and configured with `plugin_configuration`; the
    /// flag says whether the filter took the configuration.
    pub fn start(plugin_configuration: &[u8]) -> (MockEnvoy, bool) {
        Self::start_as(Flavour::Envoy, plugin_configuration)
    }

    /// [`MockEnvoy::start`] on a mock that behaves as the host `profile` does.
    pub fn start_as(profile: Flavour, plugin_configuration: &[u8]) -> (MockEnvoy, bool) {
        let host = Rc::new(Portable::new(MockHost::default()));
        host.state.borrow_mut().profile = profile;
        host.state.borrow_mut().plugin_configuration = plugin_configuration.to_vec();
        host.state.borrow_mut().now_ms = 1_800_000_000_000;
        host.state.borrow_mut().root = 1;
        let dispatcher = Dispatcher::new(host.clone());
        let mut envoy = MockEnvoy {
            host,
            dispatcher,
            root: 1,
            next_context: 2,
        };
        envoy.enter(1);
        envoy.dispatcher.handle(Event::Create {
            context_id: 1,
            root_context_id: 0,
        });
        let configured = envoy.dispatcher.configure(1);
        (envoy, configured)
    }

    /// Host calls that would have trapped in the profile's host.
    pub fn traps(&self) -> Vec<String> {
        self.host.state.borrow().traps.clone()
    }

    /// Starts a callback for `context_id`: host calls act on it until it says otherwise.
    fn enter(&mut self, context_id: u32) {
        let mut state = self.host.state.borrow_mut();
        state.in_log_or_response = false;
        state.live.insert(context_id);
        state.current = context_id;
        state.effective = context_id;
    }

    /// A new request with these serialised headers (any bytes) and properties; returns its
    /// context and what the filter told Envoy.
    pub fn request(&mut self, headers: Vec<u8>, properties: &[(&[&str], &[u8])]) -> (u32, Action) {
        let context_id = self.next_context;
        self.next_context += 1;
        {
            let mut state = self.host.state.borrow_mut();
            state.request_headers.insert(context_id, headers);
            let props = state.properties.entry(context_id).or_default();
            for (path, value) in properties {
                props.insert(crate::host::property_path(path), value.to_vec());
            }
        }
        self.enter(context_id);
        self.dispatcher.handle(Event::Create {
            context_id,
            root_context_id: self.root,
        });
        let action = self.dispatcher.stream_event(Event::RequestHeaders {
            context_id,
            end_of_stream: true,
        });
        (context_id, action)
    }

    /// A new request whose body is still to come (see [`MockEnvoy::send_body`]).
    pub fn request_with_body(
        &mut self,
        headers: Vec<u8>,
        properties: &[(&[&str], &[u8])],
    ) -> (u32, Action) {
        let context_id = self.next_context;
        self.next_context += 1;
        {
            let mut state = self.host.state.borrow_mut();
            state.request_headers.insert(context_id, headers);
            state.request_body.clear();
            let props = state.properties.entry(context_id).or_default();
            for (path, value) in properties {
                props.insert(crate::host::property_path(path), value.to_vec());
            }
        }
        self.enter(context_id);
        self.dispatcher.handle(Event::Create {
            context_id,
            root_context_id: self.root,
        });
        let action = self.dispatcher.stream_event(Event::RequestHeaders {
            context_id,
            end_of_stream: false,
        });
        (context_id, action)
    }

    /// A piece of the request body arrives; Envoy hands the filter all it holds so far.
    pub fn send_body(&mut self, context_id: u32, piece: &[u8], end_of_stream: bool) -> Action {
        self.enter(context_id);
        let body_size = {
            let mut state = self.host.state.borrow_mut();
            state.request_body.extend_from_slice(piece);
            state.request_body.len()
        };
        self.dispatcher.stream_event(Event::RequestBody {
            context_id,
            body_size,
            end_of_stream,
        })
    }

    /// Runs `on_queue_ready` for every queue with items waiting.
    pub fn run_queues(&mut self) {
        if self.host.state.borrow().profile == Flavour::Ngx {
            // ngx_wasm_module never calls `on_queue_ready`.
            return;
        }
        let ready: Vec<(u32, u32)> = {
            let state = self.host.state.borrow();
            state
                .queues
                .iter()
                .enumerate()
                .filter(|(_, (_, _, items))| !items.is_empty())
                .map(|(index, (_, owner, _))| (*owner, index as u32 + 1))
                .collect()
        };
        for (owner, queue_id) in ready {
            self.enter(owner);
            self.dispatcher.handle(Event::QueueReady {
                context_id: owner,
                queue_id,
            });
        }
    }

    /// Callouts made and not answered yet, oldest first.
    pub fn calls(&self) -> Vec<Call> {
        self.host.state.borrow().calls.clone()
    }

    /// Answers callout `token` with these serialised headers (`:status` among them) and
    /// body; the reply goes to the context that made the call.
    pub fn answer(&mut self, token: u32, headers: Vec<u8>, body: Vec<u8>) {
        let owner = {
            let mut state = self.host.state.borrow_mut();
            let Some(index) = state.calls.iter().position(|c| c.token == token) else {
                return;
            };
            let call = state.calls.remove(index);
            state.call_response = (headers, body.clone());
            call
        };
        // Envoy runs the reply in the root context; ngx_wasm_module names the root but runs
        // it in the context that made the call (if it is still there).
        let Call { owner, caller, .. } = owner;
        let ngx = self.host.state.borrow().profile == Flavour::Ngx;
        if ngx {
            if !self.host.state.borrow().live.contains(&caller) {
                return;
            }
            self.enter(caller);
        } else {
            self.enter(owner);
        }
        self.dispatcher.handle(Event::CallResponse {
            context_id: owner,
            token,
            body_size: body.len(),
        });
    }

    /// [`MockEnvoy::answer`] with a `:status` and a body.
    pub fn answer_with(&mut self, token: u32, status: &str, body: &[u8]) {
        self.answer(
            token,
            HeaderMap::serialize(&[(":status", status)]),
            body.to_vec(),
        );
    }

    /// Lets `ms` pass and runs the root's tick.
    pub fn tick(&mut self, ms: u64) {
        self.host.state.borrow_mut().now_ms += ms;
        let root = self.root;
        self.enter(root);
        self.dispatcher.handle(Event::Tick { context_id: root });
    }

    /// The response headers callback of a request (the upstream's answer, or the filter's
    /// own local reply passing through).
    pub fn respond(&mut self, context_id: u32) -> Action {
        self.enter(context_id);
        self.host.state.borrow_mut().in_log_or_response = true;
        self.dispatcher.stream_event(Event::ResponseHeaders {
            context_id,
            end_of_stream: true,
        })
    }

    /// A piece of a request's response body passes the filter.
    pub fn respond_body(&mut self, context_id: u32, piece: &[u8], end_of_stream: bool) -> Action {
        self.enter(context_id);
        self.host.state.borrow_mut().response_body = piece.to_vec();
        self.dispatcher.stream_event(Event::ResponseBody {
            context_id,
            body_size: piece.len(),
            end_of_stream,
        })
    }

    /// A request's response trailers pass the filter.
    pub fn respond_trailers(&mut self, context_id: u32) -> Action {
        self.enter(context_id);
        self.dispatcher
            .stream_event(Event::ResponseTrailers { context_id })
    }

    /// The request ends (completed, or the client left): `on_log`, then the context goes.
    pub fn finish(&mut self, context_id: u32) {
        self.enter(context_id);
        self.host.state.borrow_mut().in_log_or_response = true;
        self.dispatcher.handle(Event::Log { context_id });
        self.dispatcher.handle(Event::Delete { context_id });
        self.host.state.borrow_mut().live.remove(&context_id);
    }

    /// Whether the request was resumed or answered (it no longer waits on the filter).
    pub fn settled(&self, context_id: u32) -> bool {
        let state = self.host.state.borrow();
        state.resumed.contains(&context_id) || state.local_replies.contains_key(&context_id)
    }

    pub fn reply(&self, context_id: u32) -> Option<LocalReply> {
        self.host
            .state
            .borrow()
            .local_replies
            .get(&context_id)
            .cloned()
    }

    pub fn contexts(&self) -> (usize, usize) {
        self.dispatcher.contexts()
    }
}
