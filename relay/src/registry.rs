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

/// The live tunnel connection serving a session, or one of its extra lanes.
#[derive(Clone)]
pub struct Live {
    /// The multiplexed connection.
    pub mux: MuxHandle,
    /// Tells the session's connection apart from the ones before and after it (a lane has
    /// the generation of the connection it joined).
    pub generation: u64,
    /// The relay thread whose runtime serves this connection's socket ([`crate::lanes`]).
    pub home: usize,
    next_stream: Arc<AtomicU32>,
}

impl Live {
    fn new(mux: MuxHandle, generation: u64, home: usize) -> Self {
        Live {
            mux,
            generation,
            home,
            next_stream: Arc::new(AtomicU32::new(0)),
        }
    }

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
    /// The extra lanes of the live connection.
    lanes: Mutex<Lanes>,
}

/// The extra lanes of a session's live connection (see [`crate::lanes`]).
#[derive(Default)]
struct Lanes {
    /// The generation they belong to; lanes of an older one are never used.
    generation: u64,
    /// Digest of the key that joins a lane to this generation, if lanes were offered.
    key: Option<[u8; 32]>,
    /// Lanes joined, at most one per relay thread (never the main connection's).
    extra: Vec<Live>,
    /// Relay threads the client was asked to open a lane for (bit per thread).
    asked: u64,
}

