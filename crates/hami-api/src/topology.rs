//! Topology pair scores, `hami.io/node-nvidia-score`:
//! `[{"uuid":"GPU-a","score":{"GPU-b":100}}]`. Higher is a faster link
//! (cross-CPU 10, same CPU 20, host bridge 30, multi-switch 40, single
//! switch 50, same board 60, N NVLinks 100 x N).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::DecodeError;

/// The link scores from one card to the others of its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePairScore {
    pub uuid: String,
    #[serde(default)]
    pub score: BTreeMap<String, i64>,
}

/// Decodes the annotation.
pub fn decode_pair_scores(source: &str, value: &str) -> Result<Vec<DevicePairScore>, DecodeError> {
    serde_json::from_str(value)
        .map_err(|e| DecodeError::new(source, value, format!("not a pair-score list: {e}")))
}

/// Encodes the annotation as the Go plugin does (map keys sorted).
pub fn encode_pair_scores(scores: &[DevicePairScore]) -> String {
    serde_json::to_string(scores).expect("pair scores always serialize")
}

/// Looks up the score between two cards, in either direction; 0 when unknown.
pub fn pair_score(scores: &[DevicePairScore], a: &str, b: &str) -> i64 {
    let one_way = |x: &str, y: &str| {
        scores
            .iter()
            .find(|s| s.uuid == x)
            .and_then(|s| s.score.get(y).copied())
    };
    one_way(a, b).or_else(|| one_way(b, a)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_lookup() {
        let v = r#"[{"uuid":"GPU-a","score":{"GPU-b":100,"GPU-c":20}},{"uuid":"GPU-b","score":{"GPU-a":100}}]"#;
        let s = decode_pair_scores("k", v).unwrap();
        assert_eq!(encode_pair_scores(&s), v);
        assert_eq!(pair_score(&s, "GPU-a", "GPU-c"), 20);
        assert_eq!(pair_score(&s, "GPU-c", "GPU-a"), 20);
        assert_eq!(pair_score(&s, "GPU-b", "GPU-c"), 0);
        assert!(decode_pair_scores("k", "[{").is_err());
    }

    proptest::proptest! {
        #[test]
        fn decoder_is_total(s in ".{0,120}") {
            let _ = decode_pair_scores("k", &s);
        }
    }
}
