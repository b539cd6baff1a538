//! Control and head messages, sent as JSON text frames.

use serde::{Deserialize, Serialize};

use crate::HeaderList;

/// Why a text frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The frame is larger than [`MAX_CONTROL_LEN`](crate::MAX_CONTROL_LEN).
    #[error("control message of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The frame is not a valid control message.
    #[error("malformed control message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// HTTP version of the caller's request, as the local app should see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HttpVersion {
    /// HTTP/1.0
    #[serde(rename = "HTTP/1.0")]
    Http10,
    /// HTTP/1.1
    #[serde(rename = "HTTP/1.1")]
    Http11,
    /// HTTP/2
    #[serde(rename = "HTTP/2")]
    Http2,
    /// HTTP/3
    #[serde(rename = "HTTP/3")]
    Http3,
}

/// The head of a request the relay received, sent to the client to forward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHead {
    /// Stream carrying this exchange.
    pub stream: u32,
    /// Method, exactly as received (`POST`, `PROPFIND`, …).
    pub method: String,
    /// Path and query below the session, exactly as received: `/a/b?x=1`, `?x=1`, or empty
    /// for the session's bare URL. The client puts it below its target's path prefix.
    pub target: String,
    /// The caller's HTTP version.
    pub version: HttpVersion,
    /// Request headers, hop-by-hop ones removed and `X-Forwarded-*` added by the relay.
    pub headers: HeaderList,
    /// Whether a body follows as data frames. When false the request has no body at all.
    #[serde(default)]
    pub has_body: bool,
    /// The relay's record of this request, when it keeps one: its id (the same on every
    /// delivery attempt, so the client can refuse to hand one id to the app twice), when it
    /// arrived and which attempt this is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
}

/// Which recorded request a [`RequestHead`] delivers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The request's id at the relay (sortable, unique).
    pub id: String,
    /// When the relay received it, in Unix milliseconds.
    pub received_at_ms: i64,
    /// Delivery attempt, 1 for the first.
    pub attempt: u32,
    /// Whether it waited in the offline queue (or is a retry or replay) rather than being
    /// passed straight through.
    #[serde(default)]
    pub queued: bool,
}

/// What the relay does with requests while no client is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OfflinePolicy {
    /// Record them durably, answer `202`, deliver them when the client is back (the default).
    #[default]
    Queue,
    /// Answer `503` with `Retry-After`, so providers that retry will retry.
    Reject,
}

/// How the relay answers a session's callers; stored with the session.
///
/// Providers give a webhook 2–10 s (Slack 3 s, Shopify 5 s, GitHub 10 s), so the choice is the
/// user's, per session.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum RespondPolicy {
    /// The local app's real response, streamed back (offline: the offline policy applies).
    #[default]
    Pass,
    /// The relay answers every request at once and delivers it through the queue.
    Now {
        /// Status to answer with; `None` means `202`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<u16>,
        /// Body to answer with; `None` means `{"queued":true,"id":...}`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<String>,
    },
    /// The real response if the local app answers within `millis`; otherwise the relay answers
    /// `202` at the deadline and the exchange carries on, its result recorded.
    Deadline {
        /// The deadline in milliseconds.
        millis: u64,
    },
}

/// The head of the local app's response, sent by the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseHead {
    /// Stream carrying this exchange.
    pub stream: u32,
    /// Status code, 100–999.
    pub status: u16,
    /// Response headers, hop-by-hop ones removed.
    pub headers: HeaderList,
    /// Whether a body follows as data frames.
    #[serde(default)]
    pub has_body: bool,
}

/// Resume an earlier session (random ids included) after a reconnect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The session id from [`Control::Welcome`].
    pub session: String,
    /// The secret from [`Control::Welcome`].
    pub secret: String,
}

