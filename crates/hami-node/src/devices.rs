//! The virtual devices a node advertises: every card `count` times
//! (deviceSplitCount), with IDs `<card UUID>-<n>` as HAMi's device plugin
//! writes them, so a device ID always tells which card it is a slot of.

use hami_api::DeviceInfo;

use crate::proto;

/// `Device.health` of a usable device.
pub const HEALTHY: &str = "Healthy";
/// `Device.health` of a device the kubelet must not hand out.
pub const UNHEALTHY: &str = "Unhealthy";

/// ID of slot `n` of the card `uuid`.
pub fn virtual_id(uuid: &str, n: u32) -> String {
    format!("{uuid}-{n}")
}

/// The card a virtual device ID belongs to, among `cards`: the card whose
/// UUID, a `-` and a slot number make up the ID.
pub fn card_of<'a>(id: &str, cards: &'a [DeviceInfo]) -> Option<&'a DeviceInfo> {
    cards.iter().find(|c| {
        id.strip_prefix(c.id.as_str())
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|n| n.parse::<u32>().is_ok_and(|n| n < c.count))
    })
}

/// The device list of ListAndWatch: for every card, `count` slots with the
/// card's health, and its NUMA node when `numa_topology` is on.
pub fn plugin_devices(cards: &[DeviceInfo], numa_topology: bool) -> Vec<proto::Device> {
    let mut out = Vec::new();
    for card in cards {
        let topology = numa_topology.then(|| proto::TopologyInfo {
            nodes: vec![proto::NumaNode {
                id: i64::from(card.numa),
            }],
        });
        for n in 0..card.count {
            out.push(proto::Device {
                id: virtual_id(&card.id, n),
                health: if card.health { HEALTHY } else { UNHEALTHY }.to_string(),
                topology: topology.clone(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(id: &str, count: u32, numa: i32, health: bool) -> DeviceInfo {
        DeviceInfo {
            id: id.into(),
            count,
            devmem: 16384,
            devcore: 100,
            numa,
            health,
            ..Default::default()
        }
    }

    #[test]
    fn every_card_times_its_split_count_with_hami_ids() {
        let cards = [
            card("GPU-8b7cc0b7-0c6a-4a4e-9f2e-1d2c3b4a5f60", 3, 0, true),
            card("GPU-b", 2, 1, false),
        ];
        let d = plugin_devices(&cards, false);
        let ids: Vec<&str> = d.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "GPU-8b7cc0b7-0c6a-4a4e-9f2e-1d2c3b4a5f60-0",
                "GPU-8b7cc0b7-0c6a-4a4e-9f2e-1d2c3b4a5f60-1",
                "GPU-8b7cc0b7-0c6a-4a4e-9f2e-1d2c3b4a5f60-2",
                "GPU-b-0",
                "GPU-b-1",
            ]
        );
        assert!(d[..3].iter().all(|d| d.health == "Healthy"));
        assert!(d[3..].iter().all(|d| d.health == "Unhealthy"));
        assert!(d.iter().all(|d| d.topology.is_none()));
        // Kubelet refuses IDs over 63 characters; a real UUID slot is 46.
        assert!(d.iter().all(|d| d.id.len() <= 63));
    }

    #[test]
    fn numa_topology_when_asked() {
        let d = plugin_devices(&[card("GPU-a", 1, 1, true)], true);
        assert_eq!(d[0].topology.as_ref().unwrap().nodes[0].id, 1);
    }

    #[test]
    fn ids_map_back_to_their_card() {
        let cards = [card("GPU-a", 2, 0, true), card("GPU-a-1", 2, 0, true)];
        assert_eq!(card_of("GPU-a-1", &cards).unwrap().id, "GPU-a");
        assert_eq!(card_of("GPU-a-1-0", &cards).unwrap().id, "GPU-a-1");
        assert!(
            card_of("GPU-a-2", &cards).is_none(),
            "slot beyond the split"
        );
        assert!(card_of("GPU-a", &cards).is_none());
        assert!(card_of("GPU-c-0", &cards).is_none());
    }
}