/// Why a lane was not joined.
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    /// The session is not live with that key (any more), or belongs to another token.
    #[error("no live connection of session '{0}' takes this lane key")]
    Refused(String),
    /// This relay thread already serves the session.
    #[error("this relay thread already serves session '{0}'; open another connection")]
    Taken(String),
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
            lanes: Mutex::new(Lanes::default()),
        }
    }

    /// The connection a caller served by this relay thread should use: the session's lane on
    /// this thread if it has one, else its main connection. When the main connection offered
    /// lanes and none is on this thread, asks the client (once per thread) to open one.
    pub fn live_for_caller(&self) -> Option<Live> {
        let here = crate::lanes::home();
        // Only the connection handed out is cloned: the main one's counters are shared with
        // the thread serving it, and a caller on another thread need not touch them.
        let generation = {
            let live = self.live.lock().expect("session lock");
            let main = live.as_ref()?;
            if main.home == here {
                return Some(main.clone());
            }
            main.generation
        };
        let ask = {
            let mut lanes = self.lanes.lock().expect("session lock");
            if lanes.generation != generation || lanes.key.is_none() {
                drop(lanes);
                return self.live();
            }
            if let Some(lane) = lanes.extra.iter().find(|l| l.home == here) {
                if !lane.mux.is_closed() {
                    return Some(lane.clone());
                }
            }
            let ask = lanes.asked & thread_bit(here) == 0;
            lanes.asked |= thread_bit(here);
            ask
        };
        let main = self.live()?;
        if ask
            && !main
                .mux
                .try_send_control(ferry_protocol::Control::OpenLane {})
        {
            // Dropped (the connection is busy): a later caller asks again.
            self.lanes.lock().expect("session lock").asked &= !thread_bit(here);
        }
        Some(main)
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
    /// A fresh key that joins extra lanes to this claim's connection (only its digest is kept,
    /// once the connection goes live with lanes).
    pub lane_key: String,
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
        let lane_key = random_string(32);
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
            lane_key,
        })
    }

    /// Makes `mux` (served by relay thread `home`) the session's connection, unless a newer
    /// claim came in meanwhile (then returns false and the caller closes `mux`). `lane_key`:
    /// the key that may join extra lanes to it, if they were offered.
    pub fn go_live(
        &self,
        session: &Session,
        generation: u64,
        mux: MuxHandle,
        home: usize,
        lane_key: Option<&str>,
    ) -> bool {
        let mut live = session.live.lock().expect("session lock");
        if session.current.load(Ordering::Acquire) != generation {
            return false;
        }
        *live = Some(Live::new(mux, generation, home));
        let old = std::mem::replace(
            &mut *session.lanes.lock().expect("session lock"),
            Lanes {
                generation,
                key: lane_key.map(|k| sha256(k.as_bytes())),
                ..Lanes::default()
            },
        );
        drop(live);
        close_lanes(old.extra);
        true
    }

    /// Whether a lane on relay thread `home` with `key` would join `session_id` now (checked
    /// again by [`Registry::join_lane`]).
    pub fn check_lane(
        &self,
        owner: TokenId,
        session_id: &str,
        key: &str,
        home: usize,
    ) -> Result<Arc<Session>, LaneError> {
        let session = self
            .get(session_id)
            .ok_or_else(|| LaneError::Refused(session_id.to_owned()))?;
        self.lane_slot(&session, owner, key, home)?;
        Ok(session)
    }

    /// Joins `mux` (served by relay thread `home`) to `session`'s live connection as an extra
    /// lane, if `owner` holds the session and `key` is its connection's lane key.
    pub fn join_lane(
        &self,
        session: &Session,
        owner: TokenId,
        key: &str,
        mux: MuxHandle,
        home: usize,
    ) -> Result<Live, LaneError> {
        let generation = self.lane_slot(session, owner, key, home)?;
        let lane = Live::new(mux, generation, home);
        let mut lanes = session.lanes.lock().expect("session lock");
        // Checked again under the lock: another lane may have taken the slot meanwhile.
        if lanes.generation != generation || lanes.extra.iter().any(|l| l.home == home) {
            return Err(LaneError::Taken(session.id.clone()));
        }
        lanes.extra.push(lane.clone());
        Ok(lane)
    }

    /// The generation a lane with `key` on thread `home` would join, or why it cannot.
    fn lane_slot(
        &self,
        session: &Session,
        owner: TokenId,
        key: &str,
        home: usize,
    ) -> Result<u64, LaneError> {
        let refused = || LaneError::Refused(session.id.clone());
        if session.owner != owner {
            return Err(refused());
        }
        let main = session.live().ok_or_else(refused)?;
        let mut lanes = session.lanes.lock().expect("session lock");
        let matches = lanes
            .key
            .is_some_and(|known| bool::from(known.ct_eq(&sha256(key.as_bytes()))));
        if lanes.generation != main.generation || !matches {
            return Err(refused());
        }
        lanes.extra.retain(|l| !l.mux.is_closed());
        if main.home == home || lanes.extra.iter().any(|l| l.home == home) {
            return Err(LaneError::Taken(session.id.clone()));
        }
        Ok(main.generation)
    }

    /// Removes `lane` once its connection ended; a caller on its thread asks for a new one.
    pub fn leave_lane(&self, session: &Session, lane: &Live) {
        let mut lanes = session.lanes.lock().expect("session lock");
        lanes.extra.retain(|l| !l.mux.is_closed());
        if lanes.generation == lane.generation {
            lanes.asked &= !thread_bit(lane.home);
        }
    }

    /// Marks the session's connection as gone, unless a newer one already replaced it; its
    /// lanes close with it.
    pub fn disconnect(&self, session: &Session, generation: u64) {
        let mut live = session.live.lock().expect("session lock");
        if live.as_ref().is_some_and(|l| l.generation == generation) {
            *live = None;
            let mut lanes = session.lanes.lock().expect("session lock");
            let extra = std::mem::take(&mut lanes.extra);
            lanes.key = None;
            drop(lanes);
            drop(live);
            close_lanes(extra);
        }
    }

    /// Every live connection and lane, for shutdown.
    pub fn live_connections(&self) -> Vec<Live> {
        let mut all = Vec::new();
        for session in self.sessions.iter() {
            all.extend(session.live());
            all.extend(session.lanes.lock().expect("session lock").extra.clone());
        }
        all
    }
}

/// Relay thread `home`'s bit in [`Lanes::asked`] (there are at most
/// [`crate::lanes::MAX_THREADS`] threads).
fn thread_bit(home: usize) -> u64 {
    1u64 << (home % crate::lanes::MAX_THREADS)
}

/// Closes lanes whose connection is gone.
fn close_lanes(lanes: Vec<Live>) {
    for lane in lanes {
        lane.mux.close("the session's main connection ended");
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
