//! One active `candles` per state topic, any number standing by.
//!
//! The lease is the one partition of `<prefix>candles-lease`, handed out by a
//! consumer group (`<group>-lease`) with the cooperative-sticky assignor: a
//! member that joins never takes it from a live holder, and the group gives it
//! to a waiting member when the holder leaves (a stop) or its session expires
//! (a crash, a hung process). The holder builds candles; a member that loses
//! the lease while it runs stops at once, without storing its state, since
//! another instance may already be building from the last stored one.
//!
//! With an instance id (static membership, `group.instance.id`), an instance
//! restarted after a crash gets its lease back at once instead of after the
//! session; without one, a crashed holder's lease waits for its session.
//!
//! The lease's consumer is polled on a thread of its own, so that the group
//! sees a live member (`max.poll.interval.ms`) whatever the service is doing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::ClientContext;

use tickpipe_kafka::consumer_config;

struct LeaseContext {
    topic: String,
    held: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    /// This instance is leaving: the revocation it causes is no loss.
    leaving: Arc<AtomicBool>,
}

impl ClientContext for LeaseContext {}

impl ConsumerContext for LeaseContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) if !tpl.elements_for_topic(&self.topic).is_empty() => {
                self.held.store(true, Ordering::Release);
                tracing::info!(topic = self.topic, "candles: this instance holds the lease");
            }
            // Held until now, and not given up by this instance: lost.
            Rebalance::Revoke(tpl)
                if !tpl.elements_for_topic(&self.topic).is_empty()
                    && self.held.swap(false, Ordering::AcqRel)
                    && !self.leaving.load(Ordering::Acquire) =>
            {
                self.lost.store(true, Ordering::Release);
                tracing::warn!(topic = self.topic, "candles: this instance no longer holds the lease");
            }
            Rebalance::Error(e) => tracing::warn!(topic = self.topic, "candles: lease rebalance: {e}"),
            _ => {}
        }
    }
}

/// Membership of the lease group; leaves the group on drop.
pub struct Lease {
    held: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Lease {
    /// Joins the lease group for `topic` (which must exist, one partition).
    pub fn join(
        brokers: &str,
        group: &str,
        topic: &str,
        session_timeout: Duration,
        instance_id: Option<&str>,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let held = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let mut cc = consumer_config(brokers, group);
        cc.set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", session_timeout.as_millis().to_string());
        if let Some(id) = instance_id {
            cc.set("group.instance.id", id);
        }
        let consumer: BaseConsumer<LeaseContext> = cc.create_with_context(LeaseContext {
            topic: topic.to_owned(),
            held: held.clone(),
            lost: lost.clone(),
            leaving: stop.clone(),
        })?;
        consumer.subscribe(&[topic])?;
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("candles-lease".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    // The topic holds no records: a poll serves the group.
                    if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
                        tracing::debug!("candles: lease consumer: {e}");
                    }
                }
                // Leave the group now, so that a standby takes over at once.
                consumer.unsubscribe();
                let _ = consumer.poll(Duration::from_millis(100));
            })
            .map_err(|e| rdkafka::error::KafkaError::Subscription(e.to_string()))?;
        Ok(Lease {
            held,
            lost,
            stop,
            thread: Some(thread),
        })
    }

    /// Whether this instance holds the lease now.
    pub fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// Whether this instance held the lease and lost it.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
