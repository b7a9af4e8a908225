//! Latency histograms as they travel in reports: HdrHistogram's V2 + DEFLATE encoding in
//! base64 (the `HISTF...` strings other HdrHistogram tools read), so repetitions can be merged
//! exactly before percentiles are taken.

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};

/// Highest trackable latency: 100 s in nanoseconds; anything slower is clamped to it.
const HIGHEST_NS: u64 = 100_000_000_000;

/// An empty latency histogram: 1 ns to 100 s at 3 significant digits (0.1% resolution).
pub fn new_latency() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_NS, 3).expect("valid constant bounds")
}

pub fn encode(histogram: &Histogram<u64>) -> Result<String> {
    let mut bytes = Vec::new();
    V2DeflateSerializer::new()
        .serialize(histogram, &mut bytes)
        .map_err(|error| anyhow::anyhow!("encoding a histogram: {error:?}"))?;
    Ok(STANDARD.encode(bytes))
}

pub fn decode(text: &str) -> Result<Histogram<u64>> {
    let bytes = STANDARD.decode(text).context("histogram is not base64")?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|error| anyhow::anyhow!("decoding a histogram: {error:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_merges() {
        let mut first = new_latency();
        first.record(1_000).unwrap();
        first.record(2_000_000).unwrap();
        let mut second = new_latency();
        second.saturating_record(u64::MAX);
        let mut merged = decode(&encode(&first).unwrap()).unwrap();
        merged
            .add(decode(&encode(&second).unwrap()).unwrap())
            .unwrap();
        assert_eq!(merged.len(), 3);
        assert_eq!(merged.value_at_quantile(0.0), 1_000);
        assert!(merged.max() >= HIGHEST_NS);
    }
}
