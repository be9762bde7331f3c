//! Loom models of this crate's protocols. Each model names the mutations it
//! catches; `scripts/mutants.py` applies them one at a time and checks that
//! the model fails.

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;

use std::sync::atomic::Ordering::{Acquire, Release};

use crate::keys::{KeyRegistry, KeySlot};
use crate::memory::Loom;
use crate::spin_lock::SpinLock;
use crate::stack::{IntrusiveStack, Links};

/// A node as the model sees it: its link and a payload in loom's cells, so
/// that loom checks every access for a happens-before edge.
pub(crate) struct Node {
    next: UnsafeCell<*mut Node>,
    payload: UnsafeCell<u32>,
}

pub(crate) struct NodeLinks;

// SAFETY: set then read the same cell.
unsafe impl Links<Node> for NodeLinks {
    unsafe fn set_next(node: *mut Node, next: *mut Node) {
        // SAFETY: the caller owns the live node.
        unsafe { (*node).next.with_mut(|p| *p = next) }
    }
    unsafe fn next(node: *mut Node) -> *mut Node {
        // SAFETY: as above.
        unsafe { (*node).next.with(|p| *p) }
    }
}

fn node(payload: u32) -> *mut Node {
    Box::into_raw(Box::new(Node {
        next: UnsafeCell::new(std::ptr::null_mut()),
        payload: UnsafeCell::new(payload),
    }))
}

/// Sums the payloads of the drained nodes and frees them.
fn drain_sum(stack: &IntrusiveStack<Loom, Node, NodeLinks>) -> (u32, usize) {
    let mut sum = 0;
    // SAFETY: every node was pushed whole and is freed once, here.
    let n = unsafe {
        stack.drain(|n| {
            sum += (*n).payload.with(|p| *p);
            drop(Box::from_raw(n));
        })
    };
    (sum, n)
}

/// Two threads push a node each (payload written before the push) while a
/// third drains; the main thread drains what is left. Every node comes out
/// exactly once with its payload.
///
/// Mutations caught: `push`'s CAS `Release` -> `Relaxed`, and
/// `take_all`'s swap `Acquire` -> `Relaxed` (loom: causality violation on the
/// payload or the link); writing the link after the CAS instead of before
/// (a node is lost or read before its link is set).
#[test]
fn stack_pushes_are_drained_once_with_their_contents() {
    loom::model(|| {
        let stack = Arc::new(IntrusiveStack::<Loom, Node, NodeLinks>::new_in());
        let pushers: Vec<_> = [1u32, 10]
            .into_iter()
            .map(|payload| {
                let stack = stack.clone();
                // SAFETY: the node is new and given up.
                thread::spawn(move || unsafe { stack.push(node(payload)) })
            })
            .collect();
        let drainer = {
            let stack = stack.clone();
            thread::spawn(move || drain_sum(&stack))
        };
        for p in pushers {
            p.join().unwrap();
        }
        let (sum_a, n_a) = drainer.join().unwrap();
        let (sum_b, n_b) = drain_sum(&stack);
        assert_eq!((sum_a + sum_b, n_a + n_b), (11, 2));
    });
}

/// Two threads add to a counter that is not atomic, each under the lock.
///
/// Mutations caught: `lock`'s CAS `Acquire` -> `Relaxed`, the guard's
/// unlock `Release` -> `Relaxed` (loom: causality violation on the counter).
#[test]
fn spin_lock_excludes_and_publishes() {
    loom::model(|| {
        let lock = Arc::new(SpinLock::<(), Loom>::new_in(()));
        let counter = Arc::new(UnsafeCell::new(0u32));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (lock, counter) = (lock.clone(), counter.clone());
                thread::spawn(move || {
                    let _guard = lock.lock();
                    // SAFETY: the lock makes this the only access.
                    counter.with_mut(|c| unsafe { *c += 1 });
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let _guard = lock.lock();
        // SAFETY: as above.
        assert_eq!(counter.with(|c| unsafe { *c }), 2);
    });
}

/// A thread keyed by a thread state's address while another thread frees
/// that thread state and the allocator hands the address back to the first
/// thread as a new thread state (of another interpreter): the first thread
/// must not find its old key. The handover (detach, free, reuse) is a
/// Release/Acquire flag each way, as CPython and the allocator order it.
///
/// Mutation caught: `forget_keys_in` without its clearing exchange (the
/// owner matches the reused address and would use the old interpreter's
/// heaps).
#[test]
fn a_freed_key_never_matches_its_reused_address() {
    const TSTATE: usize = 0x1000;
    crate::model(|| {
        let registry = Arc::new(KeyRegistry::<Loom>::new_in());
        let slot = Arc::new(KeySlot::<Loom>::new_in());
        // SAFETY: the slot outlives the model's threads and is delisted last.
        unsafe { registry.list(&slot) };
        slot.key(TSTATE);
        let detached = Arc::new(loom::sync::atomic::AtomicBool::new(false));
        let reused = Arc::new(loom::sync::atomic::AtomicBool::new(false));
        let freer = {
            let (registry, detached, reused) = (registry.clone(), detached.clone(), reused.clone());
            thread::spawn(move || {
                while !detached.load(Acquire) {
                    thread::yield_now();
                }
                registry.forget_keys_in(TSTATE, TSTATE + 64);
                reused.store(true, Release);
            })
        };
        // The owner detaches its thread state, then gets the address back.
        detached.store(true, Release);
        while !reused.load(Acquire) {
            thread::yield_now();
        }
        assert!(!slot.matches(TSTATE), "a key outlived the thread state it named");
        freer.join().unwrap();
        registry.delist(&slot);
        assert!(registry.is_empty());
    });
}

/// A thread exits (delists its slot, then its memory is reused and happens
/// to hold an address inside a block being freed) while another thread
/// frees that block: the clear must never write the reused memory.
///
/// Mutation caught: `delist` leaving the slot listed (the clear overwrites
/// the reused memory).
#[test]
fn a_clear_racing_a_thread_exit_never_writes_the_dead_slot() {
    const BLOCK: usize = 0x2000;
    crate::model(|| {
        let registry = Arc::new(KeyRegistry::<Loom>::new_in());
        let slot = Arc::new(KeySlot::<Loom>::new_in());
        let exiting = {
            let (registry, slot) = (registry.clone(), slot.clone());
            thread::spawn(move || {
                // SAFETY: the slot is delisted before its "memory is reused".
                unsafe { registry.list(&slot) };
                slot.key(BLOCK + 8);
                registry.delist(&slot);
                // The thread-local's memory, reused: a word that looks like a key.
                slot.key(BLOCK + 16);
            })
        };
        registry.forget_keys_in(BLOCK, BLOCK + 64);
        exiting.join().unwrap();
        assert!(slot.matches(BLOCK + 16), "a clear wrote a delisted slot");
    });
}
