//! Server-Sent Events from a hub: each event encoded once, with the id the
//! hub assigns in its `id:` line, and the `Last-Event-ID` a reconnecting
//! client sends.
//!
//! ```
//! use tower_backpressure::Hub;
//! use tower_backpressure::hub::sse;
//!
//! let hub: Hub = Hub::default();
//! assert_eq!(hub.publish_sse("hello"), 0);
//! // A named event, encoded under the id the hub assigns:
//! let id = hub.publish_with(|id| sse::frame(id, Some("tick"), "{\"n\":1}"));
//! assert_eq!(id, 1);
//!
//! let req = http::Request::get("/events")
//!     .header("last-event-id", " 0 ")
//!     .body(())
//!     .unwrap();
//! assert_eq!(sse::last_event_id(&req), Some(0));
//! let resumed = hub.subscribe_after(sse::last_event_id(&req).unwrap()); // replays event 1
//! # let _ = resumed;
//! ```
//!
//! Every subscriber is handed the same `Bytes` (a reference count), never a
//! copy.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, Request};

use super::Hub;
use crate::buffer::Weigher;

/// The name of the header a reconnecting SSE client sends.
pub const LAST_EVENT_ID: &str = "last-event-id";

/// Encodes one SSE event: an `id:` line with `id`, an `event:` line if
/// `event` is given, one `data:` line per line of `data` (split at `\n`,
/// `\r\n` and `\r`), and the blank line that ends the event.
///
/// ```
/// use tower_backpressure::hub::sse;
///
/// assert_eq!(sse::frame(7, None, "hi"), "id: 7\ndata: hi\n\n");
/// assert_eq!(
///     sse::frame(8, Some("tick"), "a\nb"),
///     "id: 8\nevent: tick\ndata: a\ndata: b\n\n"
/// );
/// ```
///
/// # Panics
///
/// If `event` contains a line break (it would end the field).
pub fn frame(id: u64, event: Option<&str>, data: &str) -> Bytes {
    // One buffer, written once: the id line, then the fields.
    let mut out = BytesMut::with_capacity(data.len() + event.map_or(0, str::len) + 40);
    put_id(&mut out, id);
    put_fields(&mut out, event, data);
    out.freeze()
}

/// The fields after `id:`.
fn fields(event: Option<&str>, data: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(data.len() + 16);
    put_fields(&mut out, event, data);
    out
}

/// `id: <id>\n`, the number written without `fmt`.
fn put_id(out: &mut BytesMut, id: u64) {
    let mut digits = [0u8; 20];
    let mut n = id;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put_slice(b"id: ");
    out.put_slice(&digits[i..]);
    out.put_u8(b'\n');
}

/// Appends the fields after `id:`: the event name, the data lines, the
/// blank line.
fn put_fields(out: &mut BytesMut, event: Option<&str>, data: &str) {
    if let Some(event) = event {
        assert!(
            !event.contains(['\r', '\n']),
            "an SSE event name cannot contain a line break: {event:?}"
        );
        out.put_slice(b"event: ");
        out.put_slice(event.as_bytes());
        out.put_u8(b'\n');
    }
    let mut rest = data;
    loop {
        let end = rest.find(['\r', '\n']).unwrap_or(rest.len());
        out.put_slice(b"data: ");
        out.put_slice(&rest.as_bytes()[..end]);
        out.put_u8(b'\n');
        if end == rest.len() {
            break;
        }
        let skip = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
    }
    out.put_u8(b'\n');
}

/// `id: <id>\n` followed by `fields`.
fn with_id(id: u64, fields: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(fields.len() + 25);
    put_id(&mut out, id);
    out.put_slice(fields);
    out.freeze()
}

/// The `Last-Event-ID` of a request: see [`last_event_id_from`].
pub fn last_event_id<B>(req: &Request<B>) -> Option<u64> {
    last_event_id_from(req.headers())
}

