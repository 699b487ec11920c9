//! Who is in the room, and handing each line to every other member without ever waiting.
//!
//! Each member has a bounded outbox that its connection drains to the socket. A broadcast
//! only `try_send`s: a member whose outbox is full is evicted on the spot (removed from the
//! room, its outbox closed and its [`Membership::evicted`] fired), so one slow reader can
//! never stall what the others see.
//!
//! Architecture invariant: nothing here awaits while holding the lock, and nothing here
//! writes to a socket.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{mpsc, oneshot};

use crate::protocol::Nick;

/// A member's key in the room, unique for the life of the room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemberId(u64);

/// The room: the members and their outboxes.
#[derive(Debug)]
pub struct Room {
    outbox_len: usize,
    members: Mutex<Members>,
}

#[derive(Debug, Default)]
struct Members {
    next_id: u64,
    by_id: HashMap<MemberId, Member>,
}

#[derive(Debug)]
struct Member {
    nick: Nick,
    outbox: mpsc::Sender<Arc<str>>,
    /// Dropped on eviction, which fires the member's [`Membership::evicted`].
    _evict: oneshot::Sender<()>,
}

/// A connection's side of its place in the room.
#[derive(Debug)]
pub struct Membership {
    /// The member's key, for [`Room::say`] and [`Room::leave`].
    pub id: MemberId,
    /// Lines for this member, each with its `\n`.
    pub outbox: mpsc::Receiver<Arc<str>>,
    /// Completes (with an error) when the room evicts the member because its outbox was full.
    pub evicted: oneshot::Receiver<()>,
}

impl Room {
    /// An empty room whose members each have an outbox of `outbox_len` lines.
    ///
    /// # Panics
    /// If `outbox_len` is 0.
    pub fn new(outbox_len: usize) -> Self {
        assert!(outbox_len > 0, "an outbox holds at least one line");
        Room {
            outbox_len,
            members: Mutex::new(Members::default()),
        }
    }

    /// Adds `nick` to the room and tells the others `* <nick> joined`.
    pub fn join(&self, nick: Nick) -> Membership {
        self.enter(nick, true)
    }

    /// Adds `nick` to the room without a word to the others: a member whose connection was
    /// handed over from another server, where the others already saw it join.
    pub fn rejoin(&self, nick: Nick) -> Membership {
        self.enter(nick, false)
    }

    fn enter(&self, nick: Nick, announce: bool) -> Membership {
        let (outbox_tx, outbox) = mpsc::channel(self.outbox_len);
        let (evict, evicted) = oneshot::channel();
        let mut members = self.lock();
        let id = MemberId(members.next_id);
        members.next_id += 1;
        let line: Arc<str> = format!("* {nick} joined\n").into();
        let member = Member {
            nick,
            outbox: outbox_tx,
            _evict: evict,
        };
        members.by_id.insert(id, member);
        if announce {
            members.broadcast(Some(id), &line);
        }
        Membership {
            id,
            outbox,
            evicted,
        }
    }

    /// Hands `<nick>: <text>` from member `from` to every other member. Does nothing if
    /// `from` is no longer in the room.
    pub fn say(&self, from: MemberId, text: &str) {
        let mut members = self.lock();
        let Some(member) = members.by_id.get(&from) else {
            return;
        };
        let line: Arc<str> = format!("{}: {text}\n", member.nick).into();
        members.broadcast(Some(from), &line);
    }

    /// Removes member `id` (if still there) and, when `announce`, tells the others
    /// `* <nick> left`; an evicted member is announced too, since it is gone for the others.
    pub fn leave(&self, id: MemberId, nick: &Nick, announce: bool) {
        let mut members = self.lock();
        members.by_id.remove(&id);
        if announce {
            let line: Arc<str> = format!("* {nick} left\n").into();
            members.broadcast(None, &line);
        }
    }

    /// How many members the room has.
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// Whether the room is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Members> {
        // The lock guards no invariant that a panic half-way could break.
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Members {
    /// Queues `line` for every member but `except`, evicting those whose outbox is full or
    /// whose connection is gone.
    fn broadcast(&mut self, except: Option<MemberId>, line: &Arc<str>) {
        self.by_id.retain(|id, member| {
            Some(*id) == except || member.outbox.try_send(Arc::clone(line)).is_ok()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nick(s: &str) -> Nick {
        Nick::parse(s).unwrap()
    }

    fn drain(m: &mut Membership) -> Vec<String> {
        std::iter::from_fn(|| m.outbox.try_recv().ok())
            .map(|l| l.to_string())
            .collect()
    }

    #[test]
    fn lines_go_to_the_others() {
        let room = Room::new(8);
        let mut a = room.join(nick("a"));
        let mut b = room.join(nick("b"));
        room.say(a.id, "hi");
        room.say(b.id, "yo");
        room.leave(b.id, &nick("b"), true);
        assert_eq!(drain(&mut a), ["* b joined\n", "b: yo\n", "* b left\n"]);
        assert_eq!(drain(&mut b), ["a: hi\n"]);
        assert_eq!(room.len(), 1);
    }

    #[test]
    fn a_member_rejoins_without_a_word() {
        let room = Room::new(8);
        let mut a = room.join(nick("a"));
        let b = room.rejoin(nick("b"));
        room.say(b.id, "still here");
        assert_eq!(drain(&mut a), ["b: still here\n"]);
        assert_eq!(room.len(), 2);
    }

    #[test]
    fn a_full_outbox_evicts() {
        let room = Room::new(2);
        let a = room.join(nick("a"));
        let mut slow = room.join(nick("slow"));
        for i in 0..3 {
            room.say(a.id, &i.to_string());
        }
        assert_eq!(room.len(), 1);
        assert_eq!(
            slow.evicted.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        );
        assert_eq!(drain(&mut slow), ["a: 0\n", "a: 1\n"]);
    }
}
