//! Test-only: how many threads the calling thread has started, exactly.
//!
//! Counting /proc/self/task around a call misses a thread that lives for microseconds (ureq's
//! lookup thread on a fast lookup) and counts the threads of tests running alongside. So the
//! test binary defines `pthread_create` itself: the linker binds every call in the executable
//! (std's `thread::spawn` included) to this definition ahead of the C library's, which it
//! forwards to, and each thread counts what it started in a thread-local.

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

thread_local! {
    static STARTED: Cell<usize> = const { Cell::new(0) };
}

type StartRoutine = extern "C" fn(*mut c_void) -> *mut c_void;
type PthreadCreate = unsafe extern "C" fn(
    *mut libc::pthread_t,
    *const libc::pthread_attr_t,
    StartRoutine,
    *mut c_void,
) -> c_int;

/// Threads the calling thread has started so far (successfully or not).
pub fn started_here() -> usize {
    STARTED.with(Cell::get)
}

/// The C library's `pthread_create`.
fn real() -> PthreadCreate {
    static REAL: OnceLock<usize> = OnceLock::new();
    let address = *REAL.get_or_init(|| {
        // SAFETY: looks up a symbol by a NUL-terminated name.
        let found = unsafe { libc::dlsym(libc::RTLD_NEXT, c"pthread_create".as_ptr()) };
        assert!(
            !found.is_null(),
            "no pthread_create after the test binary's"
        );
        found as usize
    });
    // SAFETY: the address is the C library's pthread_create, which has this signature.
    unsafe { std::mem::transmute::<usize, PthreadCreate>(address) }
}

/// # Safety
/// The contract of the C library's `pthread_create`, which it forwards to.
#[no_mangle]
pub unsafe extern "C" fn pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    start: StartRoutine,
    arg: *mut c_void,
) -> c_int {
    STARTED.with(|n| n.set(n.get() + 1));
    real()(thread, attr, start, arg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spawn_is_counted_on_the_thread_that_made_it() {
        let before = started_here();
        let inner = std::thread::spawn(started_here).join().unwrap();
        // The new thread started nothing itself.
        assert_eq!(inner, 0);
        assert_eq!(started_here(), before + 1);
    }
}
