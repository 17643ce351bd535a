//! The proxy-wasm ABI (0.2.1), spoken directly: the host functions Envoy provides, as
//! [`EnvoyHost`] (the [`Host`] the filter runs on inside Envoy), and the callbacks Envoy
//! calls, which hand every event to the [`Dispatcher`]. This is the only `unsafe` code of
//! the crate, and it does three things only: pass pointers to Envoy, take ownership of the
//! buffers Envoy allocated through [`proxy_on_memory_allocate`], and export the callbacks.
//!
//! Rules kept here (see `host.rs` for why the SDK is not used):
//! - every status comes back as a `u32` and becomes a `Result` ([`Status::check`]); an
//!   enum in an `extern` signature would be undefined behaviour on a code it lacks;
//! - flags from Envoy arrive as integers, never as `bool`, for the same reason;
//! - nothing Envoy hands over is assumed to be UTF-8;
//! - every callback a host may call is exported, also those the filter has nothing to do
//!   in: ngx_wasm_module calls the body, trailer, `on_done` and foreign-function callbacks
//!   without checking that they exist (a missing one kills the nginx worker). They return
//!   at once (a body callback runs per body chunk in Envoy);
//! - nothing is imported whose signature hosts disagree on: `proxy_get_log_level` is
//!   `(i32)->i32` in Envoy and `(i32,i32)->i32` (a stub that traps) in ngx_wasm_module, so
//!   the log level comes from the plugin configuration instead.

#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ptr::null_mut;
use std::rc::Rc;

