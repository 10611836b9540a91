//! `--responses-store memory`: a map in this process, the oldest dropped first when a
//! cap is reached. Gone with the process.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::{StoreError, Stored, Swept};

struct Entry {
    stored: Stored,
    created_at: i64,
    bytes: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<String, Entry>,
    /// Ids oldest first.
    order: VecDeque<String>,
    bytes: u64,
}

pub struct MemoryStore {
    max_count: Option<u64>,
    max_bytes: u64,
    inner: Mutex<Inner>,
}

impl MemoryStore {
    pub fn new(max_count: Option<u64>, max_bytes: u64) -> Self {
        MemoryStore {
            max_count,
            max_bytes,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &str, cutoff: i64) -> Option<Stored> {
        self.lock()
            .map
            .get(id)
            .filter(|e| e.created_at >= cutoff)
            .map(|e| e.stored.clone())
    }

    /// Stores a response; an id already there is refused, as the databases' unique
    /// column refuses it.
    pub fn put(&self, id: &str, created_at: i64, stored: Stored) -> Result<(), StoreError> {
        let (_, bytes) = stored.texts();
        let mut inner = self.lock();
        if inner.map.contains_key(id) {
            return Err(StoreError(format!("a response `{id}` is already stored")));
        }
        let entry = Entry {
            stored,
            created_at,
            bytes,
        };
        inner.bytes += bytes;
        inner.map.insert(id.to_owned(), entry);
        inner.order.push_back(id.to_owned());
        // Both caps at once (the databases wait for the sweep).
        while (inner.bytes > self.max_bytes || self.max_count.is_some_and(|m| inner.map.len() as u64 > m))
            && inner.pop_oldest()
        {}
        Ok(())
    }

    pub fn remove(&self, id: &str, cutoff: i64) -> bool {
        let mut inner = self.lock();
        if inner.map.get(id).is_none_or(|e| e.created_at < cutoff) {
            return false;
        }
        let Some(old) = inner.map.remove(id) else { return false };
        inner.bytes -= old.bytes;
        inner.order.retain(|k| k != id);
        true
    }

    pub fn sweep(&self, cutoff: i64, max_count: Option<u64>, max_bytes: u64) -> Swept {
        let mut inner = self.lock();
        let mut swept = Swept::default();
        let expired: Vec<String> = inner
            .map
            .iter()
            .filter(|(_, e)| e.created_at < cutoff)
            .map(|(k, _)| k.clone())
            .collect();
        for id in expired {
            if let Some(old) = inner.map.remove(&id) {
                inner.bytes -= old.bytes;
                swept.expired += 1;
            }
        }
        let Inner { map, order, .. } = &mut *inner;
        order.retain(|k| map.contains_key(k));
        while (inner.bytes > max_bytes || max_count.is_some_and(|m| inner.map.len() as u64 > m)) && inner.pop_oldest() {
            swept.over_cap += 1;
        }
        swept
    }
}

impl Inner {
    fn pop_oldest(&mut self) -> bool {
        while let Some(id) = self.order.pop_front() {
            if let Some(old) = self.map.remove(&id) {
                self.bytes -= old.bytes;
                return true;
            }
        }
        false
    }
}
