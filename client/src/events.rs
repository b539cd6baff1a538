//! What the client reports: connection state and one event per forwarded request.

use std::time::Duration;

use serde::Serialize;

/// Something the console (or a test) should know about.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The tunnel is up for the first time: the public URL is live.
    Ready {
        /// Public URL of the session.
        url: String,
        /// Session id.
        session: String,
        /// Where requests go.
        target: String,
    },
    /// Trying to reach the relay.
    Connecting {
        /// Attempt number since the last successful connection (1 = first).
        attempt: u32,
        /// Relay URL.
        relay: String,
    },
    /// Connected again after a drop; same URL.
    Online {
        /// Public URL of the session.
        url: String,
    },
    /// The connection failed or dropped; retrying after `retry_in_ms`.
    Reconnecting {
        /// Failed attempts so far.
        attempt: u32,
        /// Why.
        reason: String,
        /// Delay before the next attempt.
        retry_in_ms: u64,
    },
    /// One request was forwarded (or failed to be).
    Request(RequestEvent),
}

/// One completed exchange.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestEvent {
    /// Client-local id, unique for this process.
    pub id: u64,
    /// HTTP method.
    pub method: String,
    /// Path and query as sent to the local app.
    pub path: String,
    /// Status returned to the caller.
    pub status: u16,
    /// Time from receiving the head to the end of the response.
    pub duration_ms: f64,
    /// Request body bytes forwarded.
    pub request_bytes: u64,
    /// Response body bytes returned.
    pub response_bytes: u64,
    /// What went wrong, if the local app could not answer properly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Milliseconds with microsecond precision.
pub(crate) fn millis(duration: Duration) -> f64 {
    (duration.as_micros() as f64) / 1000.0
}

/// Renders events for a person or as JSON lines.
pub struct Console {
    json: bool,
    announced: bool,
}

impl Console {
    /// A console printing JSON lines (`json`) or human lines.
    pub fn new(json: bool) -> Self {
        Console {
            json,
            announced: false,
        }
    }

    /// The text to print for `event`: `(line, to_stderr)`; `None` prints nothing.
    pub fn render(&mut self, event: &Event) -> Option<(String, bool)> {
        if self.json {
            // Until the tunnel is up, stdout stays clean so that its first line is `ready`.
            if !self.announced && !matches!(event, Event::Ready { .. }) {
                return Some((human(event), true));
            }
            if matches!(event, Event::Ready { .. }) {
                self.announced = true;
            }
            return Some((serde_json::to_string(event).ok()?, false));
        }
        Some((human(event), false))
    }
}

fn human(event: &Event) -> String {
    match event {
        Event::Ready { url, target, .. } => format!(
            "\nferry                  online\nForwarding             {url} -> {target}\n(Ctrl+C to quit)\n"
        ),
        Event::Connecting { attempt, relay } => {
            format!("● connecting to {relay} (attempt {attempt})")
        }
        Event::Online { url } => format!("● online again: {url}"),
        Event::Reconnecting {
            attempt,
            reason,
            retry_in_ms,
        } => format!(
            "● reconnecting (attempt {attempt}): {reason}; retrying in {:.1}s",
            *retry_in_ms as f64 / 1000.0
        ),
        Event::Request(r) => {
            let time = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
            let clock = time.get(11..19).unwrap_or(&time).to_owned();
            let mut line = format!(
                "{clock}  {:<7} {:<40} {:>3}  {:>8.1} ms",
                r.method, r.path, r.status, r.duration_ms
            );
            if let Some(error) = &r.error {
                line.push_str("  ");
                line.push_str(error);
            }
            line
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_starts_with_ready() {
        let mut console = Console::new(true);
        let connecting = Event::Connecting {
            attempt: 1,
            relay: "http://r".into(),
        };
        assert!(
            console.render(&connecting).unwrap().1,
            "before ready: stderr"
        );
        let ready = Event::Ready {
            url: "http://r/s".into(),
            session: "s".into(),
            target: "http://localhost:3000".into(),
        };
        let (line, stderr) = console.render(&ready).unwrap();
        assert!(!stderr);
        assert_eq!(
            line,
            r#"{"event":"ready","url":"http://r/s","session":"s","target":"http://localhost:3000"}"#
        );
        let request = Event::Request(RequestEvent {
            id: 1,
            method: "POST".into(),
            path: "/x".into(),
            status: 200,
            duration_ms: 1.5,
            request_bytes: 3,
            response_bytes: 4,
            error: None,
        });
        let (line, _) = console.render(&request).unwrap();
        assert_eq!(
            line,
            r#"{"event":"request","id":1,"method":"POST","path":"/x","status":200,"duration_ms":1.5,"request_bytes":3,"response_bytes":4}"#
        );
    }
}
