//! `ferry history`, `ferry show` and `ferry replay`: the relay's history API from the terminal.

use std::io::Write as _;

use base64::Engine as _;
use serde_json::{json, Value};

use crate::api::{encode_component, HistoryApi};
use crate::config::{Command, HistoryArgs, RelayArgs, ShowArgs};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Runs a history command; `Err` is the message to print before exiting non-zero.
pub async fn run_command(command: Command) -> Result<(), String> {
    match command {
        Command::Listen(_) => Err("listen is not a history command".into()),
        Command::History(args) => history(args).await,
        Command::Show(args) => show(args).await,
        Command::Replay(args) => replay(args).await,
    }
}

fn api(args: &RelayArgs) -> Result<HistoryApi, String> {
    HistoryApi::new(
        &args.relay,
        &args.token,
        &args.session,
        args.relay_ca.as_deref(),
    )
}

fn print(text: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot write to stdout: {e}"))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn query(args: &HistoryArgs, limit: Option<usize>, before: Option<&str>) -> String {
    let mut parts = Vec::new();
    if let Some(status) = &args.status {
        parts.push(format!("status={}", encode_component(status)));
    }
    if let Some(method) = &args.method {
        parts.push(format!(
            "method={}",
            encode_component(&method.to_ascii_uppercase())
        ));
    }
    if let Some(path) = &args.path {
        parts.push(format!("path={}", encode_component(path)));
    }
    if let Some(since) = args.since {
        let ms = i64::try_from(since.as_millis()).unwrap_or(i64::MAX);
        parts.push(format!("since={}", now_ms().saturating_sub(ms)));
    }
    if let Some(limit) = limit {
        parts.push(format!("limit={limit}"));
    }
    if let Some(before) = before {
        parts.push(format!("before={}", encode_component(before)));
    }
    parts.join("&")
}

async fn history(args: HistoryArgs) -> Result<(), String> {
    let api = api(&args.relay)?;
    if let Some(file) = args.export.clone() {
        return export(&api, &args, &file).await;
    }
    let page = api
        .list(&query(&args, Some(args.limit.unwrap_or(50)), None))
        .await?;
    if args.relay.json {
        return print(&format!("{page}\n"));
    }
    let requests = page["requests"].as_array().cloned().unwrap_or_default();
    if requests.is_empty() {
        return print("no recorded requests\n");
    }
    let mut out = format!(
        "{:<26}  {:<19}  {:<7} {:<32} {:>6}  {:>9}  {:>3}  {}\n",
        "ID", "TIME (UTC)", "METHOD", "PATH", "STATUS", "DURATION", "TRY", "PROVIDER ID"
    );
    for r in &requests {
        let status = match r["status"].as_u64() {
            Some(status) => status.to_string(),
            None => r["state"].as_str().unwrap_or("-").to_owned(),
        };
        let duration = r["duration_ms"]
            .as_u64()
            .map_or_else(|| "-".to_owned(), |d| format!("{d} ms"));
        let mut provider = match (r["provider"].as_str(), r["provider_id"].as_str()) {
            (Some(p), Some(id)) => format!("{p} {id}"),
            _ => String::new(),
        };
        if let Some(original) = r["duplicate_of"].as_str() {
            provider.push_str(&format!(" (duplicate of {original})"));
        }
        out.push_str(&format!(
            "{:<26}  {:<19}  {:<7} {:<32} {:>6}  {:>9}  {:>3}  {}\n",
            r["id"].as_str().unwrap_or("?"),
            time(r["received_at_ms"].as_i64()),
            r["method"].as_str().unwrap_or("?"),
            shown_path(r["target"].as_str().unwrap_or("")),
            status,
            duration,
            r["attempts"].as_u64().unwrap_or(0),
            provider.trim(),
        ));
    }
    if let Some(next) = page["next"].as_str() {
        out.push_str(&format!(
            "(more: older requests before {next}; raise --limit)\n"
        ));
    }
    print(&out)
}

fn shown_path(target: &str) -> String {
    if target.is_empty() || target.starts_with('?') {
        format!("/{target}")
    } else {
        target.to_owned()
    }
}

