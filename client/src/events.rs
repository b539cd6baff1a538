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

    /// Appends the line for `event`, newline included, to `stdout`; or returns it when it
    /// belongs on stderr. Lines are written straight into the caller's buffer, so a printer
    /// that keeps one buffer allocates nothing per line (finding 38).
    pub fn render_into(&mut self, event: &Event, stdout: &mut Vec<u8>) -> Option<String> {
        if self.json {
            // Until the tunnel is up, stdout stays clean so that its first line is `ready`.
            if !self.announced && !matches!(event, Event::Ready { .. }) {
                let mut line = Vec::new();
                human(event, &mut line);
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            if matches!(event, Event::Ready { .. }) {
                self.announced = true;
            }
            let start = stdout.len();
            if serde_json::to_writer(&mut *stdout, event).is_err() {
                stdout.truncate(start);
                return None;
            }
        } else {
            human(event, stdout);
        }
        stdout.push(b'\n');
        None
    }
}

/// Appends the line for people for `event` to `out`.
fn human(event: &Event, out: &mut Vec<u8>) {
    use std::io::Write as _;
    // Writing to a `Vec` cannot fail.
    let _ = match event {
        Event::Ready {
            url,
            target,
            answers,
            ..
        } => write!(
            out,
            "\nferry                  online\nForwarding             {url} -> {target}\nAnswers                {answers}\n(Ctrl+C to quit)\n"
        ),
        Event::Connecting { attempt, relay } => {
            write!(out, "● connecting to {relay} (attempt {attempt})")
        }
        Event::Online { url } => write!(out, "● online again: {url}"),
        Event::Reconnecting {
            attempt,
            reason,
            retry_in_ms,
        } => write!(
            out,
            "● reconnecting (attempt {attempt}): {reason}; retrying in {:.1}s",
            *retry_in_ms as f64 / 1000.0
        ),
        Event::Request(r) => {
            let (hours, minutes, seconds) = utc_clock(std::time::SystemTime::now());
            let _ = write!(
                out,
                "{hours:02}:{minutes:02}:{seconds:02}  {:<7} {:<40} {:>3}  {:>8.1} ms",
                r.method, r.path, r.status, r.duration_ms
            );
            if r.duplicate {
                out.extend_from_slice(b"  duplicate: delivery ");
                out.extend_from_slice(r.delivery_id.as_deref().unwrap_or("?").as_bytes());
                out.extend_from_slice(b" was already handed to the app; not passed again");
            }
            if let Some(error) = &r.error {
                out.extend_from_slice(b"  ");
                out.extend_from_slice(error.as_bytes());
            }
            if let Some(warning) = r.late_warning() {
                out.extend_from_slice("  ⚠ ".as_bytes());
                out.extend_from_slice(warning.as_bytes());
            }
            Ok(())
        }
    };
}

/// Hours, minutes and seconds of the day, in UTC, at `now`.
fn utc_clock(now: std::time::SystemTime) -> (u64, u64, u64) {
    let seconds = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
        % 86_400;
    (seconds / 3600, seconds / 60 % 60, seconds % 60)
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

    /// The line for `event` and whether it goes to stderr.
    fn render(console: &mut Console, event: &Event) -> (String, bool) {
        let mut stdout = Vec::new();
        if let Some(line) = console.render_into(event, &mut stdout) {
            return (line, true);
        }
        assert_eq!(
            stdout.pop(),
            Some(b'\n'),
            "a stdout line ends with a newline"
        );
        (String::from_utf8(stdout).unwrap(), false)
    }

    #[test]
    fn json_starts_with_ready() {
        let mut console = Console::new(true);
        let connecting = Event::Connecting {
            attempt: 1,
            relay: "http://r".into(),
        };
        assert!(render(&mut console, &connecting).1, "before ready: stderr");
        let ready = Event::Ready {
            url: "http://r/s".into(),
            session: "s".into(),
            target: "http://localhost:3000".into(),
            answers: "the app's response".into(),
        };
        let (line, stderr) = render(&mut console, &ready);
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
        let (line, _) = render(&mut console, &Event::Request(event.clone()));
        assert_eq!(
            line,
            r#"{"event":"request","id":1,"method":"POST","path":"/x","status":200,"duration_ms":1.5,"request_bytes":3,"response_bytes":4}"#
        );
        event.delivery_id = Some("01J".into());
        event.age_ms = Some(7 * 60 * 1000 + 5);
        event.attempt = Some(2);
        event.duplicate = true;
        let (line, _) = render(&mut console, &Event::Request(event.clone()));
        assert_eq!(
            line,
            r#"{"event":"request","id":1,"method":"POST","path":"/x","status":200,"duration_ms":1.5,"request_bytes":3,"response_bytes":4,"delivery_id":"01J","age_ms":420005,"attempt":2,"duplicate":true}"#
        );
        let (line, _) = render(&mut Console::new(false), &Event::Request(event));
        assert!(line.contains("delivered 7m late: Stripe/Slack/Standard Webhooks signatures older than 5 min fail verification"), "{line}");
        assert!(line.contains("duplicate"), "{line}");
    }

    #[test]
    fn the_clock_is_the_utc_time_of_day() {
        let at = std::time::UNIX_EPOCH + Duration::from_secs(1_764_660_754); // 2025-12-02T07:32:34Z
        assert_eq!(utc_clock(at), (7, 32, 34));
        let text = humantime::format_rfc3339_seconds(at).to_string();
        assert_eq!(&text[11..19], "07:32:34");
    }

    #[test]
    fn lines_follow_each_other_in_one_buffer() {
        let mut console = Console::new(false);
        let mut out = Vec::new();
        let mut event = RequestEvent::new(1, "POST", "/a");
        event.status = 200;
        assert!(console
            .render_into(&Event::Request(event.clone()), &mut out)
            .is_none());
        event.path = "/b".into();
        event.error = Some("app closed the connection".into());
        console.render_into(&Event::Request(event), &mut out);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].contains("  POST    /a ") && lines[0].ends_with(" ms"),
            "{text}"
        );
        assert!(
            lines[1].ends_with("ms  app closed the connection"),
            "{text}"
        );
        assert!(text.ends_with('\n'));
    }
}
