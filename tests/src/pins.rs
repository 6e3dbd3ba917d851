//! Pins of the JSON that the commands document (`machines --json`, `snapshots --json`, `jobs --json`,
//! `rehost-agent status --json`, the converter's report, ...), checked against the examples kept
//! in `tests/pins/NAME.json`, so that a change of code cannot change an output unnoticed.
//!
//! A pin file holds:
//! ```json
//! { "about": "which command prints it",
//!   "example": { ...one real output... },
//!   "optional": [".disks[].detached_at"],
//!   "maps": [".counts"],
//!   "values": { "[].lifecycle": ["not-ready", "ready-for-testing"] } }
//! ```
//! Paths name fields from the root: `.field`, `[]` for every element of an array, `.*` for every
//! value of an object listed in `maps` (an object keyed by data, not by field names).
//!
//! The check: every field of the output is in the example, and every field of the example is in
//! the output unless it is `optional`; a field has the JSON type it has in the example (a `null`
//! in the example leaves the type open, and a field that is `null` in the output must be `null` or
//! open in the example); every value at a path of `values` is one of the listed strings.
//! `REHOST_PIN_BLESS=1` writes the output as the new example (after checking `values`): for
//! creating a pin, or for a change of output that is meant, reviewed in the diff of the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::Value;

fn pin_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("pins")
        .join(format!("{name}.json"))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Every path of `v` with the JSON types seen there, and the string values seen there.
#[derive(Default)]
struct Shape {
    types: BTreeMap<String, BTreeSet<&'static str>>,
    strings: BTreeMap<String, BTreeSet<String>>,
}

fn walk(v: &Value, path: &str, maps: &BTreeSet<String>, out: &mut Shape) {
    out.types
        .entry(path.to_string())
        .or_default()
        .insert(kind(v));
    match v {
        Value::String(s) => {
            out.strings
                .entry(path.to_string())
                .or_default()
                .insert(s.clone());
        }
        Value::Array(items) => {
            for item in items {
                walk(item, &format!("{path}[]"), maps, out);
            }
        }
        Value::Object(fields) => {
            let is_map = maps.contains(path);
            for (k, item) in fields {
                let p = if is_map {
                    format!("{path}.*")
                } else {
                    format!("{path}.{k}")
                };
                walk(item, &p, maps, out);
            }
        }
        _ => {}
    }
}

fn strings(v: Option<&Value>) -> BTreeSet<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Checks `actual` against the pin `name`, and panics with every difference found.
pub fn check(name: &str, actual: &Value) {
    let path = pin_path(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read pin {}: {e}", path.display()));
    let mut pin: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse pin {}: {e}", path.display()));
    let optional = strings(pin.get("optional"));
    let maps = strings(pin.get("maps"));
    let mut got = Shape::default();
    walk(actual, "", &maps, &mut got);

    let mut problems = Vec::new();
    if let Some(values) = pin.get("values").and_then(Value::as_object) {
        for (p, allowed) in values {
            let allowed = strings(Some(allowed));
            for s in got.strings.get(p).into_iter().flatten() {
                if !allowed.contains(s) {
                    problems.push(format!("{p}: value {s:?} is not one of {allowed:?}"));
                }
            }
        }
    }
    if std::env::var_os("REHOST_PIN_BLESS").is_some() {
        assert!(problems.is_empty(), "pin {name}:\n{}", problems.join("\n"));
        pin["example"] = actual.clone();
        let mut text = serde_json::to_string_pretty(&pin).expect("encode pin");
        text.push('\n');
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        return;
    }

    let mut want = Shape::default();
    walk(&pin["example"], "", &maps, &mut want);
    for (p, types) in &got.types {
        let Some(expected) = want.types.get(p) else {
            problems.push(format!("{p}: a field that the example does not have"));
            continue;
        };
        if expected.contains("null") {
            continue;
        }
        for t in types {
            if !expected.contains(t) {
                problems.push(format!("{p}: a {t}, where the example has {expected:?}"));
            }
        }
    }
    for p in want.types.keys() {
        if !got.types.contains_key(p) && !optional.contains(p) && !under_absent(p, &got, &optional)
        {
            problems.push(format!("{p}: missing from the output"));
        }
    }
    assert!(
        problems.is_empty(),
        "output differs from pin {} (REHOST_PIN_BLESS=1 rewrites it, if the change is meant):\n{}\n\noutput:\n{}",
        path.display(),
        problems.join("\n"),
        serde_json::to_string_pretty(actual).unwrap_or_default()
    );
}

/// A path below an empty array, a `null`, or an optional object absent from the output is not
/// missing: only the nearest present ancestor can say so.
fn under_absent(p: &str, got: &Shape, optional: &BTreeSet<String>) -> bool {
    let mut cut = p.len();
    while let Some(i) = p[..cut].rfind(['.', '[']) {
        let parent = &p[..i];
        if let Some(types) = got.types.get(parent) {
            // present: the element path exists only when the array has elements
            return types.contains("null")
                || (p[i..].starts_with("[]") && !got.types.contains_key(&p[..i + 2]));
        }
        if optional.contains(parent) {
            return true;
        }
        cut = i;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shape(v: &Value) -> Shape {
        let mut s = Shape::default();
        walk(v, "", &BTreeSet::new(), &mut s);
        s
    }

    #[test]
    fn paths_name_array_elements_and_fields() {
        let s = shape(&json!([{"a": 1, "b": [{"c": "x"}]}]));
        let paths: Vec<_> = s.types.keys().cloned().collect();
        assert_eq!(paths, ["", "[]", "[].a", "[].b", "[].b[]", "[].b[].c"]);
        assert_eq!(s.strings["[].b[].c"], BTreeSet::from(["x".to_string()]));
    }

    #[test]
    fn fields_below_an_empty_array_or_null_are_not_missing() {
        let got = shape(&json!({"a": [], "n": null}));
        let none = BTreeSet::new();
        assert!(under_absent(".a[].x", &got, &none));
        assert!(under_absent(".n.y", &got, &none));
        assert!(!under_absent(".b", &got, &none));
        let opt = BTreeSet::from([".o".to_string()]);
        assert!(under_absent(".o.z", &got, &opt));
    }
}
