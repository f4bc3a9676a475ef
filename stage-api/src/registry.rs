//! Maps `kind` names to stage kinds. Filled by the `pipeline` binary (one
//! line per kind); the engine only looks names up.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::stage::{DynStageKind, Erased, StageKind};

#[derive(Default, Clone)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn DynStageKind>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a stage kind. Registering the same name twice is a
    /// programming error in the binary and panics at start-up, not at run time.
    pub fn register<K: StageKind>(mut self) -> Self {
        let prev = self.kinds.insert(K::KIND, Arc::new(Erased::<K>::new()));
        assert!(prev.is_none(), "stage kind `{}` registered twice", K::KIND);
        self
    }

    pub fn get(&self, kind: &str) -> Option<&Arc<dyn DynStageKind>> {
        self.kinds.get(kind)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn DynStageKind>> {
        self.kinds.values()
    }
}