/// A hello's request to carry requests of a live session on this connection too.
///
/// A relay that serves connections on several threads carries each caller's request through a
/// connection served by the caller's own thread when the session has one (a *lane*), so that
/// the threads work side by side instead of handing every request to one of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneJoin {
    /// The session id from [`Control::Welcome`].
    pub session: String,
    /// The `lane_key` from the same welcome.
    pub key: String,
}

/// Machine-readable reason carried by [`Control::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The requested session name is not valid.
    InvalidName,
    /// The requested name belongs to another token.
    NameTaken,
    /// The resume secret did not match, or the session is gone.
    ResumeFailed,
    /// A newer connection of the same owner took this session over.
    TakenOver,
    /// The peer broke the protocol.
    ProtocolError,
    /// The relay is shutting down.
    ShuttingDown,
    /// The relay has no room for another session.
    Overloaded,
    /// A lane landed on a relay thread that already serves the session: try another
    /// connection (it may land on another thread).
    LaneTaken,
    /// A lane's key does not match the session's live connection (it ended, or never was).
    LaneRefused,
    /// A code this build does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

/// A message sent as a JSON text frame. Tagged by `"type"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// Client → relay, first message: which session to open or resume.
    Hello {
        /// [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION) of the client.
        version: u32,
        /// Client software and version, for logs (`ferry/0.1.0`).
        agent: String,
        /// A session name to claim (or take back).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// A random session to resume.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<Resume>,
        /// What to do with requests while this client is away; stored with the session.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offline: Option<OfflinePolicy>,
        /// How the relay answers callers; stored with the session. `None` keeps `pass`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        respond: Option<RespondPolicy>,
        /// The client's receive window per stream (see [`flow`](crate::flow)); absent means
        /// [`DEFAULT_WINDOW`](crate::flow::DEFAULT_WINDOW).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        window: Option<u32>,
        /// Whether the client reads heads and window updates in binary form
        /// ([`binary`](crate::binary)) and would like them so; absent means JSON only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary_control: Option<bool>,
        /// Whether the client opens extra lanes when asked ([`Control::OpenLane`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lanes: Option<bool>,
        /// Join this connection, as an extra lane, to a session already live on another one;
        /// then `name`, `resume`, `offline` and `respond` are ignored.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lane: Option<LaneJoin>,
    },
    /// Relay → client, answer to `Hello`: the session is live.
    Welcome {
        /// Session id: the name asked for, or a random id.
        session: String,
        /// Public URL of the session.
        url: String,
        /// Secret to resume this session after a reconnect.
        resume_secret: String,
        /// Relay software and version, for logs.
        agent: String,
        /// The relay's receive window per stream (see [`flow`](crate::flow)); absent means
        /// [`DEFAULT_WINDOW`](crate::flow::DEFAULT_WINDOW).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        window: Option<u32>,
        /// Whether both sides send heads and window updates in binary form from now on: the
        /// relay's yes to the client's `binary_control` (absent: JSON only, both ways).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary_control: Option<bool>,
        /// The key that joins extra lanes to this connection ([`LaneJoin`]): sent when the
        /// client offered `lanes` and the relay serves connections on more than one thread.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lane_key: Option<String>,
    },
    /// Relay → client: a request to forward.
    RequestHead(RequestHead),
    /// Client → relay: the local app's response head.
    ResponseHead(ResponseHead),
    /// Either way: `increment` more units of credit on `stream` (see [`flow`](crate::flow)).
    Window {
        /// Stream the credit is for.
        stream: u32,
        /// Units granted.
        increment: u32,
    },
    /// Either way: abort one stream; the others carry on.
    Cancel {
        /// Stream to abort.
        stream: u32,
        /// Why, for logs and error pages.
        reason: String,
    },
    /// Relay → client: callers are arriving on a relay thread that has no connection of this
    /// session; please open one more lane (see [`LaneJoin`]). Sent only to a client whose hello
    /// said `lanes`, at most once per relay thread and connection.
    OpenLane {},
    /// Either way: a connection-level error; the sender closes the connection after it.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// A sentence a person can act on.
        message: String,
    },
}

