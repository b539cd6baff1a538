//! Provider delivery ids: the id a webhook provider gives each delivery, which stays the same
//! when the provider retries it. Recording it lets history mark retries as duplicates.

use ferry_protocol::HeaderList;

/// A provider's id for one delivery.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProviderId {
    /// Who sent it: `github`, `standard-webhooks`, `svix`, `shopify`, `stripe`, `linear`,
    /// `gitlab` or `twilio`.
    pub provider: String,
    /// The delivery id.
    pub id: String,
}

/// Headers that carry a delivery id, in the order they are looked for: the first four before
/// Stripe's id in the body, the rest after it ([`STRIPE_RANK`]).
///
/// Slack (`X-Slack-Request-Timestamp` + `X-Slack-Signature`) and Paddle (`Paddle-Signature`)
/// send signatures, not ids, so they are deliberately absent.
const ID_HEADERS: [(&str, &str); 7] = [
    ("x-github-delivery", "github"),
    ("webhook-id", "standard-webhooks"),
    ("svix-id", "svix"),
    ("x-shopify-webhook-id", "shopify"),
    ("linear-delivery", "linear"),
    ("x-gitlab-event-uuid", "gitlab"),
    ("x-twilio-idempotency-token", "twilio"),
];

/// Where Stripe's id in the body ranks among [`ID_HEADERS`]: after the first four.
const STRIPE_RANK: usize = 4;

/// Ids longer than this are not ids.
const MAX_ID_LEN: usize = 256;

/// The provider delivery id of a request, if it has one: the first of `X-GitHub-Delivery`,
/// `webhook-id`, `svix-id`, `X-Shopify-Webhook-Id`, Stripe's event id (the JSON body's
/// top-level `"id"` when it starts with `evt_`), `Linear-Delivery`, `X-Gitlab-Event-UUID` and
/// `X-Twilio-Idempotency-Token`. Header names are compared case-insensitively; empty, non-UTF-8
/// or absurdly long values are skipped.
pub fn delivery_id(headers: &HeaderList, body: &[u8]) -> Option<ProviderId> {
    let best = from_headers(headers);
    if let Some((rank, id)) = best.filter(|(rank, _)| *rank < STRIPE_RANK) {
        return Some(found(ID_HEADERS[rank].1, id));
    }
    stripe_event_id(body)
        .map(|id| found("stripe", id))
        .or_else(|| best.map(|(rank, id)| found(ID_HEADERS[rank].1, id)))
}

/// The best-ranked usable id among the headers, with its rank in [`ID_HEADERS`]: one pass over
/// the headers (a webhook's head is read here once per request), most names passed over by
/// their length alone.
fn from_headers(headers: &HeaderList) -> Option<(usize, &str)> {
    let mut best: Option<(usize, &str)> = None;
    for (name, value) in headers.iter() {
        let rank = ID_HEADERS.iter().position(|(wanted, _)| {
            wanted.len() == name.len() && name.eq_ignore_ascii_case(wanted)
        });
        let Some(rank) = rank.filter(|rank| best.is_none_or(|(best, _)| *rank < best)) else {
            continue;
        };
        if let Some(id) = usable(value) {
            best = Some((rank, id));
        }
    }
    best
}

fn usable(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?.trim();
    (!value.is_empty() && value.len() <= MAX_ID_LEN && !value.chars().any(char::is_control))
        .then_some(value)
}

fn found(provider: &str, id: &str) -> ProviderId {
    ProviderId {
        provider: provider.to_owned(),
        id: id.to_owned(),
    }
}

