//! The watcher task: one owner of all watch state, driven by commands, poll and fetch
//! outcomes, and its own timer. Provider calls run in spawned tasks (through the
//! provider's [`Gate`]) and report back on a channel, so nothing here waits on a provider.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng as _;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::gate::Gate;
use super::stats::{Call, ProviderStats};
use super::{Event, ObjectStatus, ProviderStatus, Snapshot, Status, Trigger, WatchSettings};
use crate::error::{Error, Result};
use crate::provider::{Provider, Version};
use crate::redact::Redactor;
use crate::reference::Reference;
use crate::state::Applied;
use crate::value::{MAX_VALUE_LEN, SecretValue};

type ObjKey = (String, Option<String>, String);
type ObjId = u64;

/// What the handle asks for.
pub(super) enum Command {
    Watch {
        consumer: String,
        mappings: Vec<(String, Reference)>,
        applied: Option<Applied>,
    },
    Unwatch {
        consumer: String,
    },
    Trigger(Trigger),
    Status(oneshot::Sender<Status>),
    AddProvider {
        name: String,
        provider: Arc<dyn Provider>,
        limits: crate::spec::Limits,
        stats: Arc<ProviderStats>,
    },
    RemoveProvider {
        name: String,
    },
}

/// What a spawned provider call reports.
enum Outcome {
    Polled {
        id: ObjId,
        result: Result<Version>,
    },
    Fetched {
        id: ObjId,
        version: Version,
        result: Result<SecretValue>,
    },
}

/// A fetched object value, held once for all its consumers. Registered with the redactor
/// while held; dropping it forgets and zeroes every value it holds.
struct Held {
    version: Version,
    whole: SecretValue,
    /// The selected value (or why it is unusable) per field of the object's references.
    fields: HashMap<Option<String>, std::result::Result<SecretValue, String>>,
}

impl Held {
    fn new(version: Version, whole: SecretValue, refs: &BTreeSet<Reference>) -> Held {
        Redactor::global().register(&whole);
        let mut held = Held {
            version,
            whole,
            fields: HashMap::new(),
        };
        for r in refs {
            held.select(r);
        }
        held
    }

    /// Selects `r`'s field if not done yet.
    fn select(&mut self, r: &Reference) {
        if self.fields.contains_key(&r.field) {
            return;
        }
        let picked = if self.whole.len() > MAX_VALUE_LEN {
            Err(format!(
                "the value is {} bytes, more than the {MAX_VALUE_LEN} bytes dso delivers",
                self.whole.len()
            ))
        } else {
            match r.select(&self.whole) {
                Ok(v) => {
                    Redactor::global().register(&v);
                    Ok(v)
                }
                Err(Error::Unusable { reason, .. }) => Err(reason),
                Err(e) => Err(e.to_string()),
            }
        };
        self.fields.insert(r.field.clone(), picked);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        Redactor::global().forget(&self.whole);
        for v in self.fields.values().flatten() {
            Redactor::global().forget(v);
        }
    }
}

/// One polled object (references differing only by field share it).
struct Object {
    provider: String,
    /// The reference passed to `version` and `fetch` (the first one watched).
    probe: Reference,
    /// Every distinct reference to this object, and how many mappings use it.
    refs: HashMap<Reference, usize>,
    consumers: BTreeSet<String>,
    current: Option<Version>,
    held: Option<Held>,
    factor: u32,
    /// End of the current polling period.
    period_end: Instant,
    next_poll: Instant,
    polling: bool,
    fetching: bool,
    /// Changed (or new, or a fetch failed) and not yet handled by a window.
    pending: bool,
    failures: u32,
    last_success: Option<SystemTime>,
    last_error: Option<String>,
    /// The permanent error already reported as `Unusable` (reported once per change).
    reported: Option<String>,
    /// When a poll first returned `current` (the start of a snapshot's delivery latency).
    seen_at: Option<Instant>,
}

