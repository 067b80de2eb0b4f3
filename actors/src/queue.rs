//! The bounded priority queue of one replica, and how a batch is taken from it.
//!
//! Three FIFO lanes, one per [`Priority`]. The next request is the lane head with the best
//! *effective* priority: its own level, raised by one for every `aging` interval it has
//! waited, so a steady stream of high-priority work can delay low-priority work but never
//! starve it. Ties go to the request that came first.
//!
//! This module is plain data: no locks, no threads, no clock of its own (callers pass
//! `now`), so its rules are unit-tested directly.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A request's priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    fn level(self) -> u64 {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }

    /// Parses `high`, `normal` or `low`.
    pub fn parse(s: &str) -> Option<Priority> {
        match s {
            "high" => Some(Priority::High),
            "normal" => Some(Priority::Normal),
            "low" => Some(Priority::Low),
            _ => None,
        }
    }
}

/// What the queue needs to know of an item.
pub trait QueueItem {
    /// The item's priority.
    fn priority(&self) -> Priority;
    /// When it was queued.
    fn enqueued(&self) -> Instant;
    /// When its caller stops waiting.
    fn deadline(&self) -> Instant;
    /// Whether the caller has gone away.
    fn cancelled(&self) -> bool;
    /// Rows it adds to a batch.
    fn rows(&self) -> usize;
    /// Tokens it adds to a batch (text models; 0 otherwise).
    fn tokens(&self) -> usize;
    /// Whether it can share an engine call with `other` (same input shapes past the first
    /// dimension).
    fn joinable(&self, other: &Self) -> bool;
}

/// The queue is full; the item is handed back.
#[derive(Debug)]
pub struct Full<T>(pub T);

/// A batch taken from the queue.
#[derive(Debug)]
pub struct Taken<T> {
    /// Items to run together, in the order they were taken.
    pub batch: Vec<T>,
    /// Items whose deadline passed while queued: answer them TIMEOUT, never run them.
    pub expired: Vec<T>,
    /// Items whose caller went away: drop them.
    pub cancelled: Vec<T>,
}

/// A bounded three-lane priority queue with aging.
#[derive(Debug)]
pub struct RequestQueue<T> {
    lanes: [VecDeque<(u64, T)>; 3],
    seq: u64,
    capacity: usize,
    aging: Duration,
    /// Rows of every item waiting, kept as items come and go.
    rows: usize,
}

impl<T: QueueItem> RequestQueue<T> {
    /// An empty queue holding at most `capacity` items.
    pub fn new(capacity: usize, aging: Duration) -> Self {
        RequestQueue {
            lanes: [VecDeque::new(), VecDeque::new(), VecDeque::new()],
            seq: 0,
            rows: 0,
            capacity,
            aging: aging.max(Duration::from_micros(1)),
        }
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.lanes.iter().map(VecDeque::len).sum()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.lanes.iter().all(VecDeque::is_empty)
    }

    /// The most items it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Queues an item, or hands it back when the queue is full.
    pub fn push(&mut self, item: T) -> Result<(), Full<T>> {
        if self.len() >= self.capacity {
            return Err(Full(item));
        }
        self.seq += 1;
        self.rows = self.rows.saturating_add(item.rows());
        self.lanes[item.priority().level() as usize].push_back((self.seq, item));
        Ok(())
    }

    /// When the oldest waiting item was queued.
    pub fn oldest(&self) -> Option<Instant> {
        self.lanes
            .iter()
            .filter_map(|l| l.front().map(|(_, it)| it.enqueued()))
            .min()
    }

    /// Rows waiting in all lanes.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Takes the head of `lane`.
    fn pop(&mut self, lane: usize) -> Option<T> {
        let (_, it) = self.lanes[lane].pop_front()?;
        self.rows = self.rows.saturating_sub(it.rows());
        Some(it)
    }

