//! The local target: the only address the client ever sends requests to.

use std::fmt;

use http::uri::{Authority, PathAndQuery, Uri};

/// Why a target could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("invalid target '{input}': {reason}. Use a port (3000), host:port (localhost:3000) or a URL (http://localhost:3000/webhooks)")]
pub struct TargetError {
    input: String,
    reason: String,
}

/// Where webhooks are forwarded: `http://AUTHORITY[PREFIX]` or `https://AUTHORITY[PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Whether the app is spoken to over TLS (`https://`).
    tls: bool,
    authority: Authority,
    /// Path prefix without a trailing slash (`/webhooks`), or empty.
    prefix: String,
}

impl Target {
    /// Parses `3000`, `host:port`, or `http(s)://host[:port]/prefix`.
    pub fn parse(input: &str) -> Result<Target, TargetError> {
        let err = |reason: &str| TargetError {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let input_trimmed = input.trim();
        if input_trimmed.is_empty() {
            return Err(err("it is empty"));
        }
        const OUT_OF_RANGE: &str = "that port is out of range: ports go from 1 to 65535";
        if input_trimmed.bytes().all(|b| b.is_ascii_digit()) {
            let port = match input_trimmed.parse::<u16>() {
                Ok(0) => return Err(err("port 0 is not a port an app listens on")),
                Ok(port) => port,
                Err(_) => return Err(err(OUT_OF_RANGE)),
            };
            return Ok(Target {
                tls: false,
                authority: Authority::try_from(format!("localhost:{port}"))
                    .map_err(|_| err("bad port"))?,
                prefix: String::new(),
            });
        }
        let with_scheme = if input_trimmed.contains("://") {
            input_trimmed.to_owned()
        } else {
            format!("http://{input_trimmed}")
        };
        let uri: Uri = with_scheme.parse().map_err(|_| err("not a valid URL"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(err("only http:// and https:// targets are supported")),
        };
        let authority = uri.authority().cloned().ok_or_else(|| err("no host"))?;
        if tls && rustls::pki_types::ServerName::try_from(bare_host(&authority)).is_err() {
            return Err(err("that host is not a name TLS can check"));
        }
        if authority.as_str().contains('@') {
            return Err(err("credentials in the URL are not supported"));
        }
        if authority.port_u16().is_none() {
            let digits = authority.as_str().rsplit_once(':').map(|(_, port)| port);
            if digits
                .is_some_and(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
            {
                return Err(err(OUT_OF_RANGE));
            }
            if !input_trimmed.contains("://") {
                return Err(err("no port"));
            }
        }
        if uri.query().is_some() {
            return Err(err("a target cannot have a query string"));
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();
        Ok(Target {
            tls,
            authority,
            prefix,
        })
    }

    /// The `host[:port]` the client sends as `Host`, as the user gave it.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Whether the app is spoken to over TLS (an `https://` target).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// The host, without the brackets of an IPv6 address.
    pub fn host(&self) -> &str {
        bare_host(&self.authority)
    }

    /// The `host:port` the client connects to: the port given, or the scheme's (80, 443).
    pub fn connect_to(&self) -> String {
        let port = self
            .authority
            .port_u16()
            .unwrap_or(if self.tls { 443 } else { 80 });
        format!("{}:{port}", self.authority.host())
    }

    /// The URI for a request whose path and query below the session are `rest` (exactly as the
    /// relay received it: empty, `/…` or `?…`). Anything else is refused, so a request head can
    /// never point the client at another host.
    pub fn uri_for(&self, rest: &str) -> Result<Uri, String> {
        let path_and_query = self.path_for(rest)?;
        Uri::builder()
            .scheme(self.scheme())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| format!("invalid request URI: {e}"))
    }

    /// The path and query (the request target in origin form) for `rest`, as in
    /// [`Target::uri_for`].
    pub fn path_for(&self, rest: &str) -> Result<PathAndQuery, String> {
        if !(rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')) {
            return Err(format!("request target {rest:?} is not a path"));
        }
        let mut path = String::with_capacity(self.prefix.len() + rest.len() + 1);
        path.push_str(&self.prefix);
        path.push_str(rest);
        if !path.starts_with('/') {
            path.insert(0, '/');
        }
        PathAndQuery::try_from(path).map_err(|e| format!("invalid request path: {e}"))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme(), self.authority, self.prefix)
    }
}

fn bare_host(authority: &Authority) -> &str {
    authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        assert_eq!(
            Target::parse("3000").unwrap().to_string(),
            "http://localhost:3000"
        );
        assert_eq!(
            Target::parse("127.0.0.1:8080").unwrap().to_string(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            Target::parse("http://localhost:3000/webhooks/")
                .unwrap()
                .to_string(),
            "http://localhost:3000/webhooks"
        );
        for out_of_range in ["99999", "localhost:99999", "http://localhost:70000/hooks"] {
            let error = Target::parse(out_of_range).unwrap_err().to_string();
            assert!(error.contains("1 to 65535"), "{error}");
        }
        for bad in [
            "",
            "0",
            "65536",
            "localhost:99999",
            "ftp://x:1",
            "localhost",
            "http://u:p@h:1",
            "http://h:1/?q=1",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn https_targets_and_default_ports() {
        let https = Target::parse("https://localhost:8443/hooks/").unwrap();
        assert!(https.is_tls());
        assert_eq!(https.to_string(), "https://localhost:8443/hooks");
        assert_eq!(https.connect_to(), "localhost:8443");
        assert_eq!(
            https.uri_for("/a?b=1").unwrap().to_string(),
            "https://localhost:8443/hooks/a?b=1"
        );
        let default_tls = Target::parse("https://app.test/x").unwrap();
        assert_eq!(default_tls.connect_to(), "app.test:443");
        assert_eq!(default_tls.authority().as_str(), "app.test");
        let default_plain = Target::parse("http://localhost/webhooks").unwrap();
        assert!(!default_plain.is_tls());
        assert_eq!(default_plain.connect_to(), "localhost:80");
        let v6 = Target::parse("https://[::1]:8443").unwrap();
        assert_eq!(v6.host(), "::1");
        assert_eq!(v6.connect_to(), "[::1]:8443");
        assert_eq!(
            Target::parse("3000").unwrap().connect_to(),
            "localhost:3000"
        );
    }

    #[test]
    fn maps_paths_exactly() {
        let plain = Target::parse("3000").unwrap();
        assert_eq!(
            plain.uri_for("").unwrap().to_string(),
            "http://localhost:3000/"
        );
        assert_eq!(
            plain.uri_for("/").unwrap().to_string(),
            "http://localhost:3000/"
        );
        assert_eq!(
            plain.uri_for("?x=1").unwrap().to_string(),
            "http://localhost:3000/?x=1"
        );
        assert_eq!(
            plain.uri_for("/a//b%2F?z=1&a=2").unwrap().to_string(),
            "http://localhost:3000/a//b%2F?z=1&a=2"
        );
        let prefixed = Target::parse("http://localhost:3000/hooks").unwrap();
        assert_eq!(
            prefixed.uri_for("").unwrap().to_string(),
            "http://localhost:3000/hooks"
        );
        assert_eq!(
            prefixed.uri_for("/").unwrap().to_string(),
            "http://localhost:3000/hooks/"
        );
        assert_eq!(
            prefixed.uri_for("?x=1").unwrap().to_string(),
            "http://localhost:3000/hooks?x=1"
        );
        assert_eq!(
            prefixed.uri_for("/a").unwrap().to_string(),
            "http://localhost:3000/hooks/a"
        );
    }

    #[test]
    fn never_leaves_the_target() {
        let target = Target::parse("3000").unwrap();
        for hostile in [
            "http://evil.example/x",
            "@evil.example/x",
            "evil.example",
            "//evil.example/x",
        ] {
            if let Ok(uri) = target.uri_for(hostile) {
                assert_eq!(
                    uri.authority().unwrap().as_str(),
                    "localhost:3000",
                    "{hostile}"
                );
            }
        }
    }
}
