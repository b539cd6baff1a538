//! Sessions: which public URL belongs to whom, and which tunnel connection serves it now.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use ferry_mux::MuxHandle;
use rand::RngCore;
use subtle::ConstantTimeEq;

use crate::auth::{sha256, TokenId};
use crate::store::{OfflinePolicy, RespondMode, SessionKind, SessionRecord};

/// A session's id: a claimed name, or 128 random bits in URL-safe base64.
pub type SessionId = String;

/// The live tunnel connection serving a session.
#[derive(Clone)]
pub struct Live {
    /// The multiplexed connection.
    pub mux: MuxHandle,
    /// Tells this connection apart from the ones before and after it.
    pub generation: u64,
    next_stream: Arc<AtomicU32>,
}

impl Live {
    /// A fresh id for a relay-initiated stream: odd numbers, leaving even ones for the client.
    pub fn next_stream_id(&self) -> Option<u32> {
        let n = self.next_stream.fetch_add(1, Ordering::Relaxed);
        n.checked_mul(2).and_then(|n| n.checked_add(1))
    }
}

/// One session.
pub struct Session {
    /// The session's id, the first path segment of its URL.
    pub id: SessionId,
    /// The token that created it; only that token may use it again.
    pub owner: TokenId,
    resume_digest: Mutex<[u8; 32]>,
    /// Generation of the newest granted claim; only it may go live.
    current: AtomicU64,
    live: Mutex<Option<Live>>,
    /// Named or random.
    pub kind: SessionKind,
    offline: Mutex<OfflinePolicy>,
    respond: Mutex<RespondMode>,
    created_at: i64,
    /// Offline queue bookkeeping (see `delivery`).
    pub(crate) queue: Mutex<QueueState>,
    /// Wakes the session's delivery task when a request was queued.
    pub(crate) queued: tokio::sync::Notify,
    /// Held by the session's delivery task, so only one drains the queue at a time.
    pub(crate) delivering: tokio::sync::Mutex<()>,
}

/// Whether a session has a backlog, and how many requests are being written to it now.
#[derive(Debug, Default)]
pub(crate) struct QueueState {
    /// The store may hold queued requests of this session: new requests queue behind them.
    pub(crate) backlog: bool,
    /// Requests being recorded as queued right now (not yet visible in the store).
    pub(crate) writing: usize,
    /// Requests queued so far (wrapping), to notice one that arrived during a check.
    pub(crate) written: u64,
    /// Delivery tasks started and not finished (waiting for their turn or draining).
    pub(crate) draining: usize,
}

impl Session {
    fn new(
        id: SessionId,
        owner: TokenId,
        digest: [u8; 32],
        kind: SessionKind,
        created_at: i64,
    ) -> Self {
        Session {
            id,
            owner,
            resume_digest: Mutex::new(digest),
            current: AtomicU64::new(0),
            live: Mutex::new(None),
            kind,
            offline: Mutex::new(OfflinePolicy::Queue),
            respond: Mutex::new(RespondMode::Pass),
            created_at,
            queue: Mutex::new(QueueState::default()),
            queued: tokio::sync::Notify::new(),
            delivering: tokio::sync::Mutex::new(()),
        }
    }

    /// The connection serving the session now, if a client is connected.
    pub fn live(&self) -> Option<Live> {
        self.live.lock().expect("session lock").clone()
    }

    /// What happens to requests while no client is connected.
    pub fn offline_policy(&self) -> OfflinePolicy {
        *self.offline.lock().expect("session lock")
    }

    /// Sets the offline policy (from the client's hello).
    pub fn set_offline_policy(&self, policy: OfflinePolicy) {
        *self.offline.lock().expect("session lock") = policy;
    }

    /// How callers are answered (`pass`, at once, or at a deadline).
    pub fn respond_mode(&self) -> RespondMode {
        self.respond.lock().expect("session lock").clone()
    }

    /// Sets how callers are answered (from the client's hello).
    pub fn set_respond_mode(&self, mode: RespondMode) {
        *self.respond.lock().expect("session lock") = mode;
    }

    /// The session as the store keeps it.
    pub fn record(&self, now_ms: i64) -> SessionRecord {
        SessionRecord {
            id: self.id.clone(),
            owner: self.owner.0,
            resume_digest: *self.resume_digest.lock().expect("session lock"),
            kind: self.kind,
            offline: self.offline_policy(),
            respond: self.respond_mode(),
            created_at: self.created_at,
            last_seen_at: now_ms,
        }
    }
}

/// How a client asks for its session.
pub enum Claim<'a> {
    /// A fresh random id.
    Random,
    /// A name (already validated).
    Named(&'a str),
    /// A session from an earlier connection, proven by its resume secret.
    Resume {
        /// The session id.
        session: &'a str,
        /// Its resume secret.
        secret: &'a str,
    },
}

/// Why a claim was refused.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The name or id belongs to another token.
    #[error("session '{0}' belongs to another token; pick another --name")]
    Taken(String),
    /// The resume secret is wrong.
    #[error("cannot resume session '{0}': its resume secret does not match")]
    BadSecret(String),
    /// The id to resume is not one this relay could have issued.
    #[error("cannot resume session '{0}': not a valid session id")]
    BadId(String),
    /// Too many sessions.
    #[error("the relay has reached its limit of {0} sessions")]
    Full(usize),
}