use crate::dispatch::{Dispatcher, Event};
use crate::flavour::Portable;
use crate::host::{property_path, BufferType, HeaderMap, Host, LogLevel, MapType, Status};

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_register_shared_queue(
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_enqueue_shared_queue(queue_id: u32, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_dequeue_shared_queue(
        queue_id: u32,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        details_data: *const u8,
        details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_http_call(
        upstream_data: *const u8,
        upstream_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        body_data: *const u8,
        body_size: usize,
        trailers_data: *const u8,
        trailers_size: usize,
        timeout_ms: u32,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
}

/// Takes ownership of a buffer Envoy filled (allocated by [`proxy_on_memory_allocate`]).
fn take_buffer(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() || size == 0 {
        return Vec::new();
    }
    // SAFETY: Envoy allocated `size` bytes at `data` through `proxy_on_memory_allocate`,
    // which leaks a boxed slice of exactly that length, and hands them to us once.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

/// A call that returns a buffer: `Ok(None)` when the host says there is none.
fn returned_buffer(
    call: impl FnOnce(*mut *mut u8, *mut usize) -> u32,
) -> Result<Option<Vec<u8>>, Status> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    match Status::check(call(&mut data, &mut size)) {
        Ok(()) => Ok(Some(take_buffer(data, size))),
        Err(Status::NotFound | Status::Empty) => Ok(None),
        Err(status) => Err(status),
    }
}

/// The host the module runs in (Envoy, or another proxy-wasm host: `flavour.rs` adapts).
pub struct EnvoyHost;

const STREAM_REQUEST: u32 = 0;
const METRIC_COUNTER: u32 = 0;

impl Host for EnvoyHost {
    fn log(&self, level: LogLevel, message: &str) {
        // SAFETY: a pointer and length of a live string.
        let _ = unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
    }

    fn now_ms(&self) -> u64 {
        let mut nanos: u64 = 0;
        // SAFETY: a pointer to a live u64.
        let code = unsafe { proxy_get_current_time_nanoseconds(&mut nanos) };
        Status::check(code).map_or(0, |()| nanos / 1_000_000)
    }

    fn buffer(&self, buffer: BufferType, max_size: usize) -> Result<Option<Vec<u8>>, Status> {
        returned_buffer(|data, size| {
            // SAFETY: out-pointers to live locals.
            unsafe { proxy_get_buffer_bytes(buffer as u32, 0, max_size, data, size) }
        })
    }

    fn header_map(&self, map: MapType) -> Result<HeaderMap, Status> {
        let bytes = returned_buffer(|data, size| {
            // SAFETY: out-pointers to live locals.
            unsafe { proxy_get_header_map_pairs(map as u32, data, size) }
        })?;
        HeaderMap::parse(bytes.unwrap_or_default()).ok_or(Status::SerializationFailure)
    }

    fn header(&self, map: MapType, name: &str) -> Result<Option<Vec<u8>>, Status> {
        returned_buffer(|data, size| {
            // SAFETY: a live string and out-pointers to live locals.
            unsafe { proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), data, size) }
        })
    }

    fn replace_header(&self, map: MapType, name: &str, value: &str) -> Result<(), Status> {
        // SAFETY: pointers and lengths of live strings.
        Status::check(unsafe {
            proxy_replace_header_map_value(
                map as u32,
                name.as_ptr(),
                name.len(),
                value.as_ptr(),
                value.len(),
            )
        })
    }

    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
        let path = property_path(path);
        returned_buffer(|data, size| {
            // SAFETY: a live buffer and out-pointers to live locals.
            unsafe { proxy_get_property(path.as_ptr(), path.len(), data, size) }
        })
    }

    fn send_local_response(
        &self,
        status: u32,
        details: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        grpc_status: Option<u32>,
    ) -> Result<(), Status> {
        let headers = HeaderMap::serialize(headers);
        let grpc_status = grpc_status
            .and_then(|s| i32::try_from(s).ok())
            .unwrap_or(-1);
        // SAFETY: pointers and lengths of live buffers.
        Status::check(unsafe {
            proxy_send_local_response(
                status,
                details.as_ptr(),
                details.len(),
                body.as_ptr(),
                body.len(),
                headers.as_ptr(),
                headers.len(),
                grpc_status,
            )
        })
    }

    fn resume_request(&self) -> Result<(), Status> {
        // SAFETY: no pointers.
        Status::check(unsafe { proxy_continue_stream(STREAM_REQUEST) })
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), Status> {
        // SAFETY: no pointers.
        Status::check(unsafe { proxy_set_effective_context(context_id) })
    }

    fn http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u32,
    ) -> Result<u32, Status> {
        let headers = HeaderMap::serialize(headers);
        let trailers = HeaderMap::serialize::<&str, &str>(&[]);
        let mut token: u32 = 0;
        // SAFETY: pointers and lengths of live buffers; an out-pointer to a live local.
        Status::check(unsafe {
            proxy_http_call(
                cluster.as_ptr(),
                cluster.len(),
                headers.as_ptr(),
                headers.len(),
                body.as_ptr(),
                body.len(),
                trailers.as_ptr(),
                trailers.len(),
                timeout_ms,
                &mut token,
            )
        })?;
        Ok(token)
    }

    fn shared_data_with_cas(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, Status> {
        let mut cas: u32 = 0;
        let value = returned_buffer(|data, size| {
            // SAFETY: a live string and out-pointers to live locals.
            unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), data, size, &mut cas) }
        })?;
        Ok(value.map(|value| (value, cas)))
    }

    fn set_shared_data_if(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
        // SAFETY: pointers and lengths of live buffers.
        Status::check(unsafe {
            proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
        })
    }

    fn register_shared_queue(&self, name: &str) -> Result<u32, Status> {
        let mut id: u32 = 0;
        // SAFETY: a live string and an out-pointer to a live local.
        Status::check(unsafe { proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) })?;
        Ok(id)
    }

    fn enqueue_shared_queue(&self, queue_id: u32, value: &[u8]) -> Result<(), Status> {
        // SAFETY: a pointer and length of a live buffer.
        Status::check(unsafe { proxy_enqueue_shared_queue(queue_id, value.as_ptr(), value.len()) })
    }

    fn dequeue_shared_queue(&self, queue_id: u32) -> Result<Option<Vec<u8>>, Status> {
        returned_buffer(|data, size| {
            // SAFETY: out-pointers to live locals.
            unsafe { proxy_dequeue_shared_queue(queue_id, data, size) }
        })
    }

    fn set_tick_period_ms(&self, _root_context_id: u32, period_ms: u32) -> Result<(), Status> {
        // SAFETY: no pointers.
        Status::check(unsafe { proxy_set_tick_period_milliseconds(period_ms) })
    }

    fn define_counter(&self, name: &str) -> Result<u32, Status> {
        let mut id: u32 = 0;
        // SAFETY: a live string and an out-pointer to a live local.
        Status::check(unsafe {
            proxy_define_metric(METRIC_COUNTER, name.as_ptr(), name.len(), &mut id)
        })?;
        Ok(id)
    }

    fn increment_metric(&self, metric_id: u32, by: i64) -> Result<(), Status> {
        // SAFETY: no pointers.
        Status::check(unsafe { proxy_increment_metric(metric_id, by) })
    }
}

thread_local! {
    static DISPATCHER: RefCell<Dispatcher> =
        RefCell::new(Dispatcher::new(Rc::new(Portable::new(EnvoyHost))));
    /// Events that arrived while the dispatcher was busy (Envoy calling back into the VM
    /// from inside a host call): carried out when the outer callback returns.
    static DEFERRED: RefCell<VecDeque<Event>> = const { RefCell::new(VecDeque::new()) };
}

/// Hands `event` to the dispatcher, or, if it is busy, defers it and answers `busy`.
fn dispatch<T>(event: Event, busy: T, answer: impl FnOnce(&mut Dispatcher, Event) -> T) -> T {
    DISPATCHER.with(|cell| {
        let Ok(mut dispatcher) = cell.try_borrow_mut() else {
            DEFERRED.with(|deferred| {
                if let Ok(mut deferred) = deferred.try_borrow_mut() {
                    deferred.push_back(event);
                }
            });
            return busy;
        };
        let answered = answer(&mut dispatcher, event);
        while let Some(event) = DEFERRED.with(|d| d.try_borrow_mut().ok()?.pop_front()) {
            dispatcher.handle(event);
        }
        answered
    })
}

