//! The Prometheus text of `/metrics`, written by the `prometheus-client` encoder: every label value
//! (device paths and hostnames come from agents) is escaped by it, never formatted by hand.
//!
//! Each part of the page (the admin API's replication gauges, recovery points, launch jobs) builds
//! a [`Page`] of gauge families and returns its text; the scrape is their concatenation.

use prometheus_client::encoding::text::encode_registry;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label pairs of one sample, in the order they are written.
pub type Labels = Vec<(&'static str, String)>;

/// A family of gauges, one per label set.
pub type Gauges = Family<Labels, Gauge>;

/// The `Content-Type` of the page: the Prometheus text format (version 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A part of the metrics page: gauge families registered in the order they are written.
#[derive(Default)]
pub struct Page {
    registry: Registry,
}

impl Page {
    /// Registers a gauge family `name` (written as is: gauges get no suffix) with its help text.
    pub fn gauges(&mut self, name: &str, help: &str) -> Gauges {
        let family = Gauges::default();
        self.registry.register(name, help, family.clone());
        family
    }

    /// Registers a counter `name` (written with the `_total` suffix) holding `value`.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        let c = Counter::<u64>::default();
        c.inc_by(value);
        self.registry.register(name, help, c);
    }

    /// The Prometheus text of this part (no end marker: parts are concatenated).
    pub fn text(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; the encoder only forwards fmt errors of its writer.
        let _ = encode_registry(&mut out, &self.registry);
        out
    }
}

/// Sets the gauge of `labels` in `family` to `value` (saturating at `i64::MAX`).
pub fn set(family: &Gauges, labels: Labels, value: u64) {
    family
        .get_or_create(&labels)
        .set(i64::try_from(value).unwrap_or(i64::MAX));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut p = Page::default();
        let g = p.gauges("rehost_disk_size_bytes", "Size of a source disk");
        set(
            &g,
            vec![("machine", "m1".into()), ("device", "evil\\\"\nx".into())],
            7,
        );
        let text = p.text();
        assert!(
            text.contains(r#"rehost_disk_size_bytes{machine="m1",device="evil\\\"\nx"} 7"#),
            "{text}"
        );
        assert!(
            text.contains("# TYPE rehost_disk_size_bytes gauge\n"),
            "{text}"
        );
        // One sample line: the newline in the label did not split it.
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 1);
    }

    #[test]
    fn values_saturate() {
        let mut p = Page::default();
        let g = p.gauges("rehost_x", "x");
        set(&g, vec![], u64::MAX);
        assert!(p.text().contains(&format!("rehost_x {}", i64::MAX)));
    }
}