    /// The lane whose head goes next at `now`.
    fn next_lane(&self, now: Instant) -> Option<usize> {
        let aging = self.aging.as_micros();
        self.lanes
            .iter()
            .enumerate()
            .filter_map(|(i, lane)| {
                let (seq, it) = lane.front()?;
                let waited = now.saturating_duration_since(it.enqueued()).as_micros();
                let boost = (waited / aging).min(u128::from(u64::MAX)) as u64;
                let effective = it.priority().level().saturating_sub(boost);
                Some((effective, *seq, i))
            })
            .min()
            .map(|(_, _, i)| i)
    }

    /// Takes the next batch: items in priority order while they fit in `max_rows` rows
    /// and `max_tokens` tokens (0: no token limit) and can be joined with the first. The
    /// first item is always taken, even if it alone is larger. Expired and cancelled items
    /// met on the way are taken out and returned.
    pub fn take_batch(&mut self, now: Instant, max_rows: usize, max_tokens: usize) -> Taken<T> {
        let mut taken = Taken {
            batch: Vec::new(),
            expired: Vec::new(),
            cancelled: Vec::new(),
        };
        let mut rows: usize = 0;
        let mut tokens: usize = 0;
        let token_limit = if max_tokens == 0 {
            usize::MAX
        } else {
            max_tokens
        };
        while let Some(lane) = self.next_lane(now) {
            let Some((_, head)) = self.lanes[lane].front() else {
                break;
            };
            // Expired first: the caller's timer gives up at the deadline, so a request that
            // timed out in the queue usually looks cancelled too, and it must count as a
            // timeout.
            if head.deadline() <= now {
                if let Some(it) = self.pop(lane) {
                    taken.expired.push(it);
                }
                continue;
            }
            if head.cancelled() {
                if let Some(it) = self.pop(lane) {
                    taken.cancelled.push(it);
                }
                continue;
            }
            if let Some(first) = taken.batch.first() {
                if rows.saturating_add(head.rows()) > max_rows
                    || tokens.saturating_add(head.tokens()) > token_limit
                    || !first.joinable(head)
                {
                    break;
                }
            }
            rows = rows.saturating_add(head.rows());
            tokens = tokens.saturating_add(head.tokens());
            if let Some(it) = self.pop(lane) {
                taken.batch.push(it);
            }
            if rows >= max_rows {
                break;
            }
        }
        taken
    }

    /// Takes every item out (used when a replica is given up on).
    pub fn drain_all(&mut self) -> Vec<T> {
        self.rows = 0;
        let mut out: Vec<(u64, T)> = self.lanes.iter_mut().flat_map(|l| l.drain(..)).collect();
        out.sort_by_key(|(seq, _)| *seq);
        out.into_iter().map(|(_, it)| it).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct Item {
        name: &'static str,
        priority: Priority,
        enqueued: Instant,
        deadline: Instant,
        cancelled: bool,
        rows: usize,
        tokens: usize,
        width: usize,
    }

    impl QueueItem for Item {
        fn priority(&self) -> Priority {
            self.priority
        }
        fn enqueued(&self) -> Instant {
            self.enqueued
        }
        fn deadline(&self) -> Instant {
            self.deadline
        }
        fn cancelled(&self) -> bool {
            self.cancelled
        }
        fn rows(&self) -> usize {
            self.rows
        }
        fn tokens(&self) -> usize {
            self.tokens
        }
        fn joinable(&self, other: &Self) -> bool {
            self.width == other.width
        }
    }

    fn item(name: &'static str, priority: Priority, at: Instant) -> Item {
        Item {
            name,
            priority,
            enqueued: at,
            deadline: at + Duration::from_secs(60),
            cancelled: false,
            rows: 1,
            tokens: 10,
            width: 4,
        }
    }

    fn names(items: &[Item]) -> Vec<&'static str> {
        items.iter().map(|i| i.name).collect()
    }

