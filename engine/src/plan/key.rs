//! Cache keys of stage runs and the components they are made of, kept so
//! `plan` and `why` can say WHICH component changed since the last run.
//! Where each component comes from is [`super::components`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use pipeline_cache::{Digest, KeyHasher};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::canonical;
use crate::numerics::Numerics;

/// Bump when the way keys are computed changes (every key changes with it).
pub const KEY_SCHEMA_VERSION: u32 = 1;

/// The digest of one input reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputDigest {
    pub stage: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    pub digest: Digest,
    /// The upstream has not produced its output yet: `digest` is the
    /// upstream's planned key standing in for it (the real digest is known
    /// once it ran, and this stage's key is recomputed then).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
}

/// Content digest of a file or directory outside the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalDigest {
    pub path: PathBuf,
    /// `None` when the path does not exist.
    pub digest: Option<Digest>,
}

/// Everything a stage run's key is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyComponents {
    pub kind: String,
    pub version: u32,
    /// Canonical params (defaults filled in).
    pub params: Value,
    /// Input name -> one digest per reference, in recipe order.
    pub inputs: BTreeMap<String, Vec<InputDigest>>,
    #[serde(default)]
    pub external: Vec<ExternalDigest>,
    pub seed: u64,
    /// `cpu` / `cuda` for stages that use a device (results may differ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_class: Option<String>,
    /// JSON pointers into `params` that the stage declares result-neutral
    /// (`StageKind::unkeyed_params`): kept here so the job spec carries the
    /// full params, left out of [`KeyComponents::key`] and of the diff.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unkeyed: Vec<String>,
    /// `[recipe] numerics` of a libtorch stage in reproducible mode (its
    /// results are then the recipe's, not the host's); none otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numerics: Option<Numerics>,
}

impl KeyComponents {
    pub fn key(&self) -> Digest {
        let mut h = KeyHasher::new(KEY_SCHEMA_VERSION);
        h.field("kind", self.kind.as_bytes());
        h.field("version", &self.version.to_le_bytes());
        h.field("params", canonical::canonical_string(&self.keyed_params()).as_bytes());
        for (name, refs) in &self.inputs {
            for (i, r) in refs.iter().enumerate() {
                h.field(&format!("input:{name}:{i}"), &r.digest.0);
            }
        }
        // By position, not path: moving a dataset with the same content keeps the key.
        for (i, e) in self.external.iter().enumerate() {
            match &e.digest {
                Some(d) => h.field(&format!("external:{i}"), &d.0),
                None => h.field(&format!("external:{i}"), b"missing"),
            };
        }
        h.field("seed", &self.seed.to_le_bytes());
        if let Some(class) = &self.device_class {
            h.field("device", class.as_bytes());
        }
        if let Some(n) = &self.numerics {
            h.field("numerics", format!("{}:{}", n.mode.as_str(), n.threads).as_bytes());
        }
        h.finish()
    }

    /// `params` without the [`KeyComponents::unkeyed`] settings: what the key covers.
    pub fn keyed_params(&self) -> Value {
        let mut params = self.params.clone();
        for pointer in &self.unkeyed {
            remove_pointer(&mut params, pointer);
        }
        params
    }

    /// True while some upstream has not produced its output.
    pub fn has_pending_inputs(&self) -> bool {
        self.inputs.values().flatten().any(|r| r.pending)
    }

    pub fn missing_external(&self) -> impl Iterator<Item = &PathBuf> {
        self.external.iter().filter(|e| e.digest.is_none()).map(|e| &e.path)
    }
}

/// Remove the value at a JSON pointer (`/a/b`), if there is one.
fn remove_pointer(value: &mut Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else { return };
    let last = last.replace("~1", "/").replace("~0", "~");
    let parent = if parent.is_empty() { Some(value) } else { value.pointer_mut(parent) };
    if let Some(Value::Object(map)) = parent {
        map.remove(&last);
    }
}

