//! A capture's kernel counters as the tests read them: indexed by [`Counter`], so a misspelt
//! counter does not compile, and one missing from the report panics naming it and what is there.
use std::{collections::BTreeMap, fmt, ops::Index};

use sidecar_common::{CaptureReport, Counter};

/// The `counters` of a capture in `sidecar status --json`, keyed by [`Counter::name`].
pub struct BpfCounters(BTreeMap<String, u64>);

impl From<CaptureReport> for BpfCounters {
    fn from(capture: CaptureReport) -> Self {
        Self(capture.counters)
    }
}

impl Index<Counter> for BpfCounters {
    type Output = u64;

    fn index(&self, counter: Counter) -> &u64 {
        self.0.get(counter.name()).unwrap_or_else(|| {
            panic!(
                "counter {} is not in the capture's report (installed by an older build?); present: {:?}",
                counter.name(),
                self.0.keys().collect::<Vec<_>>()
            )
        })
    }
}

/// The map itself, as the assertions print it.
impl fmt::Debug for BpfCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters() -> BpfCounters {
        BpfCounters(BTreeMap::from([
            ("errors".to_string(), 0),
            ("redirected".to_string(), 3),
        ]))
    }

    #[test]
    fn reads_a_counter_by_its_variant_and_prints_the_map() {
        let counters = counters();
        assert_eq!(counters[Counter::Redirected], 3);
        assert_eq!(counters[Counter::Errors], 0);
        assert_eq!(format!("{counters:?}"), r#"{"errors": 0, "redirected": 3}"#);
    }

    #[test]
    #[should_panic(
        expected = r#"counter inbound_no_proxy is not in the capture's report (installed by an older build?); present: ["errors", "redirected"]"#
    )]
    fn a_missing_counter_panics_naming_it_and_the_keys_present() {
        let _ = counters()[Counter::InboundNoProxy];
    }
}
