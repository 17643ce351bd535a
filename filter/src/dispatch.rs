//! Envoy's callbacks, routed to the context they are for: a root context per worker (and
//! one on the main thread), a stream per request. A callback for a context the filter does
//! not know (created before the filter was configured, or already deleted) is ignored:
//! nothing Envoy sends can make the dispatcher panic. Plain Rust, driven by `abi.rs` inside
//! Envoy and by `testing.rs` natively.

use std::collections::HashMap;
use std::rc::Rc;

use crate::host::{Action, Host, LogLevel};
use crate::root::Root;
use crate::stream::Stream;

/// One callback from Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Create {
        context_id: u32,
        root_context_id: u32,
    },
    Configure {
        context_id: u32,
    },
    Tick {
        context_id: u32,
    },
    QueueReady {
        context_id: u32,
        queue_id: u32,
    },
    RequestHeaders {
        context_id: u32,
        end_of_stream: bool,
    },
    RequestBody {
        context_id: u32,
        body_size: usize,
        end_of_stream: bool,
    },
    RequestTrailers {
        context_id: u32,
    },
    ResponseHeaders {
        context_id: u32,
        end_of_stream: bool,
    },
    ResponseBody {
        context_id: u32,
        body_size: usize,
        end_of_stream: bool,
    },
    ResponseTrailers {
        context_id: u32,
    },
    CallResponse {
        context_id: u32,
        token: u32,
        body_size: usize,
    },
    Log {
        context_id: u32,
    },
    Delete {
        context_id: u32,
    },
}

pub struct Dispatcher {
    host: Rc<dyn Host>,
    roots: HashMap<u32, Root>,
    streams: HashMap<u32, Stream>,
}

impl Dispatcher {
    pub fn new(host: Rc<dyn Host>) -> Self {
        Dispatcher {
            host,
            roots: HashMap::new(),
            streams: HashMap::new(),
        }
    }

    /// `on_configure` of a root context: whether the plugin configuration was taken.
    pub fn configure(&mut self, context_id: u32) -> bool {
        let host = self.host.as_ref();
        match self.roots.get_mut(&context_id) {
            Some(root) => root.configure(host),
            None => false,
        }
    }

    /// A stream's headers callback, answered with what Envoy should do next.
    pub fn stream_event(&mut self, event: Event) -> Action {
        let host = self.host.as_ref();
        match event {
            Event::RequestHeaders {
                context_id,
                end_of_stream,
            } => self
                .streams
                .get_mut(&context_id)
                .map_or(Action::Continue, |stream| {
                    stream.on_request_headers(host, end_of_stream)
                }),
            Event::RequestBody {
                context_id,
                body_size,
                end_of_stream,
            } => self
                .streams
                .get_mut(&context_id)
                .and_then(|stream| stream.on_request_body(host, Some(body_size), end_of_stream))
                .unwrap_or(Action::Continue),
            Event::RequestTrailers { context_id } => self
                .streams
                .get_mut(&context_id)
                .and_then(|stream| stream.on_request_body(host, None, true))
                .unwrap_or(Action::Continue),
            Event::ResponseHeaders { context_id, .. } => self
                .streams
                .get_mut(&context_id)
                .map_or(Action::Continue, |stream| stream.on_response_headers(host)),
            Event::ResponseBody {
                context_id,
                body_size,
                end_of_stream,
            } => self
                .streams
                .get_mut(&context_id)
                .map_or(Action::Continue, |stream| {
                    stream.on_response_body(host, body_size, end_of_stream)
                }),
            Event::ResponseTrailers { context_id } => {
                if let Some(stream) = self.streams.get_mut(&context_id) {
                    stream.on_response_trailers();
                }
                Action::Continue
            }
            other => {
                self.handle(other);
                Action::Continue
            }
        }
    }

    /// Every other callback (and, when Envoy called back into the VM while it was busy, a
    /// deferred one).
    pub fn handle(&mut self, event: Event) {
        let host = self.host.as_ref();
        match event {
            Event::Create {
                context_id,
                root_context_id: 0,
            } => {
                self.roots.insert(context_id, Root::new(context_id));
            }
            Event::Create {
                context_id,
                root_context_id,
            } => {
                // A root that was not configured has no worker: its streams are not
                // limited (Envoy does not start a filter whose configuration was refused).
                if let Some(worker) = self.roots.get(&root_context_id).and_then(Root::worker) {
                    self.streams
                        .insert(context_id, Stream::new(context_id, worker));
                }
            }
            Event::Tick { context_id } => {
                if let Some(root) = self.roots.get_mut(&context_id) {
                    root.on_tick(host);
                }
            }
            Event::QueueReady {
                context_id,
                queue_id,
            } => {
                if let Some(root) = self.roots.get_mut(&context_id) {
                    root.on_queue_ready(host, queue_id);
                }
            }
            // Envoy delivers every callout's reply to the root context (callouts belong to
            // the root whichever context made them); a request's own goes on to it.
            Event::CallResponse {
                context_id,
                token,
                body_size,
            } => {
                let Some(root) = self.roots.get_mut(&context_id) else {
                    return;
                };
                let own = root
                    .worker()
                    .and_then(|worker| worker.take_stream_call(token));
                match own {
                    Some(stream_id) => {
                        let stream = self.streams.get_mut(&stream_id);
                        if let Some(stream) = stream {
                            if host.set_effective_context(stream_id).is_ok() {
                                stream.on_http_call_response(host, body_size);
                            }
                        }
                    }
                    None => root.on_http_call_response(host, token, body_size),
                }
            }
            Event::Log { context_id } => {
                if let Some(stream) = self.streams.get_mut(&context_id) {
                    stream.on_log(host);
                }
            }
            Event::Delete { context_id } => {
                if self.streams.remove(&context_id).is_none() {
                    self.roots.remove(&context_id);
                }
            }
            // The body ended while the filter was busy: as if it ended now.
            Event::ResponseTrailers { context_id } => {
                if let Some(stream) = self.streams.get_mut(&context_id) {
                    stream.on_response_trailers();
                }
            }
            // A request's body came while the filter was busy (its piece was held): it is
            // checked now, without the body, and resumed by its answer, or now when it is
            // admitted at once or was answered already.
            Event::RequestBody { context_id, .. } | Event::RequestTrailers { context_id } => {
                if let Some(stream) = self.streams.get_mut(&context_id) {
                    if host.set_effective_context(context_id).is_ok()
                        && stream.on_request_body(host, None, true) == Some(Action::Continue)
                    {
                        let _ = host.resume_request();
                    }
                }
            }
            // That piece of the body has passed unread: what the body says is unknown.
            Event::ResponseBody { context_id, .. } => {
                if let Some(stream) = self.streams.get_mut(&context_id) {
                    stream.body_missed();
                }
            }
            // Answered already (Continue) when they could not be handled at once; carrying
            // them out later would act on a request that has moved on.
            Event::Configure { .. }
            | Event::RequestHeaders { .. }
            | Event::ResponseHeaders { .. } => host.log(
                LogLevel::Warn,
                &format!("{event:?} arrived while the filter was busy; it was let through"),
            ),
        }
    }

    /// Contexts the dispatcher holds: (roots, streams). For tests of the bookkeeping.
    pub fn contexts(&self) -> (usize, usize) {
        (self.roots.len(), self.streams.len())
    }
}