/// One sentence saying which component differs between the previous run's
/// components and now (first difference in order of likely interest).
pub fn explain_change(stage_id: &str, prev: &KeyComponents, now: &KeyComponents) -> String {
    if prev.kind != now.kind {
        return format!("kind changed {} -> {}", prev.kind, now.kind);
    }
    if prev.version != now.version {
        return format!("code version bumped {} -> {}", prev.version, now.version);
    }
    let changes = canonical::diff(&prev.keyed_params(), &now.keyed_params());
    if !changes.is_empty() {
        let shown: Vec<String> = changes.iter().take(3).map(|c| format!("{stage_id}.{c}")).collect();
        let more = if changes.len() > 3 { format!(" (+{} more)", changes.len() - 3) } else { String::new() };
        return format!("params changed: {}{more}", shown.join(", "));
    }
    for (name, refs) in &now.inputs {
        let before = prev.inputs.get(name);
        if before.is_none_or(|b| b.len() != refs.len() || b.iter().zip(refs).any(|(x, y)| x.digest != y.digest)) {
            // Name only the references whose digest moved (all of them if the list changed shape).
            let changed: Vec<&InputDigest> = match before {
                Some(b) if b.len() == refs.len() => {
                    refs.iter().zip(b).filter(|(y, x)| x.digest != y.digest).map(|(y, _)| y).collect()
                }
                _ => refs.iter().collect(),
            };
            let ups: Vec<&str> = changed.iter().map(|r| r.stage.as_str()).collect();
            let verb = if changed.iter().any(|r| r.pending) { "will rerun" } else { "changed" };
            return format!("input `{name}` changed (upstream `{}` {verb})", ups.join("`, `"));
        }
    }
    if let Some(name) = prev.inputs.keys().find(|k| !now.inputs.contains_key(*k)) {
        return format!("input `{name}` removed");
    }
    for e in &now.external {
        let before = prev.external.iter().find(|p| p.path == e.path);
        if before.is_none_or(|b| b.digest != e.digest) {
            return format!("external input changed: {}", e.path.display());
        }
    }
    if prev.external.len() != now.external.len() {
        return "external inputs changed".to_string();
    }
    if prev.seed != now.seed {
        return format!("seed changed {} -> {}", prev.seed, now.seed);
    }
    if prev.device_class != now.device_class {
        let show = |d: &Option<String>| d.clone().unwrap_or_else(|| "none".into());
        return format!("device class changed {} -> {}", show(&prev.device_class), show(&now.device_class));
    }
    if prev.numerics != now.numerics {
        let show = |n: &Option<Numerics>| match n {
            Some(n) => format!("{} with {} threads", n.mode.as_str(), n.threads),
            None => "fast".to_string(),
        };
        return format!("numerics changed {} -> {}", show(&prev.numerics), show(&now.numerics));
    }
    "cache key schema changed".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn comps() -> KeyComponents {
        let mut inputs = BTreeMap::new();
        inputs.insert(
            "data".to_string(),
            vec![InputDigest {
                stage: "split".into(),
                output: Some("train".into()),
                digest: Digest::of_bytes(b"d"),
                pending: false,
            }],
        );
        KeyComponents {
            kind: "grpo".into(),
            version: 2,
            params: json!({"beta": 0.04, "steps": 10}),
            inputs,
            external: vec![ExternalDigest { path: "/data/x".into(), digest: Some(Digest::of_bytes(b"x")) }],
            seed: 17,
            device_class: None,
            unkeyed: Vec::new(),
            numerics: None,
        }
    }

    #[test]
    fn key_is_stable_and_sensitive_to_each_component() {
        let base = comps();
        assert_eq!(base.key(), comps().key());
        let mut reordered = comps();
        reordered.params = serde_json::from_str(r#"{"steps": 10.0, "beta": 0.04}"#).unwrap();
        assert_eq!(base.key(), reordered.key(), "param order and 10 vs 10.0 are irrelevant");

        type Mutation = Box<dyn Fn(&mut KeyComponents)>;
        let mutations: Vec<Mutation> = vec![
            Box::new(|c| c.version = 3),
            Box::new(|c| c.params = json!({"beta": 0.1, "steps": 10})),
            Box::new(|c| c.inputs.get_mut("data").unwrap()[0].digest = Digest::of_bytes(b"e")),
            Box::new(|c| c.external[0].digest = None),
            Box::new(|c| c.seed = 18),
            Box::new(|c| c.device_class = Some("cuda".into())),
            Box::new(|c| c.numerics = Some(crate::numerics::Numerics::reproducible(1))),
        ];
        for m in mutations {
            let mut c = comps();
            m(&mut c);
            assert_ne!(c.key(), base.key(), "{c:?}");
        }
        let threads = |n| KeyComponents { numerics: Some(crate::numerics::Numerics::reproducible(n)), ..comps() };
        assert_ne!(threads(1).key(), threads(2).key(), "the pinned thread count is part of the key");
        // Moving an external input with unchanged content keeps the key.
        let mut moved = comps();
        moved.external[0].path = "/elsewhere/x".into();
        assert_eq!(moved.key(), base.key());
    }

    #[test]
    fn unkeyed_params_leave_the_key_and_the_diff_but_stay_in_the_components() {
        let with_server = |url: &str, retries: u64| {
            let mut c = comps();
            c.params = json!({"beta": 0.04, "steps": 10, "http": {"url": url, "model": "m", "retries": retries}});
            c.unkeyed = vec!["/http/url".into(), "/http/retries".into(), "/not/there".into()];
            c
        };
        let a = with_server("http://a:8000/v1", 3);
        let b = with_server("http://b:9000/v1", 5);
        assert_eq!(a.key(), b.key(), "where the server is and how often to retry do not key results");
        assert_eq!(b.params["http"]["url"], "http://b:9000/v1", "the run still gets them");
        assert_eq!(a.keyed_params(), json!({"beta": 0.04, "steps": 10, "http": {"model": "m"}}));
        let mut other_model = with_server("http://a:8000/v1", 3);
        other_model.params["http"]["model"] = json!("m2");
        assert_ne!(other_model.key(), a.key(), "keyed params still key");
        let mut all_keyed = with_server("http://b:9000/v1", 5);
        all_keyed.unkeyed.clear();
        assert_ne!(all_keyed.key(), b.key());
        let prev = with_server("http://a:8000/v1", 3);
        let mut now = with_server("http://b:9000/v1", 3);
        now.seed = 18;
        assert_eq!(explain_change("e", &prev, &now), "seed changed 17 -> 18", "the url change is not news");
    }

    #[test]
    fn explanations_name_the_changed_component() {
        let prev = comps();
        let mut now = comps();
        now.params = json!({"beta": 0.1, "steps": 10});
        assert_eq!(explain_change("grpo", &prev, &now), "params changed: grpo.beta 0.04 -> 0.1");
        let mut now = comps();
        now.version = 3;
        assert_eq!(explain_change("grpo", &prev, &now), "code version bumped 2 -> 3");
        let mut now = comps();
        now.inputs.get_mut("data").unwrap()[0] =
            InputDigest { stage: "split".into(), output: None, digest: Digest::of_bytes(b"k"), pending: true };
        assert_eq!(explain_change("grpo", &prev, &now), "input `data` changed (upstream `split` will rerun)");
        let mut now = comps();
        now.external[0].digest = Some(Digest::of_bytes(b"y"));
        assert_eq!(explain_change("grpo", &prev, &now), "external input changed: /data/x");
        let mut now = comps();
        now.seed = 1;
        assert_eq!(explain_change("grpo", &prev, &now), "seed changed 17 -> 1");
    }
}
