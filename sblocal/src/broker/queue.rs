//! One queue and its dead-letter sub-queue: ordering, peek-lock, settlement, expiry.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use super::message::{encode_delivery, DeliveryInfo, MessageParts};
use crate::config::QueueSpec;

/// Which sub-queue of a queue an operation is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubQueueKind {
    Main,
    DeadLetter,
}

/// How a receiver takes messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveMode {
    PeekLock,
    ReceiveAndDelete,
}

/// Why a settlement or renewal failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    #[error("The lock supplied is invalid. Either the lock expired, or the message has already been removed from the queue.")]
    LockLost,
}

/// A message handed to a receiver.
#[derive(Debug)]
pub struct Delivered {
    /// The lock token as standard UUID bytes (all zero for receive-and-delete).
    pub lock_token: [u8; 16],
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Available,
    Locked {
        token: [u8; 16],
        until: SystemTime,
    },
    Deferred,
    /// Sent for later: not visible to receivers until `at`.
    Scheduled {
        at: SystemTime,
    },
}

#[derive(Debug)]
struct Stored {
    parts: MessageParts,
    enqueued_ms: i64,
    expires_at: Option<SystemTime>,
    /// Times the message was handed out under a lock (header delivery-count shows this).
    deliveries: u32,
    state: State,
    /// Once deferred, a message returns to the deferred set (not the queue) when unlocked.
    deferred: bool,
    dead_letter_source: Option<String>,
}

#[derive(Debug, Default)]
struct SubQueue {
    next_sequence: i64,
    messages: BTreeMap<i64, Stored>,
    available: BTreeSet<i64>,
    locks: HashMap<[u8; 16], i64>,
    size_bytes: u64,
}

#[derive(Debug)]
struct QueueState {
    main: SubQueue,
    dead_letter: SubQueue,
    /// Source of lock tokens: a random prefix plus a counter, unique without a syscall each.
    token_prefix: [u8; 8],
    token_counter: u64,
}

/// Counts for one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub active: u64,
    pub dead_letter: u64,
    pub scheduled: u64,
    pub size_bytes: u64,
}

pub struct Queue {
    pub spec: QueueSpec,
    state: Mutex<QueueState>,
    waiters: Mutex<Vec<Weak<Notify>>>,
}

pub fn now_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl SubQueue {
    fn push(&mut self, stored: Stored) -> i64 {
        self.next_sequence += 1;
        let sequence = self.next_sequence;
        self.size_bytes += stored.parts.size() as u64;
        if stored.state == State::Available {
            self.available.insert(sequence);
        }
        self.messages.insert(sequence, stored);
        sequence
    }

    /// Adds a message under a sequence number it already has (from the main queue).
    fn insert(&mut self, sequence: i64, stored: Stored) {
        self.size_bytes += stored.parts.size() as u64;
        if stored.state == State::Available {
            self.available.insert(sequence);
        }
        if let Some(replaced) = self.messages.insert(sequence, stored) {
            self.size_bytes = self.size_bytes.saturating_sub(replaced.parts.size() as u64);
        }
    }

    fn remove(&mut self, sequence: i64) -> Option<Stored> {
        let stored = self.messages.remove(&sequence)?;
        self.available.remove(&sequence);
        if let State::Locked { token, .. } = stored.state {
            self.locks.remove(&token);
        }
        self.size_bytes = self.size_bytes.saturating_sub(stored.parts.size() as u64);
        Some(stored)
    }

    fn locked(&mut self, token: &[u8; 16], now: SystemTime) -> Result<i64, LockError> {
        let sequence = *self.locks.get(token).ok_or(LockError::LockLost)?;
        match self.messages.get(&sequence).map(|m| m.state) {
            Some(State::Locked { until, .. }) if until > now => Ok(sequence),
            _ => Err(LockError::LockLost),
        }
    }

    fn unlock(&mut self, sequence: i64) {
        if let Some(stored) = self.messages.get_mut(&sequence) {
            if let State::Locked { token, .. } = stored.state {
                self.locks.remove(&token);
            }
            if stored.deferred {
                stored.state = State::Deferred;
            } else {
                stored.state = State::Available;
                self.available.insert(sequence);
            }
        }
    }
}