fn time(ms: Option<i64>) -> String {
    let Some(ms) = ms.and_then(|ms| u64::try_from(ms).ok()) else {
        return "-".into();
    };
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    let text = humantime::format_rfc3339_seconds(at).to_string();
    text.trim_end_matches('Z').replace('T', " ")
}

async fn export(
    api: &HistoryApi,
    args: &HistoryArgs,
    file: &std::path::Path,
) -> Result<(), String> {
    let limit = args.limit.unwrap_or(usize::MAX);
    let mut ids = Vec::new();
    let mut before: Option<String> = None;
    while ids.len() < limit {
        let want = (limit - ids.len()).min(1000);
        let page = api
            .list(&query(args, Some(want), before.as_deref()))
            .await?;
        for r in page["requests"].as_array().into_iter().flatten() {
            if let Some(id) = r["id"].as_str() {
                ids.push(id.to_owned());
            }
        }
        match page["next"].as_str() {
            Some(next) => before = Some(next.to_owned()),
            None => break,
        }
    }
    ids.truncate(limit);
    let mut records = Vec::with_capacity(ids.len());
    for id in &ids {
        records.push(api.show(id).await?);
    }
    let har = file
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("har"));
    let text = if har {
        let entries: Vec<Value> = records.iter().map(|r| har_entry(api, r)).collect();
        let log = json!({"log": {
            "version": "1.2",
            "creator": {"name": "ferry", "version": env!("CARGO_PKG_VERSION")},
            "entries": entries,
        }});
        serde_json::to_string_pretty(&log).map_err(|e| e.to_string())? + "\n"
    } else {
        let mut text = String::new();
        for record in &records {
            text.push_str(&record.to_string());
            text.push('\n');
        }
        text
    };
    std::fs::write(file, text).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    if args.relay.json {
        print(&format!(
            "{}\n",
            json!({"exported": records.len(), "file": file.display().to_string(), "format": if har { "har" } else { "ndjson" }})
        ))
    } else {
        print(&format!(
            "exported {} request(s) to {} ({})\n",
            records.len(),
            file.display(),
            if har { "HAR" } else { "NDJSON" }
        ))
    }
}

/// `[name, value]` pairs of a header list as JSON; values that are not UTF-8 come as
/// `{"b64": …}` and are decoded here.
fn header_pairs(list: &Value) -> Vec<(String, Vec<u8>)> {
    let mut pairs = Vec::new();
    for entry in list.as_array().into_iter().flatten() {
        let (Some(name), Some(value)) = (entry.get(0).and_then(Value::as_str), entry.get(1)) else {
            continue;
        };
        let bytes = match value {
            Value::String(text) => text.as_bytes().to_vec(),
            other => other
                .get("b64")
                .and_then(Value::as_str)
                .and_then(|b| B64.decode(b).ok())
                .unwrap_or_default(),
        };
        pairs.push((name.to_owned(), bytes));
    }
    pairs
}

fn header_value<'a>(pairs: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    pairs
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

fn decode_body(value: &Value) -> Vec<u8> {
    value
        .as_str()
        .and_then(|b| B64.decode(b).ok())
        .unwrap_or_default()
}