/// The `Last-Event-ID` header as an id: decimal digits, with any whitespace
/// around them; `None` if it is missing, empty, not a number or past
/// `u64::MAX`.
///
/// ```
/// use http::{HeaderMap, HeaderValue};
/// use tower_backpressure::hub::sse::last_event_id_from;
///
/// let mut headers = HeaderMap::new();
/// assert_eq!(last_event_id_from(&headers), None);
/// headers.insert("last-event-id", HeaderValue::from_static("\t42 "));
/// assert_eq!(last_event_id_from(&headers), Some(42));
/// headers.insert("last-event-id", HeaderValue::from_static("4x2"));
/// assert_eq!(last_event_id_from(&headers), None);
/// ```
pub fn last_event_id_from(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(LAST_EVENT_ID)?.as_bytes().trim_ascii();
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

impl<W: Weigher<Bytes>> Hub<Bytes, W> {
    /// Publishes `data` as an SSE event with the next id in its `id:` line
    /// (see [`frame`]), and returns the id. The event is encoded once, for
    /// every subscriber; only the `id:` line is written under the hub's
    /// lock.
    pub fn publish_sse(&self, data: &str) -> u64 {
        let fields = fields(None, data);
        self.publish_with(|id| with_id(id, &fields))
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn ids_are_written_as_decimal_numbers() {
        for id in [0, 9, 10, 99, 100, 12_345, u64::MAX / 10, u64::MAX] {
            assert_eq!(frame(id, None, "x"), format!("id: {id}\ndata: x\n\n"));
            assert_eq!(
                with_id(id, b"data: x\n\n"),
                format!("id: {id}\ndata: x\n\n")
            );
        }
    }

    #[test]
    fn frames_split_data_lines() {
        assert_eq!(frame(0, None, ""), "id: 0\ndata: \n\n");
        assert_eq!(
            frame(u64::MAX - 1, None, "a\r\nb\rc\n"),
            "id: 18446744073709551614\ndata: a\ndata: b\ndata: c\ndata: \n\n"
        );
    }

    #[test]
    #[should_panic(expected = "an SSE event name cannot contain a line break")]
    fn event_names_cannot_break_lines() {
        let _ = frame(0, Some("a\nb"), "");
    }

    #[test]
    fn sse_frames_carry_the_hubs_id() {
        let hub: Hub = Hub::default();
        hub.publish_with_id(41, Bytes::from("x")).unwrap();
        assert_eq!(hub.publish_sse("hello"), 42);
        let id = hub.publish_with(|id| frame(id, Some("e"), "d"));
        assert_eq!(id, 43);
        let mut items = Vec::new();
        let mut cursor = super::super::log::Cursor::START;
        hub.shared()
            .lock()
            .read(&mut cursor, 10, |_, e| items.push(e.item.clone()));
        assert_eq!(
            items,
            [
                "x",
                "id: 42\ndata: hello\n\n",
                "id: 43\nevent: e\ndata: d\n\n"
            ]
        );
    }

    #[test]
    fn last_event_id_parsing() {
        let parse = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(LAST_EVENT_ID, HeaderValue::from_static(v));
            last_event_id_from(&h)
        };
        assert_eq!(parse("7"), Some(7));
        assert_eq!(parse("  7\t"), Some(7));
        assert_eq!(parse("007"), Some(7));
        assert_eq!(parse("18446744073709551615"), Some(u64::MAX));
        for garbage in [
            "",
            "  ",
            "-1",
            "+1",
            "1 2",
            "0x10",
            "abc",
            "18446744073709551616",
        ] {
            assert_eq!(parse(garbage), None, "{garbage:?}");
        }
        let req = Request::get("/")
            .header("Last-Event-ID", "12")
            .body(())
            .unwrap();
        assert_eq!(last_event_id(&req), Some(12));
        assert_eq!(last_event_id(&Request::new(())), None);
    }
}