impl Object {
    fn ref_set(&self) -> BTreeSet<Reference> {
        self.refs.keys().cloned().collect()
    }
}

struct Consumer {
    mappings: Vec<(String, Reference)>,
    /// Version per reference last emitted (or persisted as applied at start).
    emitted: HashMap<Reference, Version>,
    /// Whether a snapshot counts as the first delivery.
    first: bool,
    /// When these mappings started being watched.
    since: Instant,
}

struct ProviderState {
    provider: Arc<dyn Provider>,
    gate: Arc<Gate>,
    /// Counters and health (up, failures, last success), shared with the handle.
    stats: Arc<ProviderStats>,
    last_error: Option<String>,
}

/// The consumers of a closed window whose objects are being fetched.
struct Batch {
    consumers: BTreeSet<String>,
    /// Fetches not answered yet.
    waiting: usize,
    /// Objects whose fetch failed: their consumers get no snapshot from this batch.
    failed: BTreeSet<ObjId>,
}

pub(super) struct Core {
    settings: WatchSettings,
    events: mpsc::Sender<Event>,
    providers: HashMap<String, ProviderState>,
    objects: HashMap<ObjId, Object>,
    index: HashMap<ObjKey, ObjId>,
    consumers: HashMap<String, Consumer>,
    next_id: ObjId,
    /// Poll schedule; stale entries (an object whose `next_poll` moved) are skipped.
    schedule: BinaryHeap<Reverse<(Instant, ObjId)>>,
    window: Option<Instant>,
    batch: Option<Batch>,
    outcomes_tx: mpsc::UnboundedSender<Outcome>,
    outcomes_rx: Option<mpsc::UnboundedReceiver<Outcome>>,
}

impl Core {
    pub(super) fn new(
        providers: &HashMap<String, Arc<dyn Provider>>,
        stats: &BTreeMap<String, Arc<ProviderStats>>,
        settings: WatchSettings,
        events: mpsc::Sender<Event>,
    ) -> Core {
        let providers = providers
            .iter()
            .map(|(name, p)| {
                let mut limits = settings.limits.get(name).cloned().unwrap_or_default();
                if p.retries_internally() {
                    // The provider's own retry already makes `retry_attempts` attempts.
                    limits.retry_attempts = 1;
                }
                let stats = Arc::clone(&stats[name]);
                let st = ProviderState {
                    provider: Arc::clone(p),
                    gate: Arc::new(Gate::new(name, limits, Arc::clone(&stats))),
                    stats,
                    last_error: None,
                };
                (name.clone(), st)
            })
            .collect();
        let (outcomes_tx, outcomes_rx) = mpsc::unbounded_channel();
        Core {
            settings,
            events,
            providers,
            objects: HashMap::new(),
            index: HashMap::new(),
            consumers: HashMap::new(),
            next_id: 0,
            schedule: BinaryHeap::new(),
            window: None,
            batch: None,
            outcomes_tx,
            outcomes_rx: Some(outcomes_rx),
        }
    }

