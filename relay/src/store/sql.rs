//! Conversions between the store's types and SQLite values.

use bytes::Bytes;
use ferry_protocol::HeaderList;
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, Type, ValueRef};
use rusqlite::{Row, ToSql};

use super::codec::decode_headers;
use super::ids::RequestId;
use super::provider::ProviderId;
use super::records::{AttemptOutcome, OfflinePolicy, RequestState, RespondMode, SessionKind};

impl ToSql for RequestId {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.to_string()))
    }
}

impl FromSql for RequestId {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        value
            .as_str()?
            .parse()
            .map_err(|e| FromSqlError::Other(Box::new(e)))
    }
}

/// `FromSql`/`ToSql` through `as_str` and `FromStr`, for the enums stored as text.
macro_rules! text_enum {
    ($($ty:ty),*) => {$(
        impl ToSql for $ty {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $ty {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                value.as_str()?.parse().map_err(|e: String| FromSqlError::Other(e.into()))
            }
        }
    )*};
}

text_enum!(RequestState, AttemptOutcome);

impl SessionKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SessionKind::Named => "named",
            SessionKind::Random => "random",
        }
    }
}

impl OfflinePolicy {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            OfflinePolicy::Queue => "queue",
            OfflinePolicy::Reject => "reject",
        }
    }
}

impl RespondMode {
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            RespondMode::Pass => "pass",
            RespondMode::Now { .. } => "now",
            RespondMode::Deadline { .. } => "deadline",
        }
    }
}

/// A conversion failure at column `idx`.
pub(crate) fn bad_column(idx: usize, ty: Type, what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, ty, what.to_owned().into())
}

/// A header-list BLOB at column `idx`.
pub(crate) fn headers_at(row: &Row<'_>, idx: usize) -> rusqlite::Result<HeaderList> {
    let blob = row.get_ref(idx)?.as_blob()?;
    decode_headers(blob).ok_or_else(|| bad_column(idx, Type::Blob, "malformed header list"))
}

/// An optional header-list BLOB at column `idx`.
pub(crate) fn opt_headers_at(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<HeaderList>> {
    match row.get_ref(idx)? {
        ValueRef::Null => Ok(None),
        _ => headers_at(row, idx).map(Some),
    }
}

/// A BLOB at column `idx`.
pub(crate) fn bytes_at(row: &Row<'_>, idx: usize) -> rusqlite::Result<Bytes> {
    Ok(Bytes::copy_from_slice(row.get_ref(idx)?.as_blob()?))
}

/// A provider id from the `provider` and `provider_id` columns at `idx` and `idx + 1`.
pub(crate) fn provider_at(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<ProviderId>> {
    let provider: Option<String> = row.get(idx)?;
    let id: Option<String> = row.get(idx + 1)?;
    Ok(match (provider, id) {
        (Some(provider), Some(id)) => Some(ProviderId { provider, id }),
        _ => None,
    })
}