fn har_entry(api: &HistoryApi, r: &Value) -> Value {
    let headers = header_pairs(&r["headers"]);
    let har_headers = |pairs: &[(String, Vec<u8>)]| -> Vec<Value> {
        pairs
            .iter()
            .map(|(n, v)| json!({"name": n, "value": String::from_utf8_lossy(v)}))
            .collect()
    };
    let target = shown_path(r["target"].as_str().unwrap_or(""));
    let url = format!("{}/{}{}", api.base(), api.session(), target);
    let query: Vec<Value> = target
        .split_once('?')
        .map(|(_, q)| q)
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (n, v) = p.split_once('=').unwrap_or((p, ""));
            json!({"name": n, "value": v})
        })
        .collect();
    let mime = |pairs: &[(String, Vec<u8>)]| {
        header_value(pairs, "content-type")
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    let content = |body: &[u8], mime: String| match std::str::from_utf8(body) {
        Ok(text) => json!({"size": body.len(), "mimeType": mime, "text": text}),
        Err(_) => {
            json!({"size": body.len(), "mimeType": mime, "text": B64.encode(body), "encoding": "base64"})
        }
    };
    let body = decode_body(&r["body_b64"]);
    let mut request = json!({
        "method": r["method"],
        "url": url,
        "httpVersion": "HTTP/1.1",
        "cookies": [],
        "headers": har_headers(&headers),
        "queryString": query,
        "headersSize": -1,
        "bodySize": r["body_len"],
    });
    if !body.is_empty() {
        // HAR has no `encoding` for postData; binary bodies use the same base64 extension as
        // response content, which common HAR viewers accept.
        request["postData"] = content(&body, mime(&headers));
    }
    let (response, wait) = match r.get("response").filter(|v| !v.is_null()) {
        Some(resp) => {
            let pairs = header_pairs(&resp["headers"]);
            let body = decode_body(&resp["body_b64"]);
            let status = resp["status"].as_u64().unwrap_or(0);
            let reason = u16::try_from(status)
                .ok()
                .and_then(|s| http::StatusCode::from_u16(s).ok())
                .and_then(|s| s.canonical_reason())
                .unwrap_or("");
            (
                json!({
                    "status": status,
                    "statusText": reason,
                    "httpVersion": "HTTP/1.1",
                    "cookies": [],
                    "headers": har_headers(&pairs),
                    "content": content(&body, mime(&pairs)),
                    "redirectURL": "",
                    "headersSize": -1,
                    "bodySize": resp["body_len"],
                }),
                resp["duration_ms"].as_u64().unwrap_or(0),
            )
        }
        None => (
            json!({"status": 0, "statusText": "", "httpVersion": "HTTP/1.1", "cookies": [],
                   "headers": [], "content": {"size": 0, "mimeType": ""}, "redirectURL": "",
                   "headersSize": -1, "bodySize": -1}),
            0,
        ),
    };
    let started = r["received_at_ms"]
        .as_u64()
        .map(|ms| {
            humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
            .to_string()
        })
        .unwrap_or_default();
    json!({
        "startedDateTime": started,
        "time": wait,
        "request": request,
        "response": response,
        "cache": {},
        "timings": {"send": 0, "wait": wait, "receive": 0},
        "comment": format!("ferry request {}", r["id"].as_str().unwrap_or("")),
    })
}

/// A body for people: JSON pretty-printed, text as is, binary as a note and base64.
pub(crate) fn render_body(body: &[u8], len: u64, truncated: bool) -> String {
    let mut out = String::new();
    if body.is_empty() && len == 0 {
        out.push_str("(no body)\n");
        return out;
    }
    match std::str::from_utf8(body) {
        Ok(text) => match serde_json::from_str::<Value>(text) {
            Ok(value)
                if !truncated
                    && (text.trim_start().starts_with('{')
                        || text.trim_start().starts_with('[')) =>
            {
                out.push_str(
                    &serde_json::to_string_pretty(&value).unwrap_or_else(|_| text.to_owned()),
                );
                out.push('\n');
            }
            _ => {
                out.push_str(text);
                if !text.ends_with('\n') {
                    out.push('\n');
                }
            }
        },
        Err(_) => {
            out.push_str(&format!(
                "({} bytes of binary data, shown as base64)\n{}\n",
                body.len(),
                B64.encode(body)
            ));
        }
    }
    if truncated {
        out.push_str(&format!(
            "(body cut: {} of {len} bytes were recorded)\n",
            body.len()
        ));
    }
    out
}