/// A granted claim: the session, its new resume secret, and the connection it replaced.
pub struct Granted {
    /// The session.
    pub session: Arc<Session>,
    /// A fresh resume secret (only its digest is kept).
    pub resume_secret: String,
    /// The connection that held the session until now, to be closed.
    pub replaced: Option<Live>,
    /// This claim's generation, for [`Registry::go_live`] and [`Registry::disconnect`].
    pub generation: u64,
}

/// All sessions of this relay.
pub struct Registry {
    sessions: DashMap<SessionId, Arc<Session>>,
    generations: AtomicU64,
    max_sessions: usize,
}

impl Registry {
    /// An empty registry holding at most `max_sessions` sessions.
    pub fn new(max_sessions: usize) -> Self {
        Registry {
            sessions: DashMap::new(),
            generations: AtomicU64::new(1),
            max_sessions,
        }
    }

    /// Adds sessions loaded from the store (at start-up).
    pub fn restore(&self, records: impl IntoIterator<Item = SessionRecord>) {
        for record in records {
            let session = Session::new(
                record.id.clone(),
                TokenId(record.owner),
                record.resume_digest,
                record.kind,
                record.created_at,
            );
            session.set_offline_policy(record.offline);
            session.set_respond_mode(record.respond);
            self.sessions.insert(record.id, Arc::new(session));
        }
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether there are no sessions.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Looks a session up by id.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.sessions.get(id).map(|s| s.clone())
    }

    /// Grants `claim` to `owner`. The owner claiming a session it already holds takes it over
    /// at once: the connection holding it is returned in [`Granted::replaced`] to be closed, and
    /// the session waits for [`Registry::go_live`] with the new connection.
    pub fn claim(&self, owner: TokenId, claim: Claim<'_>) -> Result<Granted, ClaimError> {
        let resume_secret = random_string(32);
        let digest = sha256(resume_secret.as_bytes());
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let mut kind = SessionKind::Random;
        let (id, proof): (String, Option<&str>) = match claim {
            Claim::Random => loop {
                let id = random_string(16);
                if !self.sessions.contains_key(&id) {
                    break (id, None);
                }
            },
            Claim::Named(name) => {
                kind = SessionKind::Named;
                (name.to_owned(), None)
            }
            Claim::Resume { session, secret } => {
                if !is_valid_id(session) {
                    return Err(ClaimError::BadId(session.to_owned()));
                }
                (session.to_owned(), Some(secret))
            }
        };
        if self.sessions.len() >= self.max_sessions && !self.sessions.contains_key(&id) {
            return Err(ClaimError::Full(self.max_sessions));
        }
        let session = match self.sessions.entry(id.clone()) {
            Entry::Occupied(entry) => {
                let session = entry.get().clone();
                drop(entry);
                if session.owner != owner {
                    return Err(ClaimError::Taken(id));
                }
                if let Some(secret) = proof {
                    let known = *session.resume_digest.lock().expect("session lock");
                    if !bool::from(known.ct_eq(&sha256(secret.as_bytes()))) {
                        return Err(ClaimError::BadSecret(id));
                    }
                }
                session
            }
            Entry::Vacant(entry) => {
                // A resume of a session this relay no longer knows (it restarted) re-creates
                // it, so the URL the user pasted keeps working.
                let session = Arc::new(Session::new(
                    id,
                    owner,
                    digest,
                    kind,
                    crate::store::now_ms(),
                ));
                entry.insert(session.clone());
                session
            }
        };
        *session.resume_digest.lock().expect("session lock") = digest;
        let replaced = {
            let mut live = session.live.lock().expect("session lock");
            session.current.store(generation, Ordering::Release);
            live.take()
        };
        Ok(Granted {
            session,
            resume_secret,
            replaced,
            generation,
        })
    }

    /// Makes `mux` the session's connection, unless a newer claim came in meanwhile (then
    /// returns false and the caller closes `mux`).
    pub fn go_live(&self, session: &Session, generation: u64, mux: MuxHandle) -> bool {
        let mut live = session.live.lock().expect("session lock");
        if session.current.load(Ordering::Acquire) != generation {
            return false;
        }
        *live = Some(Live {
            mux,
            generation,
            next_stream: Arc::new(AtomicU32::new(0)),
        });
        true
    }

    /// Marks the session's connection as gone, unless a newer one already replaced it.
    pub fn disconnect(&self, session: &Session, generation: u64) {
        let mut live = session.live.lock().expect("session lock");
        if live.as_ref().is_some_and(|l| l.generation == generation) {
            *live = None;
        }
    }

    /// Every live connection, for shutdown.
    pub fn live_connections(&self) -> Vec<Live> {
        self.sessions.iter().filter_map(|s| s.live()).collect()
    }
}

/// `bytes` random bytes from the OS's CSPRNG, as unpadded URL-safe base64.
pub fn random_string(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// Whether `id` is a name or a random id this relay could have issued.
fn is_valid_id(id: &str) -> bool {
    ferry_protocol::validate_session_name(id).is_ok()
        || (id.len() == 22
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
}
