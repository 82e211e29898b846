//! GPU and node scores (spec section 6). Higher means fuller: binpack
//! prefers the highest, spread the lowest.

use hami_api::policy::ScoringWeights;

use crate::snapshot::{DeviceState, NodeTotals, Usage};

fn ratio(part: f64, whole: f64) -> f64 {
    if whole > 0.0 { part / whole } else { 0.0 }
}

/// `10 x (ws x (req+used)/count + wc x (cores+usedcores)/totalcore + wm x
/// (mem+usedmem)/totalmem)`.
///
/// HAMi adds the request terms only when the card's type equals the
/// request's vendor word exactly; registered types are model names
/// ("NVIDIA-Tesla T4"), so in practice a card scores by its current usage.
/// We match that, because it decides real placements.
pub fn gpu_score(
    device: &DeviceState,
    used: Usage,
    vendor_word: &str,
    request: Usage,
    weights: &ScoringWeights,
) -> f64 {
    let req = if device.info.device_type == vendor_word {
        request
    } else {
        Usage::default()
    };
    let info = &device.info;
    // HAMi scores a card without slots, compute or memory (AWS Neuron's
    // have no memory) as 0, which leaves such cards in registration order.
    if info.count == 0 || info.devcore == 0 || info.devmem == 0 {
        return 0.0;
    }
    10.0 * (weights.slot * ratio(f64::from(req.slots + used.slots), f64::from(info.count))
        + weights.core * ratio(f64::from(req.cores + used.cores), f64::from(info.devcore))
        + weights.memory * ratio((req.mem + used.mem) as f64, info.devmem as f64))
}

/// `10 x (used/count + usedcores/totalcore + usedmem/totalmem)` over the
/// node's cards, before the pod being placed.
pub fn node_score(t: &NodeTotals) -> f64 {
    10.0 * (ratio(t.used_slots as f64, t.slots as f64)
        + ratio(t.used_cores as f64, t.cores as f64)
        + ratio(t.used_mem as f64, t.mem as f64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hami_api::DeviceInfo;

    fn card(device_type: &str) -> DeviceState {
        DeviceState {
            info: DeviceInfo {
                id: "a".into(),
                count: 10,
                devmem: 1000,
                devcore: 100,
                device_type: device_type.into(),
                health: true,
                ..Default::default()
            },
            type_lower: device_type.to_lowercase(),
            cordoned: false,
            used: Usage::default(),
        }
    }

    #[test]
    fn gpu_score_formula_and_upstream_quirk() {
        let used = Usage {
            slots: 2,
            mem: 500,
            cores: 30,
        };
        let req = Usage {
            slots: 1,
            mem: 100,
            cores: 10,
        };
        let w = ScoringWeights::default();
        // Model-named card: request terms are left out.
        let s = gpu_score(&card("NVIDIA-Tesla T4"), used, "NVIDIA", req, &w);
        assert!((s - 10.0 * (0.2 + 0.3 + 0.5)).abs() < 1e-9, "{s}");
        // A card whose type is exactly the vendor word counts the request.
        let s = gpu_score(&card("NVIDIA"), used, "NVIDIA", req, &w);
        assert!((s - 10.0 * (0.3 + 0.4 + 0.6)).abs() < 1e-9, "{s}");
        let w = ScoringWeights {
            slot: 1.0,
            core: 1.0,
            memory: 3.0,
        };
        let s = gpu_score(&card("NVIDIA-Tesla T4"), used, "NVIDIA", req, &w);
        assert!((s - 10.0 * (0.2 + 0.3 + 1.5)).abs() < 1e-9, "{s}");
    }

    #[test]
    fn node_score_formula() {
        let t = NodeTotals {
            slots: 20,
            used_slots: 5,
            cores: 200,
            used_cores: 50,
            mem: 2000,
            used_mem: 1000,
        };
        assert!((node_score(&t) - 10.0 * (0.25 + 0.25 + 0.5)).abs() < 1e-9);
        assert_eq!(node_score(&NodeTotals::default()), 0.0);
    }
}
