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
        /// How callers are answered (`--respond-now`, `--deadline`), in words.
        answers: String,
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
    /// The relay's id of this request, when the relay records requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_id: Option<String>,
    /// How long ago the relay received it, in ms (a queued request may be minutes old).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_ms: Option<u64>,
    /// The relay's delivery attempt (1 for the first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The id had already been delivered: the app was not called again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// Deliveries older than this fail the signature check of Stripe, Slack and Standard Webhooks.
pub const SIGNATURE_TOLERANCE_MS: u64 = 5 * 60 * 1000;

impl RequestEvent {
    /// A fresh event for a request.
    pub fn new(id: u64, method: &str, path: &str) -> Self {
        RequestEvent {
            id,
            method: method.to_owned(),
            path: path.to_owned(),
            status: 0,
            duration_ms: 0.0,
            request_bytes: 0,
            response_bytes: 0,
            error: None,
            delivery_id: None,
            age_ms: None,
            attempt: None,
            duplicate: false,
        }
    }

    /// The warning to show for a delivery older than the providers' signature tolerance.
    pub fn late_warning(&self) -> Option<String> {
        let age = self.age_ms.filter(|age| *age > SIGNATURE_TOLERANCE_MS)?;
        Some(format!(
            "delivered {} late: Stripe/Slack/Standard Webhooks signatures older than 5 min fail verification",
            short_age(age)
        ))
    }
}

/// `7m`, `2h05m`, `3d4h`: an age for people.
fn short_age(ms: u64) -> String {
    let minutes = ms / 60_000;
    if minutes < 60 {
        format!("{minutes}m")
    } else if minutes < 24 * 60 {
        format!("{}h{:02}m", minutes / 60, minutes % 60)
    } else {
        format!("{}d{}h", minutes / (24 * 60), (minutes / 60) % 24)
    }
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
        Event::Ready {
            url,
            target,
            answers,
            ..
        } => format!(
            "\nferry                  online\nForwarding             {url} -> {target}\nAnswers                {answers}\n(Ctrl+C to quit)\n"
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
            if r.duplicate {
                line.push_str("  duplicate: delivery ");
                line.push_str(r.delivery_id.as_deref().unwrap_or("?"));
                line.push_str(" was already handed to the app; not passed again");
            }
            if let Some(error) = &r.error {
                line.push_str("  ");
                line.push_str(error);
            }
            if let Some(warning) = r.late_warning() {
                line.push_str("  ⚠ ");
                line.push_str(&warning);
            }
            line
        }
    }
}

/// How callers of a session are answered, in words, for the banner.
pub fn describe_answers(
    respond: Option<&ferry_protocol::RespondPolicy>,
    offline: Option<ferry_protocol::OfflinePolicy>,
) -> String {
    use ferry_protocol::{OfflinePolicy, RespondPolicy};
    let away = match offline {
        Some(OfflinePolicy::Reject) => "503",
        _ => "queued, 202",
    };
    match respond {
        None | Some(RespondPolicy::Pass) => {
            format!("the app's response (while this client is away: {away})")
        }
        Some(RespondPolicy::Now { status, .. }) => format!(
            "at once with {} (--respond-now); requests reach the app through the queue",
            status.unwrap_or(202)
        ),
        Some(RespondPolicy::Deadline { millis }) => format!(
            "the app's response, or 202 after {}s (--deadline; while this client is away: {away})",
            *millis as f64 / 1000.0
        ),
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
            answers: "the app's response".into(),
        };
        let (line, stderr) = console.render(&ready).unwrap();
        assert!(!stderr);
        assert_eq!(
            line,
            r#"{"event":"ready","url":"http://r/s","session":"s","target":"http://localhost:3000","answers":"the app's response"}"#
        );
        let mut event = RequestEvent::new(1, "POST", "/x");
        event.status = 200;
        event.duration_ms = 1.5;
        event.request_bytes = 3;
        event.response_bytes = 4;
        let (line, _) = console.render(&Event::Request(event.clone())).unwrap();
        assert_eq!(
            line,
            r#"{"event":"request","id":1,"method":"POST","path":"/x","status":200,"duration_ms":1.5,"request_bytes":3,"response_bytes":4}"#
        );
        event.delivery_id = Some("01J".into());
        event.age_ms = Some(7 * 60 * 1000 + 5);
        event.attempt = Some(2);
        event.duplicate = true;
        let (line, _) = console.render(&Event::Request(event.clone())).unwrap();
        assert_eq!(
            line,
            r#"{"event":"request","id":1,"method":"POST","path":"/x","status":200,"duration_ms":1.5,"request_bytes":3,"response_bytes":4,"delivery_id":"01J","age_ms":420005,"attempt":2,"duplicate":true}"#
        );
        let (line, _) = Console::new(false).render(&Event::Request(event)).unwrap();
        assert!(line.contains("delivered 7m late: Stripe/Slack/Standard Webhooks signatures older than 5 min fail verification"), "{line}");
        assert!(line.contains("duplicate"), "{line}");
    }
}