impl Queue {
    pub fn new(spec: QueueSpec) -> Self {
        let prefix = uuid::Uuid::new_v4();
        let mut token_prefix = [0u8; 8];
        token_prefix.copy_from_slice(&prefix.as_bytes()[..8]);
        Self {
            spec,
            state: Mutex::new(QueueState {
                main: SubQueue::default(),
                dead_letter: SubQueue::default(),
                token_prefix,
                token_counter: 0,
            }),
            waiters: Mutex::new(Vec::new()),
        }
    }

    fn lock_state(&self) -> MutexGuard<'_, QueueState> {
        // A panic while holding the lock leaves consistent-enough data for a test broker.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds messages to the queue and wakes waiting receivers; returns their sequence numbers.
    pub fn enqueue(&self, messages: Vec<MessageParts>) -> Vec<i64> {
        let now = SystemTime::now();
        let mut sequences = Vec::with_capacity(messages.len());
        {
            let mut state = self.lock_state();
            for parts in messages {
                let ttl = parts
                    .ttl_ms
                    .map(|ms| Duration::from_millis(u64::from(ms)))
                    .filter(|ttl| !ttl.is_zero())
                    .map_or(self.spec.default_message_ttl, |ttl| {
                        ttl.min(self.spec.default_message_ttl)
                    });
                let visible_at = parts
                    .scheduled_enqueue_ms
                    .and_then(|ms| u64::try_from(ms).ok())
                    .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
                    .filter(|at| *at > now);
                let state_now = match visible_at {
                    Some(at) => State::Scheduled { at },
                    None => State::Available,
                };
                let enqueued = visible_at.unwrap_or(now);
                sequences.push(state.main.push(Stored {
                    parts,
                    enqueued_ms: now_ms(enqueued),
                    expires_at: enqueued.checked_add(ttl),
                    deliveries: 0,
                    state: state_now,
                    deferred: false,
                    dead_letter_source: None,
                }));
            }
        }
        self.wake();
        sequences
    }

    /// Removes scheduled messages before they appear; unknown numbers are ignored.
    pub fn cancel_scheduled(&self, sequences: &[i64]) {
        let mut state = self.lock_state();
        for sequence in sequences {
            let scheduled = matches!(
                state.main.messages.get(sequence).map(|m| m.state),
                Some(State::Scheduled { .. })
            );
            if scheduled {
                state.main.remove(*sequence);
            }
        }
    }

    /// Takes up to `max` available messages. Registers `waiter` when nothing was available.
    pub fn receive(
        &self,
        kind: SubQueueKind,
        mode: ReceiveMode,
        max: u32,
        waiter: &Arc<Notify>,
        out: &mut Vec<Delivered>,
    ) {
        let now = SystemTime::now();
        let lock_duration = self.spec.lock_duration;
        let mut dead_lettered = Vec::new();
        let mut state = self.lock_state();
        let state = &mut *state;
        let sub = match kind {
            SubQueueKind::Main => &mut state.main,
            SubQueueKind::DeadLetter => &mut state.dead_letter,
        };
        let mut taken = 0;
        while taken < max {
            let Some(sequence) = sub.available.pop_first() else {
                break;
            };
            let Some(stored) = sub.messages.get_mut(&sequence) else {
                continue;
            };
            if stored.expires_at.is_some_and(|at| at <= now) && kind == SubQueueKind::Main {
                if let Some(expired) = sub.remove(sequence) {
                    if self.spec.dead_lettering_on_message_expiration {
                        dead_lettered.push((
                            sequence,
                            expired,
                            "TTLExpiredException",
                            "The message expired and was dead lettered.",
                        ));
                    }
                }
                continue;
            }
            let info_lock;
            match mode {
                ReceiveMode::PeekLock => {
                    state.token_counter += 1;
                    let mut token = [0u8; 16];
                    token[..8].copy_from_slice(&state.token_prefix);
                    token[8..].copy_from_slice(&state.token_counter.to_be_bytes());
                    // Version-4 UUID bits keep the token a well-formed UUID.
                    token[6] = (token[6] & 0x0f) | 0x40;
                    token[8] = (token[8] & 0x3f) | 0x80;
                    let until = now + lock_duration;
                    stored.state = State::Locked { token, until };
                    sub.locks.insert(token, sequence);
                    info_lock = Some((token, now_ms(until)));
                }
                ReceiveMode::ReceiveAndDelete => info_lock = None,
            }
            let payload = encode_delivery(
                &stored.parts,
                &DeliveryInfo {
                    sequence_number: sequence,
                    enqueued_ms: stored.enqueued_ms,
                    delivery_count: stored.deliveries,
                    lock: info_lock,
                    dead_letter_source: stored.dead_letter_source.as_deref(),
                },
            );
            stored.deliveries += 1;
            out.push(Delivered {
                lock_token: info_lock.map(|(token, _)| token).unwrap_or_default(),
                payload,
            });
            if mode == ReceiveMode::ReceiveAndDelete {
                sub.remove(sequence);
            }
            taken += 1;
        }
        let empty = taken == 0;
        for (sequence, stored, reason, description) in dead_lettered {
            move_to_dead_letter(state, sequence, stored, Some(reason), Some(description));
        }
        if empty {
            self.add_waiter(waiter);
        }
    }

