//! Why a node was rejected, counted per card the way HAMi reports it
//! ("2/8 CardInsufficientMemory, 6/8 CardTypeMismatch").

use std::fmt;

/// Why one card (or the node) could not take a container. Names follow
/// HAMi's where HAMi has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Reason {
    /// HAMi's name for an unhealthy card.
    CardNotHealth,
    CardCordoned,
    CardTypeMismatch,
    CardModeMismatch,
    CardUuidMismatch,
    CardTimeSlicingExhausted,
    CardInsufficientMemory,
    CardInsufficientCore,
    ExclusiveDeviceAllocateConflict,
    CardComputeUnitsExhausted,
    CardInUseMutex,
    NumaNotFit,
    AllocatedCardsInsufficientRequest,
    NodeInsufficientDevice,
    /// A vendor rule tying a pod's containers to the same card (Mthreads,
    /// MetaX) ruled the card out.
    CardNotFoundCustomFilterRule,
    /// The pod's sharing mode is not one the node offers (Ascend soft
    /// split), or no profile holds the request (Enflame).
    ModeNotFit,
    /// MetaX sGPU: the card in use runs another QoS policy.
    CardQosPolicyMismatch,
}

impl Reason {
    pub const ALL: [Reason; 17] = [
        Reason::CardNotHealth,
        Reason::CardCordoned,
        Reason::CardTypeMismatch,
        Reason::CardModeMismatch,
        Reason::CardUuidMismatch,
        Reason::CardTimeSlicingExhausted,
        Reason::CardInsufficientMemory,
        Reason::CardInsufficientCore,
        Reason::ExclusiveDeviceAllocateConflict,
        Reason::CardComputeUnitsExhausted,
        Reason::CardInUseMutex,
        Reason::NumaNotFit,
        Reason::AllocatedCardsInsufficientRequest,
        Reason::NodeInsufficientDevice,
        Reason::CardNotFoundCustomFilterRule,
        Reason::ModeNotFit,
        Reason::CardQosPolicyMismatch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::CardNotHealth => "CardNotHealth",
            Reason::CardCordoned => "CardCordoned",
            Reason::CardTypeMismatch => "CardTypeMismatch",
            Reason::CardModeMismatch => "CardModeMismatch",
            Reason::CardUuidMismatch => "CardUuidMismatch",
            Reason::CardTimeSlicingExhausted => "CardTimeSlicingExhausted",
            Reason::CardInsufficientMemory => "CardInsufficientMemory",
            Reason::CardInsufficientCore => "CardInsufficientCore",
            Reason::ExclusiveDeviceAllocateConflict => "ExclusiveDeviceAllocateConflict",
            Reason::CardComputeUnitsExhausted => "CardComputeUnitsExhausted",
            Reason::CardInUseMutex => "CardInUseMutex",
            Reason::NumaNotFit => "NumaNotFit",
            Reason::AllocatedCardsInsufficientRequest => "AllocatedCardsInsufficientRequest",
            Reason::NodeInsufficientDevice => "NodeInsufficientDevice",
            Reason::CardNotFoundCustomFilterRule => "CardNotFoundCustomFilterRule",
            Reason::ModeNotFit => "ModeNotFit",
            Reason::CardQosPolicyMismatch => "CardQosPolicyMismatch",
        }
    }

    /// One line a person can act on.
    pub fn explain(self) -> &'static str {
        match self {
            Reason::CardNotHealth => "card reported unhealthy",
            Reason::CardCordoned => "card is cordoned (hami.io/device-cordon)",
            Reason::CardTypeMismatch => "card type rejected by use-gputype/nouse-gputype",
            Reason::CardModeMismatch => "card mode differs from nvidia.com/vgpu-mode",
            Reason::CardUuidMismatch => "card UUID rejected by use-gpuuuid/nouse-gpuuuid",
            Reason::CardTimeSlicingExhausted => "every slot of the card is taken",
            Reason::CardInsufficientMemory => "not enough free device memory",
            Reason::CardInsufficientCore => "not enough free compute (gpucores)",
            Reason::ExclusiveDeviceAllocateConflict => {
                "exclusive request (gpucores 100) but the card is in use"
            }
            Reason::CardComputeUnitsExhausted => "card compute fully allocated",
            Reason::CardInUseMutex => "mutex policy and the card is in use",
            Reason::NumaNotFit => "cards that fit are spread over NUMA nodes",
            Reason::AllocatedCardsInsufficientRequest => "fewer fitting cards than requested",
            Reason::NodeInsufficientDevice => "node has no usable devices",
            Reason::CardNotFoundCustomFilterRule => {
                "the vendor keeps all of a pod's containers on one card, and that card is another"
            }
            Reason::ModeNotFit => "the node does not offer the sharing mode or size asked for",
            Reason::CardQosPolicyMismatch => {
                "the card in use runs another QoS policy (metax-tech.com/sgpu-qos-policy)"
            }
        }
    }
}

/// Per-reason card counts for one rejected node, compact so that explaining
/// 10,000 rejected nodes costs no allocation until it is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rejection {
    /// Cards examined for the failing container.
    pub cards: u16,
    counts: [u16; Reason::ALL.len()],
    /// Index (allocation order) of the container that did not fit.
    pub container: u16,
}

impl Rejection {
    pub fn node(reason: Reason) -> Rejection {
        let mut r = Rejection::default();
        r.add(reason, 1);
        r
    }

    /// An empty rejection for a node with `cards` cards.
    pub fn for_cards(cards: usize) -> Rejection {
        Rejection {
            cards: cards.min(u16::MAX as usize) as u16,
            ..Default::default()
        }
    }

    pub fn add(&mut self, reason: Reason, n: u16) {
        self.counts[reason as usize] = self.counts[reason as usize].saturating_add(n);
    }

    pub fn count(&self, reason: Reason) -> u16 {
        self.counts[reason as usize]
    }

    /// The reasons present, most frequent first.
    pub fn reasons(&self) -> Vec<(Reason, u16)> {
        let mut v: Vec<_> = Reason::ALL
            .iter()
            .map(|&r| (r, self.count(r)))
            .filter(|&(_, n)| n > 0)
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// The most frequent reason.
    pub fn main_reason(&self) -> Option<Reason> {
        self.reasons().first().map(|&(r, _)| r)
    }
}

impl fmt::Display for Rejection {
    /// HAMi's format: `2/8 CardInsufficientMemory, 6/8 CardTypeMismatch`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (r, n)) in self.reasons().into_iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            if r == Reason::NodeInsufficientDevice {
                f.write_str(r.as_str())?;
            } else {
                write!(f, "{n}/{} {}", self.cards, r.as_str())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hami_reason_format() {
        let mut r = Rejection::for_cards(8);
        r.add(Reason::CardTypeMismatch, 6);
        r.add(Reason::CardInsufficientMemory, 2);
        assert_eq!(
            r.to_string(),
            "6/8 CardTypeMismatch, 2/8 CardInsufficientMemory"
        );
        assert_eq!(r.main_reason(), Some(Reason::CardTypeMismatch));
        assert_eq!(
            Rejection::node(Reason::NodeInsufficientDevice).to_string(),
            "NodeInsufficientDevice"
        );
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
