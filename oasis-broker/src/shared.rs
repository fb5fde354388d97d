//! Tables that many threads read often and the daemon replaces whole (the
//! rules, the compiled name rules, the joined overlays): readers take a
//! cheap snapshot, a writer swaps in a new `Arc`.

use std::sync::{Arc, RwLock};

pub type Shared<T> = Arc<RwLock<Arc<T>>>;

pub fn snapshot<T>(shared: &Shared<T>) -> Arc<T> {
    shared.read().unwrap_or_else(|e| e.into_inner()).clone()
}
