//! The three allocator domains of PEP 445.

/// A PEP 445 allocator domain. The discriminants match CPython's
/// `PyMemAllocatorDomain` values, so they can be passed across the FFI as is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Domain {
    /// `PyMem_RawMalloc` and friends: may be called without a thread state.
    Raw = 0,
    /// `PyMem_Malloc` and friends.
    Mem = 1,
    /// `PyObject_Malloc` and friends.
    Object = 2,
}

impl Domain {
    /// All domains, in `PyMemAllocatorDomain` order.
    pub const ALL: [Domain; 3] = [Domain::Raw, Domain::Mem, Domain::Object];
    /// Number of domains.
    pub const COUNT: usize = 3;

    /// The lower-case name used in reports and JSON ("raw", "mem", "object").
    pub const fn name(self) -> &'static str {
        match self {
            Domain::Raw => "raw",
            Domain::Mem => "mem",
            Domain::Object => "object",
        }
    }

    /// The domain with the given index (0, 1 or 2).
    pub const fn from_index(index: usize) -> Option<Domain> {
        match index {
            0 => Some(Domain::Raw),
            1 => Some(Domain::Mem),
            2 => Some(Domain::Object),
            _ => None,
        }
    }

    /// This domain's index in [`Domain::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_round_trips() {
        for d in Domain::ALL {
            assert_eq!(Domain::from_index(d.index()), Some(d));
        }
        assert_eq!(Domain::from_index(3), None);
        assert_eq!(Domain::Object.name(), "object");
    }
}
