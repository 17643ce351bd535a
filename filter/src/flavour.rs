//! What differs between proxy-wasm hosts, kept in one place: [`Portable`] wraps the raw
//! host (`abi.rs` inside a proxy, `testing.rs` natively) and is the [`Host`] the core sees.
//!
//! The flavour is decided once, at `on_configure`: the plugin configuration's `host` field
//! if it names one, else [`probe`]. Envoy gets exactly the calls it got before (no host call
//! is added to a request). On Kong's ngx_wasm_module ([`Flavour::Ngx`]):
//! - `proxy_set_tick_period_milliseconds` traps when called a second time with a non-zero
//!   period: only the first goes to the host, later ones are answered `Ok` without a call,
//!   so the VM ticks at its first period (1 s) for its lifetime;
//! - `proxy_set_shared_data` with CAS 0 on a key that exists answers `CasMismatch` (Envoy
//!   writes unconditionally): a write reads the key's CAS first and writes with it;
//! - a local reply's `details` becomes the HTTP reason phrase (`429 sluice_rate_limited`):
//!   none is sent.
//!
//! What the core itself does differently on ngx (it asks [`Host::flavour`]): no batching
//! (the host's shared queues must be declared in nginx's configuration and never call
//! `on_queue_ready`; see `root.rs`), concurrency releases sent from the next tick rather than
//! from `on_log` (where a callout traps), and the request's authority read from `host`
//! (ngx's `:authority` is the server's name and port).

use std::cell::{Cell, RefCell};

use crate::host::{BufferType, Flavour, HeaderMap, Host, LogLevel, MapType, Status};

/// A context id no host hands out: setting it answers whether the host checks ids at all.
const NO_SUCH_CONTEXT: u32 = u32::MAX;

/// Writes of a shared-data key tried on ngx before giving up (another worker wrote between
/// the read and the write each time).
const CAS_ATTEMPTS: usize = 4;

/// The host the filter runs in, without trapping: in a root context, Envoy refuses an
/// effective context that does not exist (`BadArgument`); ngx_wasm_module's
/// `proxy_set_effective_context` is a no-op that answers `Ok`.
pub fn probe(host: &dyn Host) -> Flavour {
    match host.set_effective_context(NO_SUCH_CONTEXT) {
        Ok(()) => Flavour::Ngx,
        Err(_) => Flavour::Envoy,
    }
}

/// The raw host `H`, adapted to the flavour it turned out to be.
pub struct Portable<H> {
    raw: H,
    flavour: Cell<Flavour>,
    log_level: Cell<LogLevel>,
    /// The root contexts whose non-zero tick period reached the host (ngx takes one per
    /// root context).
    ticking: RefCell<Vec<u32>>,
}

impl<H: Host> Portable<H> {
    pub fn new(raw: H) -> Self {
        Portable {
            raw,
            flavour: Cell::new(Flavour::Envoy),
            log_level: Cell::new(LogLevel::Info),
            ticking: RefCell::new(Vec::new()),
        }
    }

    /// ngx: read the key's CAS (absent: 0), write with it; another writer in between makes
    /// it try again, a few times. Correct on Envoy too, which is spared the extra read.
    fn write_with_cas(&self, key: &str, value: &[u8]) -> Result<(), Status> {
        let mut last = Status::CasMismatch;
        for _ in 0..CAS_ATTEMPTS {
            let cas = self
                .raw
                .shared_data_with_cas(key)?
                .map_or(0, |(_, cas)| cas);
            match self.raw.set_shared_data_if(key, value, cas) {
                Err(Status::CasMismatch) => last = Status::CasMismatch,
                other => return other,
            }
        }
        Err(last)
    }
}

/// The raw host underneath (native tests read the mock's state through it).
impl<H> std::ops::Deref for Portable<H> {
    type Target = H;

    fn deref(&self) -> &H {
        &self.raw
    }
}

impl<H: Host> Host for Portable<H> {
    fn log(&self, level: LogLevel, message: &str) {
        if level >= self.log_level.get() {
            self.raw.log(level, message);
        }
    }

    fn log_level(&self) -> LogLevel {
        self.log_level.get()
    }

    fn flavour(&self) -> Flavour {
        self.flavour.get()
    }

    fn adopt(&self, flavour: Flavour, log_level: LogLevel) {
        self.flavour.set(flavour);
        self.log_level.set(log_level);
    }

    fn now_ms(&self) -> u64 {
        self.raw.now_ms()
    }

    fn buffer(&self, buffer: BufferType, max_size: usize) -> Result<Option<Vec<u8>>, Status> {
        self.raw.buffer(buffer, max_size)
    }

    fn header_map(&self, map: MapType) -> Result<HeaderMap, Status> {
        self.raw.header_map(map)
    }

    fn header(&self, map: MapType, name: &str) -> Result<Option<Vec<u8>>, Status> {
        self.raw.header(map, name)
    }

    fn replace_header(&self, map: MapType, name: &str, value: &str) -> Result<(), Status> {
        self.raw.replace_header(map, name, value)
    }

    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
        self.raw.property(path)
    }

    fn send_local_response(
        &self,
        status: u32,
        details: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        grpc_status: Option<u32>,
    ) -> Result<(), Status> {
        let details = match self.flavour.get() {
            Flavour::Envoy => details,
            // ngx makes it the reason phrase: the status's own reads right.
            Flavour::Ngx => "",
        };
        self.raw
            .send_local_response(status, details, headers, body, grpc_status)
    }

    fn resume_request(&self) -> Result<(), Status> {
        self.raw.resume_request()
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), Status> {
        self.raw.set_effective_context(context_id)
    }

    fn http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u32,
    ) -> Result<u32, Status> {
        self.raw.http_call(cluster, headers, body, timeout_ms)
    }

    fn shared_data_with_cas(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, Status> {
        self.raw.shared_data_with_cas(key)
    }

    fn set_shared_data_if(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
        self.raw.set_shared_data_if(key, value, cas)
    }

    fn set_shared_data(&self, key: &str, value: &[u8]) -> Result<(), Status> {
        match self.flavour.get() {
            Flavour::Envoy => self.raw.set_shared_data_if(key, value, 0),
            Flavour::Ngx => self.write_with_cas(key, value),
        }
    }

    fn register_shared_queue(&self, name: &str) -> Result<u32, Status> {
        self.raw.register_shared_queue(name)
    }

    fn enqueue_shared_queue(&self, queue_id: u32, value: &[u8]) -> Result<(), Status> {
        self.raw.enqueue_shared_queue(queue_id, value)
    }

    fn dequeue_shared_queue(&self, queue_id: u32) -> Result<Option<Vec<u8>>, Status> {
        self.raw.dequeue_shared_queue(queue_id)
    }

    fn set_tick_period_ms(&self, root_context_id: u32, period_ms: u32) -> Result<(), Status> {
        let ticking = |ticking: &Vec<u32>| ticking.contains(&root_context_id);
        if self.flavour.get() == Flavour::Ngx && period_ms != 0 && ticking(&self.ticking.borrow()) {
            // ngx traps on a root's second period; its first one stays.
            return Ok(());
        }
        self.raw.set_tick_period_ms(root_context_id, period_ms)?;
        let mut roots = self.ticking.borrow_mut();
        if period_ms != 0 && !ticking(&roots) {
            roots.push(root_context_id);
        }
        Ok(())
    }

    fn define_counter(&self, name: &str) -> Result<u32, Status> {
        self.raw.define_counter(name)
    }

    fn increment_metric(&self, metric_id: u32, by: i64) -> Result<(), Status> {
        self.raw.increment_metric(metric_id, by)
    }
}