/// Stripe's event id: the top-level `"id"` of a JSON object body, when it starts with `evt_`.
///
/// Bodies that cannot hold one (not an object, or no `"evt_` anywhere) are not parsed.
fn stripe_event_id(body: &[u8]) -> Option<&str> {
    #[derive(serde::Deserialize)]
    struct Event<'a> {
        // Borrowed: an id with escapes fails to parse, and Stripe's never have any.
        #[serde(borrow, default)]
        id: Option<&'a str>,
    }
    let trimmed = body.trim_ascii_start();
    if !trimmed.starts_with(b"{") || !contains(trimmed, b"\"evt_") {
        return None;
    }
    let event: Event<'_> = serde_json::from_slice(body).ok()?;
    event
        .id
        .filter(|id| id.starts_with("evt_"))
        .and_then(|id| usable(id.as_bytes()))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderList {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    fn id(provider: &str, id: &str) -> Option<ProviderId> {
        Some(found(provider, id))
    }

    #[test]
    fn each_provider() {
        let cases: [(&str, &str, &str); 7] = [
            (
                "X-GitHub-Delivery",
                "72d3162e-cc78-11e3-81ab-4c9367dc0958",
                "github",
            ),
            (
                "webhook-id",
                "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
                "standard-webhooks",
            ),
            ("svix-id", "msg_p5jXN8AQM9LWM0D4loKWxJek", "svix"),
            (
                "X-Shopify-Webhook-Id",
                "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043",
                "shopify",
            ),
            (
                "Linear-Delivery",
                "234d1a4e-b617-4388-90fe-adc3633d6b72",
                "linear",
            ),
            (
                "X-Gitlab-Event-UUID",
                "13792a34-cac6-4fda-95a8-c58e00a3954e",
                "gitlab",
            ),
            ("X-Twilio-Idempotency-Token", "a1b2c3", "twilio"),
        ];
        for (name, value, provider) in cases {
            let list = headers(&[("content-type", "application/json"), (name, value)]);
            assert_eq!(delivery_id(&list, b"{}"), id(provider, value), "{name}");
            // Header names are case-insensitive.
            let list = headers(&[(&name.to_ascii_uppercase(), value)]);
            assert_eq!(delivery_id(&list, b""), id(provider, value), "{name}");
        }
    }

    #[test]
    fn stripe_event_id_from_body() {
        let body = br#"{
  "id": "evt_1NG8Du2eZvKYlo2CUI79vXWy",
  "object": "event",
  "data": {"object": {"id": "pi_123", "note": "\"evt_fake"}}
}"#;
        let list = headers(&[("Stripe-Signature", "t=1,v1=abc")]);
        assert_eq!(
            delivery_id(&list, body),
            id("stripe", "evt_1NG8Du2eZvKYlo2CUI79vXWy")
        );
        // Only the top-level id counts, and only when it is an event id.
        assert_eq!(
            delivery_id(&list, br#"{"id":"pi_1","data":{"id":"evt_2"}}"#),
            None
        );
        assert_eq!(delivery_id(&list, br#"{"data":{"id":"evt_2"}}"#), None);
        assert_eq!(delivery_id(&list, br#"["evt_1"]"#), None);
        assert_eq!(delivery_id(&list, br#"{"id":"evt_1""#), None);
        assert_eq!(delivery_id(&list, b"id=evt_1"), None);
    }

    #[test]
    fn order_of_precedence() {
        let body = br#"{"id":"evt_1"}"#;
        let all = headers(&[
            ("X-Twilio-Idempotency-Token", "tw"),
            ("X-Gitlab-Event-UUID", "gl"),
            ("Linear-Delivery", "li"),
            ("X-Shopify-Webhook-Id", "sh"),
            ("svix-id", "sv"),
            ("webhook-id", "wh"),
            ("X-GitHub-Delivery", "gh"),
        ]);
        assert_eq!(delivery_id(&all, body), id("github", "gh"));
        let no_github = headers(&[("svix-id", "sv"), ("webhook-id", "wh")]);
        assert_eq!(delivery_id(&no_github, body), id("standard-webhooks", "wh"));
        let shopify = headers(&[("X-Shopify-Webhook-Id", "sh")]);
        assert_eq!(delivery_id(&shopify, body), id("shopify", "sh"));
        let linear = headers(&[("Linear-Delivery", "li")]);
        assert_eq!(delivery_id(&linear, body), id("stripe", "evt_1"));
        assert_eq!(delivery_id(&linear, b"{}"), id("linear", "li"));
    }

    #[test]
    fn signatures_and_junk_are_not_ids() {
        let slack = headers(&[
            ("X-Slack-Request-Timestamp", "1531420618"),
            (
                "X-Slack-Signature",
                "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
            ),
        ]);
        assert_eq!(delivery_id(&slack, b"token=x&team_id=T1"), None);
        let paddle = headers(&[("Paddle-Signature", "ts=1671552777;h1=eb4d0dc8")]);
        assert_eq!(delivery_id(&paddle, br#"{"event_id":"evt_01"}"#), None);
        let empty = headers(&[("X-GitHub-Delivery", "  "), ("webhook-id", "wh")]);
        assert_eq!(delivery_id(&empty, b""), id("standard-webhooks", "wh"));
        let mut binary = HeaderList::new();
        binary.push("X-GitHub-Delivery", vec![0xff, 0xfe]);
        assert_eq!(delivery_id(&binary, b""), None);
        let long = "x".repeat(MAX_ID_LEN + 1);
        assert_eq!(delivery_id(&headers(&[("svix-id", &long)]), b""), None);
    }
}