    pub(super) async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        cancel: CancellationToken,
    ) {
        let mut outcomes = self.outcomes_rx.take().expect("run once");
        loop {
            let now = Instant::now();
            self.start_due_polls(now);
            if self.window.is_some_and(|w| w <= now) && self.batch.is_none() {
                self.window = None;
                self.close_window().await;
                continue;
            }
            let wake = self.next_wake();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                // Outcomes first: a status asked for after a call returned shows its result.
                Some(out) = outcomes.recv() => self.outcome(out).await,
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                _ = sleep_until_opt(wake) => {}
            }
        }
        debug!("watcher stopped");
        // Dropping `self` drops every held value (zeroed, forgotten by the redactor).
    }

    fn next_wake(&mut self) -> Option<Instant> {
        // Drop stale schedule entries so the timer is not woken for nothing.
        while let Some(Reverse((at, id))) = self.schedule.peek().copied() {
            match self.objects.get(&id) {
                Some(o) if o.next_poll == at && !o.polling => break,
                _ => {
                    self.schedule.pop();
                }
            }
        }
        let poll = self.schedule.peek().map(|Reverse((at, _))| *at);
        let window = if self.batch.is_none() { self.window } else { None };
        match (poll, window) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Watch {
                consumer,
                mappings,
                applied,
            } => self.watch(consumer, mappings, applied),
            Command::Unwatch { consumer } => self.unwatch(&consumer),
            Command::Trigger(which) => {
                let now = Instant::now();
                let ids: Vec<ObjId> = self
                    .objects
                    .iter()
                    .filter(|(_, o)| which == Trigger::All || which == Trigger::Provider(o.provider.clone()))
                    .map(|(id, _)| *id)
                    .collect();
                for id in ids {
                    self.reschedule(id, now);
                }
            }
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::AddProvider {
                name,
                provider,
                mut limits,
                stats,
            } => {
                if self.providers.contains_key(&name) {
                    self.reset_objects(&name);
                }
                if provider.retries_internally() {
                    limits.retry_attempts = 1;
                }
                info!(provider = %name, "provider added");
                let st = ProviderState {
                    gate: Arc::new(Gate::new(&name, limits, Arc::clone(&stats))),
                    provider,
                    stats,
                    last_error: None,
                };
                self.providers.insert(name, st);
            }
            Command::RemoveProvider { name } => {
                if self.remove_provider(&name) {
                    info!(provider = %name, "provider removed");
                }
            }
        }
    }

    /// Forgets what was read of provider `name`'s objects (a replaced instance): their
    /// held values drop (zeroed, forgotten by the redactor) and they are polled again at
    /// once, under new ids so that a call of the old instance still in flight is ignored.
    /// Consumers stay: a consumer gets a snapshot only if a version differs from the one
    /// it was handed.
    fn reset_objects(&mut self, name: &str) {
        let now = Instant::now();
        let ids: Vec<ObjId> = self
            .objects
            .iter()
            .filter(|(_, o)| o.provider == name)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(mut o) = self.objects.remove(&id) else {
                continue;
            };
            let new_id = self.next_id;
            self.next_id += 1;
            o.current = None;
            o.held = None;
            o.factor = 1;
            o.period_end = now;
            o.next_poll = now;
            o.polling = false;
            o.fetching = false;
            o.pending = false;
            o.failures = 0;
            o.last_error = None;
            o.reported = None;
            o.seen_at = None;
            self.index.insert(o.probe.object_key(), new_id);
            self.objects.insert(new_id, o);
            self.schedule.push(Reverse((now, new_id)));
        }
    }

    /// Drops provider `name`: every consumer with a mapping to it is unwatched (so that no
    /// consumer refers to an object that is gone), then any object of it left. Held values
    /// drop with their objects (zeroed, forgotten by the redactor); calls in flight report
    /// to an object that is gone and are ignored. Returns whether it was known.
    fn remove_provider(&mut self, name: &str) -> bool {
        let users: Vec<String> = self
            .consumers
            .iter()
            .filter(|(_, c)| c.mappings.iter().any(|(_, r)| r.provider == name))
            .map(|(id, _)| id.clone())
            .collect();
        for c in users {
            self.unwatch(&c);
        }
        let ids: Vec<ObjId> = self
            .objects
            .iter()
            .filter(|(_, o)| o.provider == name)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(o) = self.objects.remove(&id) {
                self.index.remove(&o.probe.object_key());
            }
        }
        self.providers.remove(name).is_some()
    }

    fn watch(&mut self, consumer: String, mappings: Vec<(String, Reference)>, applied: Option<Applied>) {
        let now = Instant::now();
        let first = applied.is_none();
        let applied = applied.unwrap_or_default();
        let emitted = mappings
            .iter()
            .filter_map(|(_, r)| {
                applied
                    .get(&(r.provider.clone(), r.raw.clone()))
                    .map(|v| (r.clone(), v.clone()))
            })
            .collect();
        // Add the new mappings before removing the old ones, so shared objects survive.
        let old = self.consumers.remove(&consumer);
        for (_, r) in &mappings {
            let key = r.object_key();
            let id = match self.index.get(&key) {
                Some(id) => *id,
                None => {
                    let id = self.next_id;
                    self.next_id += 1;
                    self.index.insert(key, id);
                    self.objects.insert(
                        id,
                        Object {
                            provider: r.provider.clone(),
                            probe: r.clone(),
                            refs: HashMap::new(),
                            consumers: BTreeSet::new(),
                            current: None,
                            held: None,
                            factor: 1,
                            period_end: now,
                            next_poll: now,
                            polling: false,
                            fetching: false,
                            pending: false,
                            failures: 0,
                            last_success: None,
                            last_error: None,
                            reported: None,
                            seen_at: None,
                        },
                    );
                    self.schedule.push(Reverse((now, id)));
                    id
                }
            };
            let obj = self.objects.get_mut(&id).expect("indexed");
            *obj.refs.entry(r.clone()).or_insert(0) += 1;
            obj.consumers.insert(consumer.clone());
            if let Some(h) = obj.held.as_mut() {
                h.select(r);
            }
            if obj.current.is_some() {
                // Already polled: this consumer is evaluated at the next window.
                obj.pending = true;
                self.window.get_or_insert(now + self.settings.debounce);
            }
        }
        self.consumers.insert(
            consumer.clone(),
            Consumer {
                mappings,
                emitted,
                first,
                since: now,
            },
        );
        if let Some(old) = old {
            self.release(&consumer, &old.mappings);
        }
    }

    fn unwatch(&mut self, consumer: &str) {
        if let Some(c) = self.consumers.remove(consumer) {
            self.release(consumer, &c.mappings);
        }
    }

    /// Drops `consumer`'s use of `mappings`' references; objects nobody uses are removed
    /// (their held values dropped).
    fn release(&mut self, consumer: &str, mappings: &[(String, Reference)]) {
        let still: BTreeSet<ObjKey> = self
            .consumers
            .get(consumer)
            .map(|c| c.mappings.iter().map(|(_, r)| r.object_key()).collect())
            .unwrap_or_default();
        for (_, r) in mappings {
            let key = r.object_key();
            let Some(&id) = self.index.get(&key) else { continue };
            let obj = self.objects.get_mut(&id).expect("indexed");
            if let Some(n) = obj.refs.get_mut(r) {
                *n -= 1;
                if *n == 0 {
                    obj.refs.remove(r);
                    let unused = obj.refs.keys().all(|o| o.field != r.field);
                    if let (Some(h), true) = (obj.held.as_mut(), unused)
                        && let Some(Ok(v)) = h.fields.remove(&r.field)
                    {
                        Redactor::global().forget(&v);
                    }
                }
            }
            if !still.contains(&key) {
                obj.consumers.remove(consumer);
            }
            if obj.consumers.is_empty() {
                self.objects.remove(&id);
                self.index.remove(&key);
            } else if obj.probe == *r && !obj.refs.contains_key(r) {
                obj.probe = obj.refs.keys().next().expect("object has references").clone();
            }
        }
    }

    fn reschedule(&mut self, id: ObjId, at: Instant) {
        if let Some(o) = self.objects.get_mut(&id) {
            o.next_poll = at;
            if !o.polling {
                self.schedule.push(Reverse((at, id)));
            }
        }
    }

    fn start_due_polls(&mut self, now: Instant) {
        while let Some(Reverse((at, id))) = self.schedule.peek().copied() {
            if at > now {
                break;
            }
            self.schedule.pop();
            let Some(obj) = self.objects.get_mut(&id) else {
                continue;
            };
            if obj.next_poll != at || obj.polling {
                continue;
            }
            obj.polling = true;
            let p = &self.providers[&obj.provider];
            let (provider, gate, probe) = (Arc::clone(&p.provider), Arc::clone(&p.gate), obj.probe.clone());
            let tx = self.outcomes_tx.clone();
            tokio::spawn(async move {
                let result = gate.run(Call::Version, || provider.version(&probe)).await;
                let _ = tx.send(Outcome::Polled { id, result });
            });
        }
    }

    async fn outcome(&mut self, out: Outcome) {
        match out {
            Outcome::Polled { id, result } => self.polled(id, result).await,
            Outcome::Fetched { id, version, result } => self.fetched(id, version, result).await,
        }
    }

    async fn polled(&mut self, id: ObjId, result: Result<Version>) {
        let now = Instant::now();
        let interval = self.settings.interval;
        let Some(obj) = self.objects.get_mut(&id) else {
            return;
        };
        obj.polling = false;
        let provider = obj.provider.clone();
        match result {
            Ok(v) => {
                obj.failures = 0;
                obj.last_success = Some(SystemTime::now());
                obj.last_error = None;
                obj.reported = None;
                let changed = obj.current.as_ref() != Some(&v);
                if changed {
                    debug!(provider = %provider, reference = %obj.probe.raw, version = %v, "version changed");
                    if obj.current.is_some() {
                        self.providers[&provider].stats.changed();
                    }
                    obj.seen_at = Some(now);
                    obj.current = Some(v);
                    obj.factor = 1;
                    obj.pending = true;
                } else {
                    obj.factor = (obj.factor * 2).min(self.settings.max_backoff_factor.max(1));
                }
                let period = interval * obj.factor;
                let start = obj.period_end.max(now);
                obj.period_end = start + period;
                // Full jitter: a uniformly random instant in the period; without it, the
                // period's end (references then poll in lockstep).
                obj.next_poll = if self.settings.jitter {
                    start + jitter(period)
                } else {
                    start + period
                };
                let (pending, at) = (obj.pending, obj.next_poll);
                self.schedule.push(Reverse((at, id)));
                if pending {
                    self.window.get_or_insert(now + self.settings.debounce);
                }
                self.provider_ok(&provider).await;
            }
            Err(e) => {
                let msg = Redactor::global().redact(&e.to_string()).into_owned();
                obj.failures += 1;
                obj.last_error = Some(msg.clone());
                let exp = interval.saturating_mul(1 << (obj.failures - 1).min(16));
                let wait = exp.min(self.settings.max_error_backoff);
                let wait = (wait / 2 + jitter(wait / 2)).max(e.retry_after().unwrap_or_default());
                obj.next_poll = now + wait;
                obj.period_end = obj.next_poll;
                self.schedule.push(Reverse((obj.next_poll, id)));
                self.call_failed(id, &provider, &e, msg).await;
            }
        }
    }

    /// A call to `provider` answered (a success, or a definite error such as not found).
    async fn provider_ok(&mut self, provider: &str) {
        let p = &self.providers[provider];
        if p.stats.answered() {
            info!(provider, "provider answers again");
            self.emit(Event::ProviderUp {
                provider: provider.to_string(),
            })
            .await;
        }
    }

    /// A call for object `id` failed with `e` (message `msg`, redacted).
    async fn call_failed(&mut self, id: ObjId, provider: &str, e: &Error, msg: String) {
        if e.is_transient() || matches!(e, Error::Auth { .. }) {
            let p = self.providers.get_mut(provider).expect("known provider");
            p.last_error = Some(msg.clone());
            if p.stats.failed() {
                warn!(provider, error = %msg, "provider down; keeping the last good values");
                self.emit(Event::ProviderDown {
                    provider: provider.to_string(),
                    error: msg,
                })
                .await;
            }
            return;
        }
        self.provider_ok(provider).await;
        // A definite answer about this reference (not found, forbidden, invalid): each
        // consumer hears it once per distinct error.
        let Some(obj) = self.objects.get_mut(&id) else {
            return;
        };
        if obj.reported.as_deref() == Some(msg.as_str()) {
            return;
        }
        obj.reported = Some(msg.clone());
        warn!(provider, reference = %obj.probe.raw, error = %msg, "reference cannot be read");
        let mut events = Vec::new();
        for c in &obj.consumers {
            let Some(cons) = self.consumers.get(c) else {
                continue;
            };
            for (_, r) in &cons.mappings {
                if r.object_key() == obj.probe.object_key() {
                    events.push(Event::Unusable {
                        consumer: c.clone(),
                        reference: r.clone(),
                        reason: msg.clone(),
                    });
                }
            }
        }
        for ev in events {
            self.emit(ev).await;
        }
    }

    /// The debounce window closed: decide which consumers need a snapshot and fetch what
    /// they need, once per object.
    async fn close_window(&mut self) {
        let mut consumers = BTreeSet::new();
        for obj in self.objects.values_mut().filter(|o| o.pending) {
            obj.pending = false;
            consumers.extend(obj.consumers.iter().cloned());
        }
        let mut wanted: BTreeSet<ObjId> = BTreeSet::new();
        let mut chosen = BTreeSet::new();
        for c in consumers {
            let Some(cons) = self.consumers.get(&c) else {
                continue;
            };
            let mut ready = true;
            let mut dirty = false;
            let mut needs = Vec::new();
            for (_, r) in &cons.mappings {
                let id = self.index[&r.object_key()];
                let obj = &self.objects[&id];
                match &obj.current {
                    None => ready = false,
                    Some(v) => {
                        if cons.emitted.get(r) != Some(v) {
                            dirty = true;
                        }
                        if obj.held.as_ref().map(|h| &h.version) != Some(v) {
                            needs.push(id);
                        }
                    }
                }
            }
            if ready && dirty {
                chosen.insert(c);
                wanted.extend(needs);
            }
        }
        if chosen.is_empty() {
            return;
        }
        let mut waiting = 0;
        for id in wanted {
            let obj = self.objects.get_mut(&id).expect("live object");
            if obj.fetching {
                continue;
            }
            obj.fetching = true;
            waiting += 1;
            let version = obj.current.clone().expect("ready objects have a version");
            let p = &self.providers[&obj.provider];
            let (provider, gate, probe) = (Arc::clone(&p.provider), Arc::clone(&p.gate), obj.probe.clone());
            let tx = self.outcomes_tx.clone();
            tokio::spawn(async move {
                let result = gate.run(Call::Fetch, || provider.fetch(&probe, &version)).await;
                let _ = tx.send(Outcome::Fetched { id, version, result });
            });
        }
        self.batch = Some(Batch {
            consumers: chosen,
            waiting,
            failed: BTreeSet::new(),
        });
        if waiting == 0 {
            self.finish_batch().await;
        }
    }

    async fn fetched(&mut self, id: ObjId, version: Version, result: Result<SecretValue>) {
        if let Some(obj) = self.objects.get_mut(&id) {
            obj.fetching = false;
            let provider = obj.provider.clone();
            match result {
                Ok(value) => {
                    debug!(provider = %provider, reference = %obj.probe.raw, version = %version, "fetched");
                    obj.held = Some(Held::new(version, value, &obj.ref_set()));
                    self.provider_ok(&provider).await;
                }
                Err(e) => {
                    let msg = Redactor::global().redact(&e.to_string()).into_owned();
                    obj.last_error = Some(msg.clone());
                    // Evaluated again after the next successful poll.
                    obj.pending = true;
                    if let Some(b) = self.batch.as_mut() {
                        b.failed.insert(id);
                    }
                    self.call_failed(id, &provider, &e, msg).await;
                }
            }
        }
        if let Some(b) = self.batch.as_mut() {
            b.waiting = b.waiting.saturating_sub(1);
            if b.waiting == 0 {
                self.finish_batch().await;
            }
        }
    }

    /// Every fetch of the batch answered: emit one snapshot per consumer whose values are
    /// all held and usable.
    async fn finish_batch(&mut self) {
        let Some(batch) = self.batch.take() else { return };
        let mut events = Vec::new();
        for c in batch.consumers {
            let Some(cons) = self.consumers.get_mut(&c) else {
                continue;
            };
            let mut values = Vec::with_capacity(cons.mappings.len());
            let mut versions = Vec::with_capacity(cons.mappings.len());
            let mut unusable = Vec::new();
            let mut complete = true;
            let mut noticed = cons.since;
            for (key, r) in &cons.mappings {
                let id = self.index[&r.object_key()];
                let obj = &self.objects[&id];
                noticed = noticed.max(obj.seen_at.unwrap_or(noticed));
                let Some(held) = obj.held.as_ref().filter(|_| !batch.failed.contains(&id)) else {
                    complete = false;
                    break;
                };
                match held.fields.get(&r.field) {
                    Some(Ok(v)) => values.push((key.clone(), v.duplicate())),
                    Some(Err(reason)) => unusable.push((r.clone(), reason.clone())),
                    None => unusable.push((r.clone(), "field not selected".to_string())),
                }
                versions.push((r.clone(), held.version.clone()));
            }
            if !complete {
                // A fetch failed; the object is pending again and retried after its next poll.
                continue;
            }
            if versions.iter().all(|(r, v)| cons.emitted.get(r) == Some(v)) {
                // Nothing this consumer has not seen (a later poll moved on meanwhile).
                continue;
            }
            if !unusable.is_empty() {
                for (reference, reason) in unusable {
                    warn!(consumer = %c, reference = %reference, reason = %reason, "value cannot be used; no snapshot");
                    events.push(Event::Unusable {
                        consumer: c.clone(),
                        reference,
                        reason,
                    });
                }
                continue;
            }
            for (r, v) in &versions {
                cons.emitted.insert(r.clone(), v.clone());
            }
            let first = cons.first;
            cons.first = false;
            info!(consumer = %c, mappings = values.len(), first, "snapshot");
            events.push(Event::Snapshot(Snapshot {
                consumer: c,
                values,
                versions,
                first,
                noticed,
            }));
        }
        for ev in events {
            self.emit(ev).await;
        }
    }

    async fn emit(&self, ev: Event) {
        // A dropped receiver means nobody listens any more; the watcher keeps polling so
        // that status stays true until the token is cancelled.
        let _ = self.events.send(ev).await;
    }

    fn status(&self) -> Status {
        let ms = |t: Option<SystemTime>| {
            t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64)
        };
        let mut providers: Vec<ProviderStatus> = self
            .providers
            .iter()
            .map(|(name, p)| ProviderStatus {
                provider: name.clone(),
                up: p.stats.up(),
                last_success_unix_ms: p.stats.last_success_unix_ms(),
                last_error: p.last_error.clone(),
                consecutive_failures: p.stats.consecutive_failures(),
            })
            .collect();
        providers.sort_by(|a, b| a.provider.cmp(&b.provider));
        let mut objects: Vec<ObjectStatus> = self
            .objects
            .values()
            .map(|o| {
                let mut references: Vec<String> = o.refs.keys().map(|r| r.raw.clone()).collect();
                references.sort();
                ObjectStatus {
                    provider: o.provider.clone(),
                    references,
                    consumers: o.consumers.len(),
                    current_version: o.current.clone(),
                    last_success_unix_ms: ms(o.last_success),
                    last_error: o.last_error.clone(),
                    consecutive_failures: o.failures,
                    backoff_factor: o.factor,
                }
            })
            .collect();
        objects.sort_by(|a, b| (&a.provider, &a.references).cmp(&(&b.provider, &b.references)));
        Status { providers, objects }
    }
}

/// A uniformly random duration in `[0, span]` (full jitter).
fn jitter(span: Duration) -> Duration {
    if span.is_zero() {
        return span;
    }
    span.mul_f64(rand::rng().random_range(0.0..=1.0))
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