fn handle(event: Event) {
    dispatch(event, (), |dispatcher, event| dispatcher.handle(event));
}

fn flag(value: u32) -> bool {
    value != 0
}

#[cfg(target_os = "wasi")]
extern "C" {
    fn __wasm_call_ctors();
}

/// The module's initialiser (a WASI reactor's `_initialize`).
#[no_mangle]
pub extern "C" fn _initialize() {
    #[cfg(target_os = "wasi")]
    // SAFETY: run once by the host before any other export, as WASI reactors expect.
    unsafe {
        __wasm_call_ctors();
    }
    // Nothing in the filter panics (lints deny it, and no panicking SDK is linked); should
    // something in a dependency do so anyway, Envoy's log says what before the VM traps.
    std::panic::set_hook(Box::new(|info| {
        EnvoyHost.log(LogLevel::Critical, &format!("sluice: panicked: {info}"));
    }));
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// Memory Envoy fills with what it returns to the filter (see [`take_buffer`]).
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let buffer = vec![0u8; size].into_boxed_slice();
    Box::into_raw(buffer).cast::<u8>()
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(context_id: u32, root_context_id: u32) {
    handle(Event::Create {
        context_id,
        root_context_id,
    });
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_context_id: u32, _vm_configuration_size: usize) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(context_id: u32, _plugin_configuration_size: usize) -> u32 {
    dispatch(Event::Configure { context_id }, 0, |dispatcher, _| {
        u32::from(dispatcher.configure(context_id))
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(context_id: u32) {
    handle(Event::Tick { context_id });
}

#[no_mangle]
pub extern "C" fn proxy_on_queue_ready(context_id: u32, queue_id: u32) {
    handle(Event::QueueReady {
        context_id,
        queue_id,
    });
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(
    context_id: u32,
    _num_headers: usize,
    end_of_stream: u32,
) -> u32 {
    let event = Event::RequestHeaders {
        context_id,
        end_of_stream: flag(end_of_stream),
    };
    dispatch(event, 0, |dispatcher, event| {
        dispatcher.stream_event(event) as u32
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(
    context_id: u32,
    _num_headers: usize,
    end_of_stream: u32,
) -> u32 {
    let event = Event::ResponseHeaders {
        context_id,
        end_of_stream: flag(end_of_stream),
    };
    dispatch(event, 0, |dispatcher, event| {
        dispatcher.stream_event(event) as u32
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_response_body(context_id: u32, body_size: usize, end: u32) -> u32 {
    if !crate::usage::any_body_meter() {
        return 0;
    }
    let event = Event::ResponseBody {
        context_id,
        body_size,
        end_of_stream: flag(end),
    };
    dispatch(event, 0, |dispatcher, event| {
        dispatcher.stream_event(event) as u32
    })
}

/// Trailers end a body whose last piece did not say it was the last.
#[no_mangle]
pub extern "C" fn proxy_on_response_trailers(context_id: u32, _num_trailers: usize) -> u32 {
    if crate::usage::any_body_meter() {
        dispatch(
            Event::ResponseTrailers { context_id },
            0,
            |dispatcher, event| dispatcher.stream_event(event) as u32,
        )
    } else {
        0
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_http_call_response(
    context_id: u32,
    token: u32,
    _num_headers: usize,
    body_size: usize,
    _num_trailers: usize,
) {
    handle(Event::CallResponse {
        context_id,
        token,
        body_size,
    });
}

#[no_mangle]
pub extern "C" fn proxy_on_log(context_id: u32) {
    handle(Event::Log { context_id });
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    handle(Event::Delete { context_id });
}

/// Only a request waiting for its body (see `usage::BodyWait`) has anything to do here:
/// any other answers at once. If the filter is busy (Envoy called back into it), a waiting
/// request holds its body (1, stop and buffer) and is checked when the filter is free.
#[no_mangle]
pub extern "C" fn proxy_on_request_body(context_id: u32, body_size: usize, end: u32) -> u32 {
    if !crate::usage::waits_for_body(context_id) {
        return 0;
    }
    let event = Event::RequestBody {
        context_id,
        body_size,
        end_of_stream: flag(end),
    };
    dispatch(event, 1, |dispatcher, event| {
        dispatcher.stream_event(event) as u32
    })
}

/// Trailers end a body whose last piece did not say it was the last.
#[no_mangle]
pub extern "C" fn proxy_on_request_trailers(context_id: u32, _num_trailers: usize) -> u32 {
    if !crate::usage::waits_for_body(context_id) {
        return 0;
    }
    dispatch(
        Event::RequestTrailers { context_id },
        1,
        |dispatcher, event| dispatcher.stream_event(event) as u32,
    )
}

// Callbacks the filter has nothing to do in, exported because a host may call them
// unchecked (see the module's notes). Each answers at once.

/// 1: the context is done now (with 0 Envoy would hold it until `proxy_done`).
#[no_mangle]
pub extern "C" fn proxy_on_done(_context_id: u32) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_foreign_function(_context_id: u32, _function_id: u32, _size: usize) {}
