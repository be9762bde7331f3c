//! Loom models of this crate's protocols. Each model names the mutations it
//! catches; `scripts/mutants.py` applies them one at a time and checks that
//! the model fails.

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;

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
