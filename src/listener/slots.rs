//! The `max_connections` slots, and who may be put out of one. Anyone can open a connection;
//! only a sender with an accepted secret can make one worth keeping. So when every slot is
//! taken, a newcomer takes the slot of the oldest connection that is not in the middle of an
//! authenticated request (it is shut down), and is refused only when every slot holds one:
//! slow or idle connections cannot keep a real delivery out.

use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard};

/// Where a connection stands, for eviction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Standing {
    /// Has not sent a head with an accepted secret yet (a probe, a forger, a slow client, or
    /// a real sender whose head is still arriving): the first to go.
    Stranger,
    /// Between requests, after one with an accepted secret: idle keep-alive, the next to go.
    Idle,
    /// In a request with an accepted secret (its body, its verdict, its answer): never put out.
    Busy,
}

struct Entry {
    id: u64,
    fd: RawFd,
    standing: Standing,
}

struct Inner {
    next_id: u64,
    /// In the order of admission (oldest first), at most `max` long.
    entries: Vec<Entry>,
}

pub(super) struct Slots {
    max: usize,
    inner: Mutex<Inner>,
}

/// The outcome of [`Slots::admit`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Admission {
    /// `evicted`: an older connection was shut down to make room.
    Admitted { id: u64, evicted: bool },
    /// Every slot holds an authenticated request.
    Full,
}

impl Slots {
    pub(super) fn new(max: usize) -> Slots {
        Slots {
            max,
            inner: Mutex::new(Inner {
                next_id: 0,
                entries: Vec::with_capacity(max),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding it; and the list stays consistent if something did.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a slot for the connection on `fd`, shutting down the oldest evictable connection
    /// if none is free.
    ///
    /// # Safety
    ///
    /// `fd` must stay open until [`Slots::release`] has returned for the id given back: an
    /// eviction shuts down the descriptor, and a descriptor closed and reused meanwhile would
    /// be someone else's socket.
    pub(super) unsafe fn admit(&self, fd: RawFd) -> Admission {
        let mut inner = self.lock();
        let mut evicted = false;
        if inner.entries.len() >= self.max {
            let victim = inner
                .entries
                .iter()
                .position(|e| e.standing == Standing::Stranger)
                .or_else(|| {
                    inner
                        .entries
                        .iter()
                        .position(|e| e.standing == Standing::Idle)
                });
            let Some(victim) = victim else {
                return Admission::Full;
            };
            let victim = inner.entries.remove(victim);
            // Its thread's blocked read (or write) returns at once, and the thread ends. Under
            // the lock: the thread releases its slot (under the lock too) before closing it.
            // SAFETY: the caller of `admit` for `victim` keeps its descriptor open until its
            // release, which the lock holds back.
            unsafe { libc::shutdown(victim.fd, libc::SHUT_RDWR) };
            evicted = true;
        }
        let id = inner.next_id;
        inner.next_id += 1;
        inner.entries.push(Entry {
            id,
            fd,
            standing: Standing::Stranger,
        });
        Admission::Admitted { id, evicted }
    }

    /// Records where connection `id` stands; false if it was evicted (its socket is shut down:
    /// the caller should give up the request).
    pub(super) fn stand(&self, id: u64, standing: Standing) -> bool {
        let mut inner = self.lock();
        match inner.entries.iter_mut().find(|e| e.id == id) {
            Some(e) => {
                e.standing = standing;
                true
            }
            None => false,
        }
    }

    /// Gives the slot back (a no-op after an eviction).
    pub(super) fn release(&self, id: u64) {
        self.lock().entries.retain(|e| e.id != id);
    }

    /// Connections holding a slot now (evicted ones no longer do, even while their thread
    /// winds down).
    pub(super) fn open(&self) -> usize {
        self.lock().entries.len()
    }

    /// Connections in an authenticated request now.
    pub(super) fn busy(&self) -> usize {
        let inner = self.lock();
        inner
            .entries
            .iter()
            .filter(|e| e.standing == Standing::Busy)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A descriptor `shutdown` fails on harmlessly (not a socket): the tests check the
    /// bookkeeping, the socket side is tested over real sockets.
    const NOT_A_SOCKET: RawFd = -1;

    fn admit(s: &Slots) -> Admission {
        // SAFETY: an invalid descriptor: shutdown fails with EBADF and touches nothing.
        unsafe { s.admit(NOT_A_SOCKET) }
    }

    #[test]
    fn the_oldest_stranger_goes_first_then_the_oldest_idle_never_a_busy_one() {
        let s = Slots::new(3);
        let ids: Vec<u64> = (0..3)
            .map(|_| match admit(&s) {
                Admission::Admitted { id, evicted } => {
                    assert!(!evicted);
                    id
                }
                Admission::Full => panic!("free slots"),
            })
            .collect();
        assert!(s.stand(ids[0], Standing::Busy));
        assert!(s.stand(ids[1], Standing::Idle));
        // Full: the stranger (2) goes, although 0 and 1 are older.
        let Admission::Admitted { id: d, evicted } = admit(&s) else {
            panic!()
        };
        assert!(evicted);
        assert!(!s.stand(ids[2], Standing::Busy), "2 was evicted");
        // No stranger left once d is busy: the idle one (1) goes.
        assert!(s.stand(d, Standing::Busy));
        let Admission::Admitted { id: e, evicted } = admit(&s) else {
            panic!()
        };
        assert!(evicted);
        assert!(!s.stand(ids[1], Standing::Busy), "1 was evicted");
        assert!(s.stand(e, Standing::Busy));
        // Every slot busy: refused.
        assert_eq!(admit(&s), Admission::Full);
        assert_eq!(s.open(), 3);
        s.release(ids[0]);
        s.release(ids[0]);
        assert_eq!(s.open(), 2);
        assert!(matches!(
            admit(&s),
            Admission::Admitted { evicted: false, .. }
        ));
    }
}