async fn show(args: ShowArgs) -> Result<(), String> {
    let api = api(&args.relay)?;
    let r = api.show(&args.id).await?;
    if args.relay.json {
        return print(&format!("{r}\n"));
    }
    let mut out = String::new();
    out.push_str(&format!(
        "{} {}\n",
        r["method"].as_str().unwrap_or("?"),
        shown_path(r["target"].as_str().unwrap_or(""))
    ));
    out.push_str(&format!(
        "id {} · received {} UTC · {} · {} attempt(s)",
        r["id"].as_str().unwrap_or("?"),
        time(r["received_at_ms"].as_i64()),
        r["state"].as_str().unwrap_or("?"),
        r["attempts"].as_u64().unwrap_or(0)
    ));
    if let (Some(p), Some(id)) = (r["provider"].as_str(), r["provider_id"].as_str()) {
        out.push_str(&format!(" · {p} {id}"));
    }
    if let Some(original) = r["duplicate_of"].as_str() {
        out.push_str(&format!(" · duplicate of {original}"));
    }
    out.push_str("\n\n");
    for (name, value) in header_pairs(&r["headers"]) {
        out.push_str(&format!("{name}: {}\n", String::from_utf8_lossy(&value)));
    }
    out.push('\n');
    out.push_str(&render_body(
        &decode_body(&r["body_b64"]),
        r["body_len"].as_u64().unwrap_or(0),
        r["body_truncated"].as_bool().unwrap_or(false),
    ));
    match r.get("response").filter(|v| !v.is_null()) {
        Some(resp) => {
            out.push_str(&format!(
                "\n── response {}",
                resp["status"].as_u64().unwrap_or(0)
            ));
            if let Some(ms) = resp["duration_ms"].as_u64() {
                out.push_str(&format!(" in {ms} ms"));
            }
            out.push_str(" ──\n");
            for (name, value) in header_pairs(&resp["headers"]) {
                out.push_str(&format!("{name}: {}\n", String::from_utf8_lossy(&value)));
            }
            out.push('\n');
            out.push_str(&render_body(
                &decode_body(&resp["body_b64"]),
                resp["body_len"].as_u64().unwrap_or(0),
                resp["body_truncated"].as_bool().unwrap_or(false),
            ));
        }
        None => out.push_str("\n── no response recorded ──\n"),
    }
    let attempts = r["attempt_log"].as_array().cloned().unwrap_or_default();
    if !attempts.is_empty() {
        out.push_str("\n── attempts ──\n");
        for a in attempts {
            let kind = if a["replay"].as_bool() == Some(true) {
                match a["replay_of"].as_u64() {
                    Some(of) => format!("replay of #{of}"),
                    None => "replay".to_owned(),
                }
            } else {
                "delivery".to_owned()
            };
            out.push_str(&format!(
                "#{} {kind} at {} UTC: {}",
                a["number"].as_u64().unwrap_or(0),
                time(a["started_at_ms"].as_i64()),
                a["outcome"].as_str().unwrap_or("?")
            ));
            if let Some(status) = a["status"].as_u64() {
                out.push_str(&format!(" {status}"));
            }
            if let Some(error) = a["error"].as_str() {
                out.push_str(&format!(" ({error})"));
            }
            out.push('\n');
        }
    }
    print(&out)
}

async fn replay(args: ShowArgs) -> Result<(), String> {
    let api = api(&args.relay)?;
    let result = api.replay(&args.id).await?;
    if args.relay.json {
        return print(&format!("{result}\n"));
    }
    print(&format!(
        "replayed {} (attempt {}): the app answered {}\n",
        result["id"].as_str().unwrap_or(&args.id),
        result["attempt"].as_u64().unwrap_or(0),
        result["status"]
            .as_u64()
            .map_or_else(|| "nothing".to_owned(), |s| s.to_string())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_for_people() {
        assert_eq!(render_body(b"{\"a\":1}", 7, false), "{\n  \"a\": 1\n}\n");
        assert_eq!(render_body(b"plain", 5, false), "plain\n");
        assert!(render_body(&[0xff, 0x00], 2, false).contains("binary"));
        assert_eq!(render_body(b"", 0, false), "(no body)\n");
        assert!(render_body(b"{\"a\"", 10, true).contains("cut"));
    }

    #[test]
    fn header_pairs_decode_binary_values() {
        let list = json!([["a", "1"], ["b", {"b64": "/w=="}]]);
        assert_eq!(
            header_pairs(&list),
            vec![("a".into(), b"1".to_vec()), ("b".into(), vec![0xff])]
        );
        assert_eq!(encode_component("/a b?"), "%2Fa%20b%3F");
    }
}
