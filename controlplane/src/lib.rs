//! The control plane: one thread that owns the authority state and answers
//! the dataplane's requests. It never touches packets.
//!
//! Workers reach it through one bounded request queue (`ControlRequest`);
//! a full queue hands the request back to the worker. The thread runs the
//! `work` closure the process gives it (the server runs the authority
//! service there: CA, CT log, enrollment, rotation); the DNS zone and
//! admission state of later stages live here too.

#![forbid(unsafe_code)]

/// `From` every redb error a store operation can return into the store's
/// own `$error::Storage(redb::Error)`, so each store keeps its error type.
macro_rules! redb_errors_into_storage {
    ($error:ident) => {
        redb_errors_into_storage!(
            @each $error;
            redb::DatabaseError,
            redb::TransactionError,
            redb::TableError,
            redb::StorageError,
            redb::CommitError,
            redb::SetDurabilityError
        );
    };
    (@each $error:ident; $($t:ty),*) => {$(
        impl From<$t> for $error {
            fn from(e: $t) -> Self {
                $error::Storage(e.into())
            }
        }
    )*};
}

#[cfg(test)]
pub(crate) mod test_support;

pub mod assets;
pub mod authority;
pub mod cluster;
pub mod consensus;
pub mod dns;
pub mod machine;
pub mod runtime;
pub mod store;
pub mod vm;

use crossbeam_queue::ArrayQueue;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Requests the control plane can hold queued at once.
pub const REQUEST_QUEUE_LEN: usize = 1024;

/// What workers and the process ask of the control plane.
#[derive(Debug)]
pub enum ControlRequest {
    /// Stop the thread once the queue before this message is served.
    Shutdown,
}

/// Wakes the control-plane thread: whoever queues something for it
/// (workers, the process) calls it. A wake with the thread busy is kept
/// for its next wait, so none is lost.
pub type ControlWaker = Arc<dyn Fn() + Send + Sync>;

/// The sending side, cloned into every worker.
#[derive(Clone)]
pub struct ControlSender {
    queue: Arc<ArrayQueue<ControlRequest>>,
    wake: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for ControlSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlSender").finish_non_exhaustive()
    }
}

impl ControlSender {
    /// Queue a request; hands it back when the queue is full.
    pub fn send(&self, request: ControlRequest) -> Result<(), ControlRequest> {
        self.queue.push(request)?;
        self.wake.notify_one();
        Ok(())
    }
}

/// The control-plane thread. It runs a current-thread tokio runtime (what
/// the cluster's Raft runs on, in the same thread as the service) and, on
/// it, the loop that calls the process's `work`.
pub struct ControlPlane {
    pub sender: ControlSender,
    thread: JoinHandle<()>,
}

impl ControlPlane {
    /// Start the control-plane thread, pinned to `core` when given. `work`
    /// runs whenever the thread is unparked (a sender pushed something) or
    /// the time it returned passed; it serves what is queued and says how
    /// long it may sleep.
    pub fn spawn(
        core: Option<usize>,
        mut work: impl FnMut(std::time::Instant) -> Duration + Send + 'static,
    ) -> std::io::Result<Self> {
        Self::spawn_async(core, move |control| async move {
            loop {
                let sleep = work(std::time::Instant::now());
                if !control.wait(sleep).await {
                    return;
                }
            }
        })
    }

    /// Start the control-plane thread running `main`, made on the thread
    /// (so it may hold what cannot cross threads) and run on its
    /// current-thread runtime. `main` returns once [`Control::wait`] says
    /// the process stops.
    pub fn spawn_async<F, Fut>(core: Option<usize>, main: F) -> std::io::Result<Self>
    where
        F: FnOnce(Control) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        let queue = Arc::new(ArrayQueue::new(REQUEST_QUEUE_LEN));
        let inbox = queue.clone();
        let wake = Arc::new(tokio::sync::Notify::new());
        let woken = wake.clone();
        // Returns once the thread is pinned, so callers see it in place.
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("control-plane".into())
            .spawn(move || {
                if let Some(core) = core {
                    if core_pin(core) {
                        tracing::info!(core, "control plane pinned");
                    } else {
                        tracing::warn!(core, "could not pin the control plane; running unpinned");
                    }
                }
                let _ = started_tx.send(());
                // Never a half-alive server: without its control plane the
                // workers would keep accepting connections they cannot
                // admit or answer. A panic here (a bug: requests are parsed
                // with checked decoders) ends the process for the service
                // manager to restart, as a dying worker does.
                // A panic in one of the thread's tasks would otherwise end
                // only that task (the runtime carries on without it, and a
                // request is never answered): end the process instead.
                let previous = std::panic::take_hook();
                std::panic::set_hook(Box::new(move |info| {
                    previous(info);
                    if std::thread::current().name() == Some("control-plane") {
                        std::process::abort();
                    }
                }));
                let control = Control { inbox, wake: woken };
                let run = std::panic::AssertUnwindSafe(|| run(control, main));
                if std::panic::catch_unwind(run).is_err() {
                    tracing::error!("the control-plane thread panicked; aborting the process");
                    std::process::abort();
                }
            })?;
        let _ = started_rx.recv();
        let sender = ControlSender { queue, wake };
        Ok(Self { sender, thread })
    }

    /// Ask the thread to stop and wait for it.
    pub fn stop(self) {
        let mut request = ControlRequest::Shutdown;
        while let Err(back) = self.sender.send(request) {
            request = back;
            std::thread::yield_now();
        }
        let _ = self.thread.join();
    }

    /// The thread's id, for affinity checks.
    pub fn thread(&self) -> &std::thread::Thread {
        self.thread.thread()
    }

    /// What wakes the thread, for those that queue work for it elsewhere
    /// (the workers' request port).
    pub fn waker(&self) -> ControlWaker {
        let wake = self.sender.wake.clone();
        Arc::new(move || wake.notify_one())
    }
}

fn core_pin(core: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id: core })
}

/// What the control plane's main loop waits on: work queued for it, or
/// the process stopping.
pub struct Control {
    inbox: Arc<ArrayQueue<ControlRequest>>,
    wake: Arc<tokio::sync::Notify>,
}

impl Control {
    /// What ends a [`Self::wait`] early: for the loop's own tasks.
    pub fn notifier(&self) -> Arc<tokio::sync::Notify> {
        self.wake.clone()
    }

    /// Let the runtime's other tasks run, then wait until woken (work was
    /// queued) or `sleep` passed (at most a second); zero only yields.
    /// False when the process stops.
    pub async fn wait(&self, sleep: Duration) -> bool {
        if let Some(ControlRequest::Shutdown) = self.inbox.pop() {
            return false;
        }
        if sleep.is_zero() {
            // More is queued: let the runtime's own tasks run first.
            tokio::task::yield_now().await;
            return true;
        }
        // Senders wake the thread after every push; a wake that came while
        // the caller worked is kept, so the wait ends at once.
        tokio::select! {
            () = self.wake.notified() => {}
            () = tokio::time::sleep(sleep.min(Duration::from_secs(1))) => {}
        }
        !matches!(self.inbox.pop(), Some(ControlRequest::Shutdown))
    }
}

fn run<F, Fut>(control: Control, main: F)
where
    F: FnOnce(Control) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime with a timer always builds");
    tokio::task::LocalSet::new().block_on(&runtime, main(control));
}