    #[test]
    fn rows_follow_every_way_in_and_out() {
        let t0 = Instant::now();
        let mut q = RequestQueue::new(10, Duration::from_secs(10));
        let sized = |name, rows, priority| Item {
            rows,
            ..item(name, priority, t0)
        };
        q.push(sized("a", 3, Priority::Normal)).unwrap();
        q.push(sized("b", 5, Priority::High)).unwrap();
        q.push(Item {
            cancelled: true,
            ..sized("gone", 7, Priority::High)
        })
        .unwrap();
        q.push(Item {
            deadline: t0,
            ..sized("late", 11, Priority::Low)
        })
        .unwrap();
        q.push(sized("c", 2, Priority::Low)).unwrap();
        assert_eq!(q.rows(), 28);
        // b (5) then a (3): the batch is full at 8 rows; the cancelled one met on the way
        // is taken out too.
        let taken = q.take_batch(t0, 8, 0);
        assert_eq!(names(&taken.batch), vec!["b", "a"]);
        assert_eq!(names(&taken.cancelled), vec!["gone"]);
        assert_eq!(q.rows(), 13);
        let taken = q.take_batch(t0, 8, 0);
        assert_eq!(names(&taken.expired), vec!["late"]);
        assert_eq!(names(&taken.batch), vec!["c"]);
        assert_eq!(q.rows(), 0);
        q.push(sized("d", 4, Priority::Normal)).unwrap();
        assert_eq!(q.rows(), 4);
        assert_eq!(names(&q.drain_all()), vec!["d"]);
        assert_eq!(q.rows(), 0);
    }

    #[test]
    fn high_goes_before_normal_before_low_fifo_within_a_lane() {
        let t0 = Instant::now();
        let mut q = RequestQueue::new(10, Duration::from_secs(10));
        for it in [
            item("low1", Priority::Low, t0),
            item("norm1", Priority::Normal, t0),
            item("high1", Priority::High, t0),
            item("norm2", Priority::Normal, t0),
            item("high2", Priority::High, t0),
        ] {
            q.push(it).unwrap();
        }
        let mut order = Vec::new();
        while !q.is_empty() {
            order.extend(names(&q.take_batch(t0, 1, 0).batch));
        }
        assert_eq!(order, vec!["high1", "high2", "norm1", "norm2", "low1"]);
    }

    #[test]
    fn aging_lifts_a_waiting_low_request_above_fresh_high_ones() {
        let t0 = Instant::now();
        let aging = Duration::from_millis(100);
        let mut q = RequestQueue::new(10, aging);
        q.push(item("old-low", Priority::Low, t0)).unwrap();
        let later = t0 + Duration::from_millis(250);
        q.push(item("fresh-high", Priority::High, later)).unwrap();
        // At t0 + 250ms the low request has aged two levels: effective 0, and it came first.
        assert_eq!(names(&q.take_batch(later, 1, 0).batch), vec!["old-low"]);
        assert_eq!(names(&q.take_batch(later, 1, 0).batch), vec!["fresh-high"]);
    }

    #[test]
    fn without_enough_age_high_still_wins() {
        let t0 = Instant::now();
        let mut q = RequestQueue::new(10, Duration::from_millis(100));
        q.push(item("low", Priority::Low, t0)).unwrap();
        let later = t0 + Duration::from_millis(150);
        q.push(item("high", Priority::High, later)).unwrap();
        assert_eq!(names(&q.take_batch(later, 1, 0).batch), vec!["high"]);
    }

