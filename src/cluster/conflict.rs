//! Detection of two nodes that run with the same `--cluster-node-id`.
//!
//! Chitchat identifies members by name, generation and address, so a second
//! process with a taken index joins like any node. The other nodes then send
//! that index's forwarded consumptions to the newer generation only, and the
//! tickets the older one issues are rejected everywhere but on itself. A node
//! therefore watches for other live members with its own index whose
//! heartbeat keeps rising. The previous generation of a restarted node stays
//! live for a few seconds, but its heartbeat no longer rises, so it is not
//! taken for a conflict. A rise must be seen in two checks in a row, so one
//! late gossip update of a stopped generation is not taken for one either.

use std::collections::HashMap;

use chitchat::ChitchatId;

/// Consecutive checks in which a member's heartbeat must rise before it is
/// reported.
const RISES_TO_REPORT: u32 = 2;

/// The result of one check.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Conflicts {
    /// Other live members that run with this node's index.
    pub others: Vec<ChitchatId>,
    /// Whether one of them is a newer generation, to which the other nodes
    /// send this index's tickets.
    pub superseded: bool,
}

/// The heartbeats seen of each live member with this node's index.
#[derive(Debug)]
pub struct ConflictTracker {
    own_generation: u64,
    seen: HashMap<ChitchatId, Seen>,
}

#[derive(Debug)]
struct Seen {
    heartbeat: u64,
    rises: u32,
    reported: bool,
}

impl ConflictTracker {
    pub fn new(own_generation: u64) -> Self {
        ConflictTracker {
            own_generation,
            seen: HashMap::new(),
        }
    }

    /// Updates the tracker with the live members that have this node's index,
    /// other than itself, and their heartbeats, and returns the conflicts. A
    /// member stays reported until it is no longer live.
    pub fn observe(&mut self, live: &[(ChitchatId, u64)]) -> Conflicts {
        self.seen
            .retain(|id, _| live.iter().any(|(live_id, _)| live_id == id));
        for (id, heartbeat) in live {
            let seen = self.seen.entry(id.clone()).or_insert(Seen {
                heartbeat: *heartbeat,
                rises: 0,
                reported: false,
            });
            if *heartbeat > seen.heartbeat {
                seen.rises += 1;
            } else {
                seen.rises = 0;
            }
            seen.heartbeat = *heartbeat;
            if seen.rises >= RISES_TO_REPORT {
                seen.reported = true;
            }
        }
        let mut others: Vec<ChitchatId> = self
            .seen
            .iter()
            .filter(|(_, seen)| seen.reported)
            .map(|(id, _)| id.clone())
            .collect();
        others.sort();
        let superseded = others
            .iter()
            .any(|id| id.generation_id > self.own_generation);
        Conflicts { others, superseded }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(generation: u64) -> ChitchatId {
        ChitchatId::new(
            "node-1".to_owned(),
            generation,
            "127.0.0.1:7946".parse().expect("address"),
        )
    }

    #[test]
    fn rising_heartbeat_is_reported_after_two_rises() {
        let mut tracker = ConflictTracker::new(100);
        let other = member(200);
        assert_eq!(tracker.observe(&[(other.clone(), 5)]), Conflicts::default());
        assert_eq!(tracker.observe(&[(other.clone(), 9)]), Conflicts::default());
        let conflicts = tracker.observe(&[(other.clone(), 14)]);
        assert_eq!(conflicts.others, vec![other]);
        assert!(
            conflicts.superseded,
            "a newer generation supersedes this node"
        );
    }

    #[test]
    fn older_generation_does_not_supersede() {
        let mut tracker = ConflictTracker::new(300);
        let other = member(200);
        for heartbeat in [1, 2, 3] {
            tracker.observe(&[(other.clone(), heartbeat)]);
        }
        let conflicts = tracker.observe(&[(other.clone(), 4)]);
        assert_eq!(conflicts.others, vec![other]);
        assert!(!conflicts.superseded);
    }

    #[test]
    fn one_late_update_is_not_a_conflict() {
        let mut tracker = ConflictTracker::new(300);
        let stopped = member(200);
        for heartbeat in [7, 8, 8, 8, 9, 9] {
            let conflicts = tracker.observe(&[(stopped.clone(), heartbeat)]);
            assert!(conflicts.others.is_empty(), "heartbeat {heartbeat}");
        }
    }

    #[test]
    fn member_that_is_no_longer_live_is_cleared() {
        let mut tracker = ConflictTracker::new(100);
        let other = member(200);
        for heartbeat in [1, 2, 3] {
            tracker.observe(&[(other.clone(), heartbeat)]);
        }
        assert_eq!(tracker.observe(&[(other.clone(), 3)]).others.len(), 1);
        assert_eq!(tracker.observe(&[]), Conflicts::default());
    }
}
