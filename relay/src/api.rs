//! The history API: list, show and replay a session's recorded requests (issue 4).
//!
//! Every route is under [`PREFIX`] and needs the session owner's token as
//! `Authorization: Bearer TOKEN`.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::reply::{self, RelayBody};
use crate::Relay;

/// Prefix of the history API: `/_ferry/v1/sessions/{session}/requests[/{id}[/replay]]`.
pub(crate) const PREFIX: &str = "/_ferry/v1/sessions/";

/// Serves one history API request.
pub(crate) async fn handle(relay: Arc<Relay>, req: Request<Incoming>) -> Response<RelayBody> {
    let _ = (&relay, &req);
    reply::error(
        StatusCode::NOT_IMPLEMENTED,
        "not implemented",
        "the history API is not built yet",
    )
}
