//! `membarrier(2)`: the kernel side of an asymmetric barrier
//! ([`Memory::light_fence`](crate::Memory::light_fence) /
//! [`Memory::heavy_fence`](crate::Memory::heavy_fence) with [`Std`](crate::Std)).

#[cfg(target_os = "linux")]
const QUERY: libc::c_int = 0;
#[cfg(target_os = "linux")]
const PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
#[cfg(target_os = "linux")]
const REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

#[cfg(target_os = "linux")]
fn call(cmd: libc::c_int) -> libc::c_long {
    // SAFETY: membarrier takes two integers (and an unused CPU id) and
    // touches no memory of ours; unknown commands fail with EINVAL.
    unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as libc::c_uint, 0 as libc::c_int) }
}

/// Registers the process for `MEMBARRIER_CMD_PRIVATE_EXPEDITED`; false if
/// the kernel (or seccomp, or `INTERHEAP_NO_MEMBARRIER` in the environment)
/// refuses. Only after it returned true may the light side of the barrier
/// be a compiler fence.
#[cfg(target_os = "linux")]
pub fn register() -> bool {
    if std::env::var_os("INTERHEAP_NO_MEMBARRIER").is_some() {
        return false;
    }
    let supported = call(QUERY);
    supported >= 0
        && supported & libc::c_long::from(PRIVATE_EXPEDITED) != 0
        && call(REGISTER_PRIVATE_EXPEDITED) == 0
}

/// Runs a full memory barrier on every running thread of the process;
/// false if the call failed.
#[cfg(target_os = "linux")]
pub fn private_expedited() -> bool {
    call(PRIVATE_EXPEDITED) == 0
}

/// Not available off Linux.
#[cfg(not(target_os = "linux"))]
pub fn register() -> bool {
    false
}

/// Not available off Linux.
#[cfg(not(target_os = "linux"))]
pub fn private_expedited() -> bool {
    false
}