    fn add_waiter(&self, waiter: &Arc<Notify>) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if !waiters.iter().any(|w| w.as_ptr() == Arc::as_ptr(waiter)) {
            waiters.push(Arc::downgrade(waiter));
        }
    }

    /// Wakes every registered receiver connection (they re-register if still empty).
    pub fn wake(&self) {
        let waiters = std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|p| p.into_inner()));
        for waiter in waiters.iter().filter_map(Weak::upgrade) {
            waiter.notify_one();
        }
    }

    /// Completes (removes) a locked message.
    pub fn complete(&self, kind: SubQueueKind, token: &[u8; 16]) -> Result<(), LockError> {
        let mut state = self.lock_state();
        let sub = sub_mut(&mut state, kind);
        let sequence = sub.locked(token, SystemTime::now())?;
        sub.remove(sequence);
        Ok(())
    }

    /// Returns a locked message to the queue. `counted` is false for a release (never processed).
    pub fn abandon(
        &self,
        kind: SubQueueKind,
        token: &[u8; 16],
        counted: bool,
    ) -> Result<(), LockError> {
        {
            let mut state = self.lock_state();
            let state = &mut *state;
            let sub = sub_mut(state, kind);
            let sequence = sub.locked(token, SystemTime::now())?;
            if !counted {
                if let Some(stored) = sub.messages.get_mut(&sequence) {
                    stored.deliveries = stored.deliveries.saturating_sub(1);
                }
            }
            self.return_or_dead_letter(state, kind, sequence);
        }
        self.wake();
        Ok(())
    }

    /// Unlock after a failed delivery attempt; dead-letters once `MaxDeliveryCount` is reached.
    fn return_or_dead_letter(&self, state: &mut QueueState, kind: SubQueueKind, sequence: i64) {
        let max = self.spec.max_delivery_count;
        let sub = sub_mut(state, kind);
        let exhausted = sub
            .messages
            .get(&sequence)
            .is_some_and(|m| kind == SubQueueKind::Main && m.deliveries >= max);
        if exhausted {
            if let Some(stored) = sub.remove(sequence) {
                let description =
                    format!("Message could not be consumed after {max} delivery attempts.");
                move_to_dead_letter(
                    state,
                    sequence,
                    stored,
                    Some("MaxDeliveryCountExceeded"),
                    Some(&description),
                );
            }
        } else {
            sub.unlock(sequence);
        }
    }

    /// Defers a locked message: it stays in the queue but is no longer handed to receivers.
    pub fn defer(&self, kind: SubQueueKind, token: &[u8; 16]) -> Result<(), LockError> {
        let mut state = self.lock_state();
        let sub = sub_mut(&mut state, kind);
        let sequence = sub.locked(token, SystemTime::now())?;
        sub.locks.remove(token);
        if let Some(stored) = sub.messages.get_mut(&sequence) {
            stored.state = State::Deferred;
            stored.deferred = true;
        }
        Ok(())
    }

    /// Moves a locked message to the dead-letter queue with a reason and description.
    pub fn dead_letter(
        &self,
        kind: SubQueueKind,
        token: &[u8; 16],
        reason: Option<&str>,
        description: Option<&str>,
    ) -> Result<(), LockError> {
        let mut state = self.lock_state();
        let state = &mut *state;
        let sub = sub_mut(state, kind);
        let sequence = sub.locked(token, SystemTime::now())?;
        if kind == SubQueueKind::DeadLetter {
            // Already dead-lettered: Service Bus leaves it where it is.
            sub.unlock(sequence);
            return Ok(());
        }
        if let Some(stored) = sub.remove(sequence) {
            move_to_dead_letter(state, sequence, stored, reason, description);
        }
        Ok(())
    }

    /// Extends a lock by the queue's lock duration; returns the new expiry (ms).
    pub fn renew(&self, kind: SubQueueKind, token: &[u8; 16]) -> Result<i64, LockError> {
        let now = SystemTime::now();
        let mut state = self.lock_state();
        let sub = sub_mut(&mut state, kind);
        let sequence = sub.locked(token, now)?;
        let until = now + self.spec.lock_duration;
        if let Some(stored) = sub.messages.get_mut(&sequence) {
            stored.state = State::Locked {
                token: *token,
                until,
            };
        }
        Ok(now_ms(until))
    }

    /// Encoded messages from `from_sequence` on, in order, without locking them.
    pub fn peek(
        &self,
        kind: SubQueueKind,
        from_sequence: i64,
        count: usize,
    ) -> Vec<(i64, Vec<u8>)> {
        let mut state = self.lock_state();
        let sub = sub_mut(&mut state, kind);
        sub.messages
            .range(from_sequence..)
            .take(count)
            .map(|(sequence, stored)| {
                // Peeked messages carry no lock, locked or not.
                let lock = None;
                let payload = encode_delivery(
                    &stored.parts,
                    &DeliveryInfo {
                        sequence_number: *sequence,
                        enqueued_ms: stored.enqueued_ms,
                        delivery_count: stored.deliveries,
                        lock,
                        dead_letter_source: stored.dead_letter_source.as_deref(),
                    },
                );
                (*sequence, payload)
            })
            .collect()
    }

    /// Locks deferred messages by sequence number (receive-deferred).
    pub fn receive_deferred(&self, kind: SubQueueKind, sequences: &[i64]) -> Vec<Delivered> {
        let now = SystemTime::now();
        let mut state = self.lock_state();
        let state = &mut *state;
        let mut out = Vec::new();
        for sequence in sequences {
            state.token_counter += 1;
            let mut token = [0u8; 16];
            token[..8].copy_from_slice(&state.token_prefix);
            token[8..].copy_from_slice(&state.token_counter.to_be_bytes());
            token[6] = (token[6] & 0x0f) | 0x40;
            token[8] = (token[8] & 0x3f) | 0x80;
            let sub = match kind {
                SubQueueKind::Main => &mut state.main,
                SubQueueKind::DeadLetter => &mut state.dead_letter,
            };
            let Some(stored) = sub.messages.get_mut(sequence) else {
                continue;
            };
            if stored.state != State::Deferred {
                continue;
            }
            let until = now + self.spec.lock_duration;
            stored.state = State::Locked { token, until };
            sub.locks.insert(token, *sequence);
            let payload = encode_delivery(
                &stored.parts,
                &DeliveryInfo {
                    sequence_number: *sequence,
                    enqueued_ms: stored.enqueued_ms,
                    delivery_count: stored.deliveries,
                    lock: Some((token, now_ms(until))),
                    dead_letter_source: stored.dead_letter_source.as_deref(),
                },
            );
            stored.deliveries += 1;
            out.push(Delivered {
                lock_token: token,
                payload,
            });
        }
        out
    }

    /// Releases expired locks and drops expired messages. Returns true when receivers should look again.
    pub fn sweep(&self, now: SystemTime) -> bool {
        let changed = {
            let mut state = self.lock_state();
            let state = &mut *state;
            let mut changed = false;
            for kind in [SubQueueKind::Main, SubQueueKind::DeadLetter] {
                let sub = sub_mut(state, kind);
                let expired: Vec<i64> = sub
                    .locks
                    .values()
                    .copied()
                    .filter(|sequence| {
                        matches!(sub.messages.get(sequence).map(|m| m.state), Some(State::Locked { until, .. }) if until <= now)
                    })
                    .collect();
                for sequence in expired {
                    self.return_or_dead_letter(state, kind, sequence);
                    changed = true;
                }
            }
            let due: Vec<i64> = state
                .main
                .messages
                .iter()
                .filter(|(_, m)| matches!(m.state, State::Scheduled { at } if at <= now))
                .map(|(sequence, _)| *sequence)
                .collect();
            for sequence in due {
                state.main.unlock(sequence);
                changed = true;
            }
            let stale: Vec<i64> = state
                .main
                .messages
                .iter()
                .filter(|(_, m)| {
                    m.state == State::Available && m.expires_at.is_some_and(|at| at <= now)
                })
                .map(|(sequence, _)| *sequence)
                .collect();
            for sequence in stale {
                if let Some(stored) = state.main.remove(sequence) {
                    if self.spec.dead_lettering_on_message_expiration {
                        move_to_dead_letter(
                            state,
                            sequence,
                            stored,
                            Some("TTLExpiredException"),
                            Some("The message expired and was dead lettered."),
                        );
                    }
                }
            }
            changed
        };
        if changed {
            self.wake();
        }
        changed
    }

    /// Expires every lock now (fault injection).
    pub fn expire_all_locks(&self) {
        {
            let mut state = self.lock_state();
            for kind in [SubQueueKind::Main, SubQueueKind::DeadLetter] {
                let sub = sub_mut(&mut state, kind);
                let past = SystemTime::now() - Duration::from_millis(1);
                for sequence in sub.locks.values().copied().collect::<Vec<_>>() {
                    if let Some(stored) = sub.messages.get_mut(&sequence) {
                        if let State::Locked { token, .. } = stored.state {
                            stored.state = State::Locked { token, until: past };
                        }
                    }
                }
            }
        }
        self.sweep(SystemTime::now());
    }

    pub fn counts(&self) -> Counts {
        let state = self.lock_state();
        let scheduled = state
            .main
            .messages
            .values()
            .filter(|m| matches!(m.state, State::Scheduled { .. }))
            .count() as u64;
        Counts {
            active: state.main.messages.len() as u64 - scheduled,
            dead_letter: state.dead_letter.messages.len() as u64,
            scheduled,
            size_bytes: state.main.size_bytes + state.dead_letter.size_bytes,
        }
    }
}

