//! A small LRU cache of metadata units (L2 table slices, refcount blocks),
//! keyed by their byte offset in the image file, with dirty tracking.
//!
//! The cache never writes anything itself: the owner decides the order in
//! which dirty entries reach the disk (see the crate docs on crash ordering).

use std::collections::HashMap;

#[derive(Debug)]
struct Slot<T> {
    data: T,
    dirty: bool,
    used: u64,
}

/// LRU cache of `T` keyed by file offset.
#[derive(Debug)]
pub struct Cache<T> {
    map: HashMap<u64, Slot<T>>,
    capacity: usize,
    tick: u64,
    dirty: usize,
}

impl<T> Cache<T> {
    /// A cache holding at most `capacity` entries (at least 4).
    pub fn new(capacity: usize) -> Self {
        Cache {
            map: HashMap::new(),
            capacity: capacity.max(4),
            tick: 0,
            dirty: 0,
        }
    }

    /// Entry at `key`, marking it recently used.
    pub fn get(&mut self, key: u64) -> Option<&T> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(&key).map(|s| {
            s.used = tick;
            &s.data
        })
    }

    /// Mutable entry at `key`; marks it dirty.
    pub fn get_mut(&mut self, key: u64) -> Option<&mut T> {
        self.tick += 1;
        let tick = self.tick;
        let dirty = &mut self.dirty;
        self.map.get_mut(&key).map(|s| {
            s.used = tick;
            if !s.dirty {
                s.dirty = true;
                *dirty += 1;
            }
            &mut s.data
        })
    }

    /// Whether an insert needs an eviction first.
    pub fn is_full(&self) -> bool {
        self.map.len() >= self.capacity
    }

    /// The least recently used entry: `(key, dirty)`.
    pub fn lru(&self) -> Option<(u64, bool)> {
        self.map
            .iter()
            .min_by_key(|(_, s)| s.used)
            .map(|(k, s)| (*k, s.dirty))
    }

    /// Inserts (or replaces) an entry. The caller evicts first when full.
    pub fn insert(&mut self, key: u64, data: T, dirty: bool) {
        self.tick += 1;
        let slot = Slot {
            data,
            dirty,
            used: self.tick,
        };
        self.dirty += dirty as usize;
        if let Some(old) = self.map.insert(key, slot) {
            self.dirty -= old.dirty as usize;
        }
    }

    /// Drops an entry (dirty or not).
    pub fn remove(&mut self, key: u64) -> Option<T> {
        let s = self.map.remove(&key)?;
        self.dirty -= s.dirty as usize;
        Some(s.data)
    }

    /// Drops every entry whose key lies in `[start, end)`.
    pub fn remove_range(&mut self, start: u64, end: u64) {
        if end - start <= 64 * 4096 && self.map.len() > 64 {
            // Few candidate keys: probe them rather than scanning the map.
            let mut k = start;
            while k < end {
                self.remove(k);
                k += 512;
            }
        } else {
            let dirty = &mut self.dirty;
            self.map.retain(|k, s| {
                let keep = *k < start || *k >= end;
                if !keep && s.dirty {
                    *dirty -= 1;
                }
                keep
            });
        }
    }

    /// Whether any entry is dirty (O(1)).
    pub fn has_dirty(&self) -> bool {
        self.dirty > 0
    }

    /// Keys of dirty entries, sorted by offset.
    pub fn dirty_keys(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }

    /// Data of an entry without touching LRU state.
    pub fn peek(&self, key: u64) -> Option<&T> {
        self.map.get(&key).map(|s| &s.data)
    }

    /// Marks an entry clean (after it was written).
    pub fn mark_clean(&mut self, key: u64) {
        if let Some(s) = self.map.get_mut(&key) {
            if s.dirty {
                s.dirty = false;
                self.dirty -= 1;
            }
        }
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.map.clear();
        self.dirty = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_and_dirty_tracking() {
        let mut c: Cache<u32> = Cache::new(4);
        for k in 0..4u64 {
            c.insert(k * 512, k as u32, false);
        }
        assert!(c.is_full());
        assert_eq!(c.get(0), Some(&0));
        assert_eq!(c.lru(), Some((512, false)));
        *c.get_mut(512).expect("present") = 9;
        assert_eq!(c.dirty_keys(), vec![512]);
        assert!(c.has_dirty());
        assert_eq!(c.lru(), Some((1024, false)));
        c.mark_clean(512);
        assert!(c.dirty_keys().is_empty());
        assert!(!c.has_dirty());
        c.insert(4096, 7, true);
        c.insert(4096, 8, true);
        assert_eq!(c.dirty_keys(), vec![4096]);
        c.insert(4096, 9, false);
        assert!(!c.has_dirty());
        c.insert(8192, 1, true);
        assert_eq!(c.remove(8192), Some(1));
        assert!(!c.has_dirty());
        c.insert(8192, 1, true);
        c.remove_range(8192, 8704);
        assert!(!c.has_dirty());
        c.remove_range(0, 1024);
        assert_eq!(c.peek(0), None);
        assert_eq!(c.peek(1024), Some(&2));
    }
}
