//! [`InterpFigures`]: what one interpreter reads about itself through the
//! in-interpreter module `interheap_interp` (frontends/python/src/interp_module.rs),
//! as a C struct, since that module reaches the allocator through its C API
//! (`interheap_allocator_interp_figures`).

/// One interpreter's figures for the in-interpreter module (`interheap_interp`),
/// as C reads them (`interheap_interp_figures` in include/interheap_allocator.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InterpFigures {
    /// Live bytes the back end counts for the interpreter.
    pub live_bytes: i64,
    /// The limit in bytes, or -1 for none.
    pub limit: i64,
    /// Requests the limit refused.
    pub refused: u64,
    /// The largest refused request, in bytes (0: none).
    pub largest_refused: u64,
    /// The exact peak of the live bytes while limited (0: never).
    pub peak: u64,
}

impl InterpFigures {
    /// The figures of a budget, with `live_bytes`.
    pub fn new(live_bytes: i64, b: &interheap_engine::limits::BudgetSnapshot) -> InterpFigures {
        InterpFigures {
            live_bytes,
            limit: b.limit.map_or(-1, |l| l.min(i64::MAX as u64) as i64),
            refused: b.refused,
            largest_refused: b.largest_refused,
            peak: b.peak,
        }
    }
}