impl Control {
    /// Encodes the message as JSON text.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("control messages always serialize")
    }

    /// Decodes a JSON text frame.
    pub fn decode(text: &str) -> Result<Control, ControlError> {
        if text.len() > crate::MAX_CONTROL_LEN {
            return Err(ControlError::TooLarge(text.len()));
        }
        if let Some(fast) = Self::decode_hot(text) {
            return fast;
        }
        Ok(serde_json::from_str(text)?)
    }

    /// The messages sent per request, as [`Control::encode`] writes them (`"type"` first), are
    /// parsed straight into their struct: a tagged enum would first buffer the whole message
    /// into a tree. Returns `None` for anything else, which takes the general path.
    fn decode_hot(text: &str) -> Option<Result<Control, ControlError>> {
        #[derive(Deserialize)]
        struct Window {
            stream: u32,
            increment: u32,
        }
        let rest = text.strip_prefix(r#"{"type":""#)?;
        let (kind, _) = rest.split_once('"')?;
        let parsed = match kind {
            "request_head" => serde_json::from_str(text).map(Control::RequestHead),
            "response_head" => serde_json::from_str(text).map(Control::ResponseHead),
            "window" => serde_json::from_str(text).map(|w: Window| Control::Window {
                stream: w.stream,
                increment: w.increment,
            }),
            _ => return None,
        };
        Some(parsed.map_err(ControlError::from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn handshakes_of_builds_before_window_negotiation_still_decode() {
        let hello = Control::decode(r#"{"type":"hello","version":1,"agent":"ferry/0.1.0"}"#);
        assert!(
            matches!(
                hello,
                Ok(Control::Hello {
                    window: None,
                    binary_control: None,
                    ..
                })
            ),
            "{hello:?}"
        );
        let welcome = Control::decode(
            r#"{"type":"welcome","session":"s","url":"u","resume_secret":"r","agent":"a"}"#,
        );
        assert!(
            matches!(
                welcome,
                Ok(Control::Welcome {
                    window: None,
                    binary_control: None,
                    ..
                })
            ),
            "{welcome:?}"
        );
        let current = Control::Welcome {
            session: "s".into(),
            url: "u".into(),
            resume_secret: "r".into(),
            agent: "a".into(),
            window: Some(crate::flow::STREAM_WINDOW),
            binary_control: None,
            lane_key: None,
        };
        assert!(current.encode().contains(r#""window":1048576"#));
    }

    #[test]
    fn wire_shape_is_stable() {
        let msg = Control::Window {
            stream: 7,
            increment: 1024,
        };
        assert_eq!(
            msg.encode(),
            r#"{"type":"window","stream":7,"increment":1024}"#
        );
        let head = Control::RequestHead(RequestHead {
            stream: 1,
            method: "POST".into(),
            target: "/a/b?x=1".into(),
            version: HttpVersion::Http11,
            headers: [("x-a", "1")].into_iter().collect(),
            has_body: true,
            delivery: None,
        });
        assert_eq!(
            head.encode(),
            r#"{"type":"request_head","stream":1,"method":"POST","target":"/a/b?x=1","version":"HTTP/1.1","headers":[["x-a","1"]],"has_body":true}"#
        );
    }

    #[test]
    fn unknown_fields_and_codes_are_tolerated() {
        let msg =
            Control::decode(r#"{"type":"error","code":"from_the_future","message":"m","extra":1}"#)
                .unwrap();
        assert_eq!(
            msg,
            Control::Error {
                code: ErrorCode::Unknown,
                message: "m".into()
            }
        );
    }

    #[test]
    fn malformed_is_an_error() {
        for bad in [
            "",
            "{",
            "null",
            r#"{"type":"nope"}"#,
            r#"{"type":"window","stream":-1,"increment":1}"#,
            r#"{"type":"window","stream":1}"#,
            r#"{"type":"response_head","stream":1,"status":70000,"headers":[]}"#,
        ] {
            assert!(Control::decode(bad).is_err(), "{bad}");
        }
        let huge = format!(
            r#"{{"type":"cancel","stream":1,"reason":"{}"}}"#,
            "x".repeat(crate::MAX_CONTROL_LEN)
        );
        assert!(matches!(
            Control::decode(&huge),
            Err(ControlError::TooLarge(_))
        ));
    }

    fn arb_headers() -> impl Strategy<Value = HeaderList> {
        crate::headers::arb_headers("[a-z-]{1,12}")
    }

    fn arb_control() -> impl Strategy<Value = Control> {
        prop_oneof![
            (
                any::<u32>(),
                ".*",
                proptest::option::of("[a-z0-9-]{3,20}"),
                proptest::option::of((".*", ".*"))
            )
                .prop_map(
                    |(version, agent, name, resume): (_, _, _, Option<(String, String)>)| {
                        Control::Hello {
                            version,
                            agent,
                            name,
                            resume: resume
                                .clone()
                                .map(|(session, secret)| Resume { session, secret }),
                            offline: Some(OfflinePolicy::Reject),
                            respond: Some(RespondPolicy::Now {
                                status: Some(200),
                                body: Some("{}".into()),
                            }),
                            window: Some(crate::flow::STREAM_WINDOW),
                            binary_control: Some(true),
                            lanes: Some(true),
                            lane: resume.as_ref().map(|(session, key)| LaneJoin {
                                session: session.clone(),
                                key: key.clone(),
                            }),
                        }
                    }
                ),
            (
                ".*",
                ".*",
                ".*",
                ".*",
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<bool>()),
                proptest::option::of(".*")
            )
                .prop_map(
                    |(session, url, resume_secret, agent, window, binary_control, lane_key)| {
                        Control::Welcome {
                            session,
                            url,
                            resume_secret,
                            agent,
                            window,
                            binary_control,
                            lane_key,
                        }
                    }
                ),
            Just(Control::OpenLane {}),
            (
                any::<u32>(),
                "[A-Z]{1,10}",
                "/.*",
                arb_headers(),
                any::<bool>()
            )
                .prop_map(|(stream, method, target, headers, has_body)| {
                    Control::RequestHead(RequestHead {
                        stream,
                        method,
                        target,
                        version: HttpVersion::Http2,
                        headers,
                        has_body,
                        delivery: has_body.then(|| Delivery {
                            id: "01JABCDEFGHJKMNPQRSTVWXYZ0".into(),
                            received_at_ms: 1_700_000_000_000,
                            attempt: 2,
                            queued: true,
                        }),
                    })
                }),
            (any::<u32>(), 100u16..1000, arb_headers(), any::<bool>()).prop_map(
                |(stream, status, headers, has_body)| Control::ResponseHead(ResponseHead {
                    stream,
                    status,
                    headers,
                    has_body,
                })
            ),
            (any::<u32>(), any::<u32>())
                .prop_map(|(stream, increment)| Control::Window { stream, increment }),
            (any::<u32>(), ".*").prop_map(|(stream, reason)| Control::Cancel { stream, reason }),
            ".*".prop_map(|message| Control::Error {
                code: ErrorCode::NameTaken,
                message
            }),
        ]
    }

    proptest! {
        #[test]
        fn round_trips(msg in arb_control()) {
            prop_assert_eq!(Control::decode(&msg.encode()).unwrap(), msg);
        }

        #[test]
        fn never_panics_on_garbage(text in ".*") {
            let _ = Control::decode(&text);
        }

        #[test]
        fn never_panics_on_mutated_messages(msg in arb_control(), cut in any::<usize>(), byte in any::<u8>()) {
            let mut text = msg.encode().into_bytes();
            if !text.is_empty() {
                let at = cut % text.len();
                text[at] = byte;
            }
            if let Ok(text) = std::str::from_utf8(&text) {
                let _ = Control::decode(text);
            }
        }
    }
}