    #[test]
    fn full_queue_hands_the_item_back() {
        let t0 = Instant::now();
        let mut q = RequestQueue::new(2, Duration::from_secs(1));
        q.push(item("a", Priority::Normal, t0)).unwrap();
        q.push(item("b", Priority::Normal, t0)).unwrap();
        let Err(Full(back)) = q.push(item("c", Priority::High, t0)) else {
            panic!("third push must fail");
        };
        assert_eq!(back.name, "c");
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn batch_respects_rows_and_joinability() {
        let t0 = Instant::now();
        let mut q = RequestQueue::new(10, Duration::from_secs(1));
        let mut wide = item("wide", Priority::Normal, t0);
        wide.width = 8;
        let mut two = item("two-rows", Priority::Normal, t0);
        two.rows = 2;
        for it in [
            item("a", Priority::Normal, t0),
            item("b", Priority::Normal, t0),
            wide,
            item("c", Priority::Normal, t0),
        ] {
            q.push(it).unwrap();
        }
        // Stops at the first item that cannot join, and keeps it for the next batch.
        assert_eq!(names(&q.take_batch(t0, 8, 0).batch), vec!["a", "b"]);
        assert_eq!(names(&q.take_batch(t0, 8, 0).batch), vec!["wide"]);
        q.push(two).unwrap();
        // Row budget: "c" (1 row) + "two-rows" (2 rows) > 2.
        assert_eq!(names(&q.take_batch(t0, 2, 0).batch), vec!["c"]);
        // A single item larger than the budget still runs, alone.
        assert_eq!(names(&q.take_batch(t0, 1, 0).batch), vec!["two-rows"]);
    }

    #[test]
    fn batch_respects_the_token_budget() {
        let t0 = Instant::now();
        let mut q = RequestQueue::new(10, Duration::from_secs(1));
        for name in ["a", "b", "c", "d"] {
            q.push(item(name, Priority::Normal, t0)).unwrap();
        }
        // 10 tokens each: a budget of 25 takes two.
        assert_eq!(names(&q.take_batch(t0, 8, 25).batch), vec!["a", "b"]);
        // A budget smaller than one item still takes that item, alone.
        assert_eq!(names(&q.take_batch(t0, 8, 5).batch), vec!["c"]);
        assert_eq!(names(&q.take_batch(t0, 8, 0).batch), vec!["d"]);
    }

    #[test]
    fn expired_and_cancelled_items_never_reach_a_batch() {
        let t0 = Instant::now();
        let mut q = RequestQueue::new(10, Duration::from_secs(1));
        let mut expired = item("expired", Priority::High, t0);
        expired.deadline = t0 + Duration::from_millis(5);
        let mut gone = item("gone", Priority::High, t0);
        gone.cancelled = true;
        q.push(expired).unwrap();
        q.push(gone).unwrap();
        q.push(item("ok", Priority::Normal, t0)).unwrap();
        let taken = q.take_batch(t0 + Duration::from_millis(10), 8, 0);
        assert_eq!(names(&taken.batch), vec!["ok"]);
        assert_eq!(names(&taken.expired), vec!["expired"]);
        assert_eq!(names(&taken.cancelled), vec!["gone"]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_request_whose_caller_gave_up_at_its_deadline_counts_as_expired() {
        let t0 = Instant::now();
        let mut q = RequestQueue::new(10, Duration::from_secs(1));
        let mut timed_out = item("timed-out", Priority::Normal, t0);
        timed_out.deadline = t0 + Duration::from_millis(5);
        timed_out.cancelled = true;
        q.push(timed_out).unwrap();
        let taken = q.take_batch(t0 + Duration::from_millis(10), 8, 0);
        assert_eq!(names(&taken.expired), vec!["timed-out"]);
        assert!(taken.cancelled.is_empty());
    }

    #[test]
    fn drain_all_keeps_arrival_order() {
        let t0 = Instant::now();
        let mut q = RequestQueue::new(10, Duration::from_secs(1));
        q.push(item("a", Priority::Low, t0)).unwrap();
        q.push(item("b", Priority::High, t0)).unwrap();
        q.push(item("c", Priority::Normal, t0)).unwrap();
        assert_eq!(q.oldest(), Some(t0));
        assert_eq!(names(&q.drain_all()), vec!["a", "b", "c"]);
    }
}
