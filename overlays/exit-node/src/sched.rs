//! Local-first service (the paper's priority queueing at exit nodes): each
//! client belongs to a class, 0 the highest. Packets wait in one bounded
//! queue per class, and the exit always serves the highest class that has
//! packets waiting. Under contention a lower class waits, and when its own
//! queue is full its new packets are dropped; a higher class is never
//! dropped to make room for a lower one.

use std::collections::VecDeque;

pub struct PriorityQueues<T> {
    queues: Vec<VecDeque<T>>,
    capacity: usize,
}

impl<T> PriorityQueues<T> {
    pub fn new(classes: usize, capacity: usize) -> PriorityQueues<T> {
        PriorityQueues {
            queues: (0..classes.max(1)).map(|_| VecDeque::new()).collect(),
            capacity,
        }
    }

    /// Queues an item; Err(item) when its class's queue is full. Classes
    /// beyond the last share the last (lowest) one.
    pub fn push(&mut self, class: u8, item: T) -> Result<(), T> {
        let class = usize::from(class).min(self.queues.len() - 1);
        if self.queues[class].len() >= self.capacity {
            return Err(item);
        }
        self.queues[class].push_back(item);
        Ok(())
    }

    /// The oldest item of the highest class waiting.
    pub fn pop(&mut self) -> Option<(u8, T)> {
        self.queues
            .iter_mut()
            .enumerate()
            .find_map(|(class, q)| q.pop_front().map(|item| (class as u8, item)))
    }

    pub fn is_empty(&self) -> bool {
        self.queues.iter().all(VecDeque::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_class_first_then_arrival_order() {
        let mut q = PriorityQueues::new(3, 10);
        q.push(2, "low-1").unwrap();
        q.push(0, "high-1").unwrap();
        q.push(1, "mid-1").unwrap();
        q.push(0, "high-2").unwrap();
        q.push(9, "beyond-the-last").unwrap();
        let order: Vec<&str> = std::iter::from_fn(|| q.pop().map(|(_, item)| item)).collect();
        assert_eq!(order, ["high-1", "high-2", "mid-1", "low-1", "beyond-the-last"]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_full_class_drops_only_its_own_packets() {
        let mut q = PriorityQueues::new(2, 2);
        q.push(1, 1).unwrap();
        q.push(1, 2).unwrap();
        assert_eq!(q.push(1, 3), Err(3));
        q.push(0, 10).unwrap();
        q.push(0, 11).unwrap();
        assert_eq!(q.push(0, 12), Err(12));
        assert_eq!(q.pop(), Some((0, 10)));
        assert_eq!(q.push(0, 12), Ok(()));
    }
}