fn sub_mut(state: &mut QueueState, kind: SubQueueKind) -> &mut SubQueue {
    match kind {
        SubQueueKind::Main => &mut state.main,
        SubQueueKind::DeadLetter => &mut state.dead_letter,
    }
}

/// Dead-lettered messages keep their sequence number, as in Service Bus.
fn move_to_dead_letter(
    state: &mut QueueState,
    sequence: i64,
    stored: Stored,
    reason: Option<&str>,
    description: Option<&str>,
) {
    state.dead_letter.insert(
        sequence,
        Stored {
            parts: stored.parts.dead_lettered(reason, description),
            enqueued_ms: stored.enqueued_ms,
            expires_at: None,
            deliveries: stored.deliveries,
            state: State::Available,
            deferred: false,
            dead_letter_source: None,
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn parts() -> MessageParts {
        MessageParts::parse(&Bytes::from_static(&[0x00, 0x53, 0x75, 0xa0, 0x01, 0x2a]))
            .expect("parse")
    }

    fn queue(max_delivery_count: u32) -> Queue {
        let mut spec = QueueSpec::with_defaults("q");
        spec.max_delivery_count = max_delivery_count;
        Queue::new(spec)
    }

    fn take(queue: &Queue, kind: SubQueueKind, mode: ReceiveMode) -> Vec<Delivered> {
        let mut out = Vec::new();
        queue.receive(kind, mode, 10, &Arc::new(Notify::new()), &mut out);
        out
    }

    #[test]
    fn locked_messages_stay_active_until_completed() {
        let q = queue(3);
        q.enqueue(vec![parts(), parts()]);
        let got = take(&q, SubQueueKind::Main, ReceiveMode::PeekLock);
        assert_eq!(got.len(), 2);
        assert_ne!(got[0].lock_token, got[1].lock_token);
        assert_eq!(q.counts().active, 2);
        q.complete(SubQueueKind::Main, &got[0].lock_token)
            .expect("complete");
        assert_eq!(q.counts().active, 1);
        assert_eq!(
            q.complete(SubQueueKind::Main, &got[0].lock_token),
            Err(LockError::LockLost)
        );
    }

    #[test]
    fn abandon_until_max_delivery_count_dead_letters() {
        let q = queue(2);
        q.enqueue(vec![parts()]);
        for _ in 0..2 {
            let got = take(&q, SubQueueKind::Main, ReceiveMode::PeekLock);
            assert_eq!(got.len(), 1);
            q.abandon(SubQueueKind::Main, &got[0].lock_token, true)
                .expect("abandon");
        }
        assert_eq!(q.counts().active, 0);
        assert_eq!(q.counts().dead_letter, 1);
        let peeked = q.peek(SubQueueKind::DeadLetter, 0, 10);
        assert_eq!(peeked.len(), 1);
        assert_eq!(
            peeked[0].0, 1,
            "dead-lettered messages keep their sequence number"
        );
        let dead = take(&q, SubQueueKind::DeadLetter, ReceiveMode::ReceiveAndDelete);
        assert_eq!(dead.len(), 1);
        assert_eq!(q.counts().dead_letter, 0);
    }

    #[test]
    fn expired_locks_return_messages() {
        let q = queue(5);
        q.enqueue(vec![parts()]);
        let got = take(&q, SubQueueKind::Main, ReceiveMode::PeekLock);
        assert!(take(&q, SubQueueKind::Main, ReceiveMode::PeekLock).is_empty());
        q.expire_all_locks();
        assert_eq!(
            q.complete(SubQueueKind::Main, &got[0].lock_token),
            Err(LockError::LockLost)
        );
        assert_eq!(take(&q, SubQueueKind::Main, ReceiveMode::PeekLock).len(), 1);
    }

    #[test]
    fn deferred_messages_are_peekable_not_receivable() {
        let q = queue(5);
        q.enqueue(vec![parts()]);
        let got = take(&q, SubQueueKind::Main, ReceiveMode::PeekLock);
        q.defer(SubQueueKind::Main, &got[0].lock_token)
            .expect("defer");
        assert!(take(&q, SubQueueKind::Main, ReceiveMode::PeekLock).is_empty());
        assert_eq!(q.peek(SubQueueKind::Main, 1, 10).len(), 1);
        let again = q.receive_deferred(SubQueueKind::Main, &[1]);
        assert_eq!(again.len(), 1);
        // Abandoning a deferred message leaves it deferred.
        q.abandon(SubQueueKind::Main, &again[0].lock_token, true)
            .expect("abandon");
        assert!(take(&q, SubQueueKind::Main, ReceiveMode::PeekLock).is_empty());
        let again = q.receive_deferred(SubQueueKind::Main, &[1]);
        assert_eq!(again.len(), 1);
        q.complete(SubQueueKind::Main, &again[0].lock_token)
            .expect("complete");
        assert_eq!(q.counts().active, 0);
    }

    #[test]
    fn scheduled_messages_wait_and_count_separately() {
        let q = queue(5);
        let mut later = parts();
        later.scheduled_enqueue_ms = Some(now_ms(SystemTime::now()) + 60_000);
        let sequences = q.enqueue(vec![later.clone(), later]);
        assert_eq!(q.counts().scheduled, 2);
        assert_eq!(q.counts().active, 0);
        assert!(take(&q, SubQueueKind::Main, ReceiveMode::PeekLock).is_empty());
        q.cancel_scheduled(&sequences[..1]);
        assert_eq!(q.counts().scheduled, 1);
        q.sweep(SystemTime::now() + Duration::from_secs(120));
        assert_eq!(q.counts().active, 1);
        assert_eq!(take(&q, SubQueueKind::Main, ReceiveMode::PeekLock).len(), 1);
    }

    #[test]
    fn renew_requires_a_live_lock() {
        let q = queue(5);
        q.enqueue(vec![parts()]);
        let got = take(&q, SubQueueKind::Main, ReceiveMode::PeekLock);
        assert!(q.renew(SubQueueKind::Main, &got[0].lock_token).is_ok());
        assert!(q.renew(SubQueueKind::Main, &[0; 16]).is_err());
    }

    #[test]
    fn receive_registers_waiter_and_enqueue_wakes_it() {
        let q = queue(5);
        let waiter = Arc::new(Notify::new());
        let mut out = Vec::new();
        q.receive(
            SubQueueKind::Main,
            ReceiveMode::PeekLock,
            1,
            &waiter,
            &mut out,
        );
        assert!(out.is_empty());
        q.enqueue(vec![parts()]);
        // notify_one stores a permit: the waiter observes it without having been polled before.
        let notified = waiter.notified();
        tokio::pin!(notified);
        assert!(futures_poll_ready(notified.as_mut()));
    }

    fn futures_poll_ready<F: std::future::Future>(future: std::pin::Pin<&mut F>) -> bool {
        let waker = std::task::Waker::noop();
        let mut context = std::task::Context::from_waker(waker);
        future.poll(&mut context).is_ready()
    }
}
