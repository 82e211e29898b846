//! The simulator's input formats: a compact cluster description and a
//! workload of pod groups arriving and leaving over time. Both are YAML;
//! docs/simulate.md documents every field.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// A duration written as `90s`, `30m`, `2h`, `1d` or a sum like `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize)]
pub struct Seconds(pub u64);

impl Seconds {
    pub fn parse(s: &str) -> Result<Seconds, String> {
        let t = s.trim();
        if t.is_empty() {
            return Err("empty duration".into());
        }
        if let Ok(n) = t.parse::<u64>() {
            return Ok(Seconds(n));
        }
        let mut total: u64 = 0;
        let mut num = String::new();
        for c in t.chars() {
            if c.is_ascii_digit() || c == '.' {
                num.push(c);
                continue;
            }
            let unit = match c {
                's' => 1.0,
                'm' => 60.0,
                'h' => 3600.0,
                'd' => 86400.0,
                ' ' => continue,
                _ => {
                    return Err(format!(
                        "duration {s:?}: unknown unit {c:?} (use s, m, h, d)"
                    ));
                }
            };
            let n: f64 = num
                .parse()
                .map_err(|_| format!("duration {s:?}: a unit needs a number before it"))?;
            total = total.saturating_add((n * unit).round() as u64);
            num.clear();
        }
        if !num.is_empty() {
            return Err(format!("duration {s:?}: number {num:?} has no unit"));
        }
        Ok(Seconds(total))
    }
}

impl fmt::Display for Seconds {
    /// The two largest non-zero units: `45s`, `3m27s`, `1h30m`, `2d`, `1d6h`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("0s");
        }
        let parts = [
            (self.0 / 86400, "d"),
            (self.0 % 86400 / 3600, "h"),
            (self.0 % 3600 / 60, "m"),
            (self.0 % 60, "s"),
        ];
        let first = parts.iter().position(|p| p.0 > 0).unwrap_or(3);
        for (n, unit) in parts.iter().skip(first).take(2) {
            if *n > 0 {
                write!(f, "{n}{unit}")?;
            }
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Seconds(n)),
            Raw::S(s) => Seconds::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// The simulated cluster: groups of identical nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    pub nodes: Vec<NodeGroup>,
}

/// `count` nodes named `<name>-0`, `<name>-1`, ... each with the same cards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeGroup {
    pub name: String,
    pub count: u32,
    pub gpus: GpuSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GpuSpec {
    /// Cards per node.
    pub count: u32,
    /// Card type as registered, e.g. `NVIDIA A100-SXM4-80GB`.
    #[serde(rename = "type")]
    pub model: String,
    /// Device memory per card in MiB.
    pub memory: u64,
    /// Slots per card; the config's deviceSplitCount when absent.
    #[serde(default)]
    pub split: Option<u32>,
    /// NUMA node per card (one entry per card); all 0 when absent.
    #[serde(default)]
    pub numa: Option<Vec<i32>>,
    /// Pair score between any two cards of a node (e.g. 100 x NVLinks); none when absent.
    #[serde(default)]
    pub link_score: Option<i64>,
}

/// Arrival times of a group's pods within `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Evenly spaced.
    Uniform,
    /// Independent random times (a Poisson process with a fixed count).
    #[default]
    Poisson,
    /// All at `start`.
    Burst,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arrival {
    #[serde(default)]
    pub start: Seconds,
    /// The workload's horizon when absent.
    #[serde(default)]
    pub end: Option<Seconds>,
    #[serde(default)]
    pub pattern: Pattern,
}

/// How long each pod runs: fixed (`2h`) or uniform in `[min, max]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Lifetime {
    Fixed(Seconds),
    Range { min: Seconds, max: Seconds },
}

/// A group of identical pods.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodGroup {
    pub name: String,
    pub count: u32,
    pub arrival: Arrival,
    pub duration: Lifetime,
    /// Container limits, e.g. `nvidia.com/gpu: 1`, `nvidia.com/gpumem: 8000`.
    pub resources: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// The workload: pod groups over a horizon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Seed of every random draw; the same seed gives the same run.
    #[serde(default)]
    pub seed: u64,
    /// Simulated time span.
    pub horizon: Seconds,
    pub groups: Vec<PodGroup>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(Seconds::parse("90s"), Ok(Seconds(90)));
        assert_eq!(Seconds::parse("1h30m"), Ok(Seconds(5400)));
        assert_eq!(Seconds::parse("1.5h"), Ok(Seconds(5400)));
        assert_eq!(Seconds::parse("2d"), Ok(Seconds(172800)));
        assert_eq!(Seconds::parse("42"), Ok(Seconds(42)));
        assert!(Seconds::parse("3w").unwrap_err().contains("unknown unit"));
        assert!(Seconds::parse("3").is_ok());
        assert!(Seconds::parse("h").is_err());
        assert!(Seconds::parse("1h30").is_err());
        assert_eq!(Seconds(5400).to_string(), "1h30m");
        assert_eq!(Seconds(86400).to_string(), "1d");
        assert_eq!(Seconds(86400 + 6 * 3600 + 59).to_string(), "1d6h");
        assert_eq!(Seconds(207).to_string(), "3m27s");
        assert_eq!(Seconds(4 * 3600).to_string(), "4h");
        assert_eq!(Seconds(0).to_string(), "0s");
        assert_eq!(
            Seconds::parse(&Seconds(9000).to_string()),
            Ok(Seconds(9000))
        );
    }

    proptest::proptest! {
        #[test]
        fn duration_parser_is_total(s in ".{0,20}") {
            let _ = Seconds::parse(&s);
        }
    }
}
