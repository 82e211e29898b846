//! The virtual devices a node advertises: every card `count` times
//! (deviceSplitCount), with IDs `<card UUID>-<n>` as HAMi's device plugin
//! writes them, so a device ID always tells which card it is a slot of.

use hami_api::DeviceInfo;
use hami_api::allocation::ContainerDevice;

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

/// GetPreferredAllocation for one container: `size` IDs out of
/// `available`, keeping `must_include`, on the cards the scheduler chose
/// (`desired`, the container's entry of `hami.io/vgpu-devices-to-allocate`,
/// one slot per listed device). `None` when that cannot be done: the
/// kubelet then chooses by itself.
pub fn preferred_ids(
    available: &[String],
    must_include: &[String],
    desired: &[ContainerDevice],
    size: usize,
    cards: &[DeviceInfo],
) -> Option<Vec<String>> {
    if desired.len() < size || must_include.len() > size {
        return None;
    }
    let mut selected: Vec<String> = must_include.to_vec();
    // Cards already covered by the IDs that must be included.
    let mut covered: Vec<&str> = must_include
        .iter()
        .filter_map(|id| card_of(id, cards).map(|c| c.id.as_str()))
        .collect();
    for want in &desired[..size] {
        if let Some(i) = covered.iter().position(|c| *c == want.uuid) {
            covered.swap_remove(i);
            continue;
        }
        let pick = available.iter().find(|id| {
            !selected.contains(id) && card_of(id, cards).is_some_and(|c| c.id == want.uuid)
        })?;
        selected.push(pick.clone());
    }
    (selected.len() == size).then_some(selected)
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

    fn want(uuids: &[&str]) -> Vec<ContainerDevice> {
        uuids
            .iter()
            .map(|u| ContainerDevice {
                uuid: u.to_string(),
                vendor: "NVIDIA".into(),
                mem: 1000,
                cores: 10,
            })
            .collect()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn preferred_ids_steer_to_the_scheduler_cards() {
        let cards = [card("GPU-a", 3, 0, true), card("GPU-b", 3, 0, true)];
        let avail = strings(&["GPU-a-0", "GPU-a-1", "GPU-b-2", "GPU-b-0"]);
        assert_eq!(
            preferred_ids(&avail, &[], &want(&["GPU-b"]), 1, &cards),
            Some(strings(&["GPU-b-2"]))
        );
        assert_eq!(
            preferred_ids(&avail, &[], &want(&["GPU-b", "GPU-a"]), 2, &cards),
            Some(strings(&["GPU-b-2", "GPU-a-0"]))
        );
        // A must-include slot on a chosen card counts for that card.
        assert_eq!(
            preferred_ids(
                &avail,
                &strings(&["GPU-a-1"]),
                &want(&["GPU-b", "GPU-a"]),
                2,
                &cards
            ),
            Some(strings(&["GPU-a-1", "GPU-b-2"]))
        );
        // No free slot on the chosen card, or too few devices: no preference.
        assert_eq!(
            preferred_ids(&avail[..2], &[], &want(&["GPU-b"]), 1, &cards),
            None
        );
        assert_eq!(
            preferred_ids(&avail, &[], &want(&["GPU-a"]), 2, &cards),
            None
        );
        assert_eq!(
            preferred_ids(&avail, &[], &want(&["GPU-z"]), 1, &cards),
            None
        );
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
