//! The thread that does one device's work.
//!
//! It sleeps in `epoll_wait` without a timeout on the device's queue eventfds (which KVM
//! signals when the guest writes the notify register: ioeventfd) and a stop eventfd, so an
//! idle device costs nothing and adds no wake-ups. When a queue's eventfd fires it drains the
//! eventfd, lets the [`QueueHandler`] process the queue, and raises the queue's MSI-X vector
//! if anything was used. A device may also hand it host fds to wait on (a TAP device): those
//! are watched only while the device says it can use what they bring ([`QueueHandler::
//! backend_wanted`]), so a readable fd with nowhere to put its data never makes the thread
//! spin. A device with a backend of its own that it polls itself (vsock's sockets) gives one
//! fd instead ([`QueueHandler::backend_fd`]); the worker then lets the handler move data
//! between backend and queues when that fd is readable and after every notification.
//! vCPU threads never do device work beyond register accesses.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{GuestMemory, QueueHandler};
use crate::pci::msix::MsixVectors;

/// What a worker thread needs (and hands back when stopped).
pub struct WorkerParts {
    /// For the thread name and log lines (e.g. "virtio-blk0").
    pub name: String,
    pub mem: GuestMemory,
    pub queues: Vec<Queue>,
    /// One per queue, signalled on notification.
    pub events: Vec<EventFd>,
    /// Each queue's MSI-X vector.
    pub vectors: Vec<u16>,
    pub config_vector: u16,
    pub msix: Arc<MsixVectors>,
    pub handler: Box<dyn QueueHandler>,
    /// Set when a queue turned out unusable: the device then waits for a reset.
    pub needs_reset: Arc<AtomicBool>,
}

/// The epoll token of the handler's backend fd (queue tokens are their indexes).
const BACKEND_TOKEN: u64 = u64::MAX - 1;
const STOP_TOKEN: u64 = u64::MAX;

/// A running worker thread; dropping it stops and joins the thread.
///
/// Stopping is how a device quiesces for a checkpoint: a request being served when the stop
/// arrives is finished (its I/O done, its used entry written, its interrupt raised) before
/// the thread returns, because requests are served synchronously between two waits. So when
/// [`Worker::stop`] returns no request is in flight; requests the driver made available but
/// the thread had not taken yet stay in the avail ring (guest memory) past `next_avail`.
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<WorkerParts>>,
}

impl Worker {
    pub fn spawn(parts: WorkerParts) -> std::io::Result<Worker> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_rx = stop.try_clone()?;
        let epoll = Epoll::new()?;
        for (i, e) in parts.events.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                e.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            stop_rx.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        let backend = parts
            .handler
            .backend_fds()
            .into_iter()
            .map(|fd| (fd, false))
            .collect();
        let mut state = Backends { fds: backend };
        state.update(&epoll, &*parts.handler, false, parts.events.len())?;
        if let Some(fd) = parts.handler.backend_fd() {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, BACKEND_TOKEN),
            )?;
        }
        let thread = std::thread::Builder::new()
            .name(parts.name.clone())
            .spawn(move || {
                let _stop = stop_rx; // Keep the fd registered with epoll alive.
                run(parts, state, &epoll)
            })?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Worker {
    /// Stops the thread once it has finished the request it is serving, and hands back its
    /// parts (queues with their positions, handler) to save or to spawn again. `None` if the
    /// thread could not be stopped or had panicked.
    pub fn stop(mut self) -> Option<WorkerParts> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Option<WorkerParts> {
        let thread = self.thread.take()?;
        if let Err(e) = self.stop.write(1) {
            log::warn!("cannot stop a virtio worker thread: {e}");
            return None;
        }
        thread.join().ok()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// The device's backend fds and whether each is registered with epoll now.
struct Backends {
    fds: Vec<(RawFd, bool)>,
}

impl Backends {
    /// Registers the fds the handler wants watched and removes the others (all of them once
    /// the device needs a reset). Their epoll tokens follow the queues' (`first_token + i`).
    fn update(
        &mut self,
        epoll: &Epoll,
        handler: &dyn QueueHandler,
        broken: bool,
        first_token: usize,
    ) -> std::io::Result<()> {
        for (i, (fd, registered)) in self.fds.iter_mut().enumerate() {
            let wanted = !broken && handler.backend_wanted(i);
            if wanted == *registered {
                continue;
            }
            let event = EpollEvent::new(EventSet::IN, (first_token + i) as u64);
            let op = if wanted {
                ControlOperation::Add
            } else {
                ControlOperation::Delete
            };
            epoll.ctl(op, *fd, event)?;
            *registered = wanted;
        }
        Ok(())
    }
}

fn run(mut p: WorkerParts, mut backends: Backends, epoll: &Epoll) -> WorkerParts {
    let mut ready = vec![EpollEvent::default(); p.events.len() + backends.fds.len() + 2];
    loop {
        let n = match epoll.wait(-1, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("{}: epoll_wait failed ({e}); the device stops", p.name);
                return p;
            }
        };
        // Serve the queues and backends first: a notification that arrived with the stop is
        // not left for the restored VM to find out about.
        for event in &ready[..n] {
            let (index, queues) = (event.data(), p.events.len() as u64);
            if index == STOP_TOKEN || index == BACKEND_TOKEN {
                continue;
            }
            let index = index as usize;
            if index < queues as usize {
                service(&mut p, index);
            } else {
                service_backend(&mut p, index - queues as usize);
            }
        }
        if p.handler.backend_fd().is_some() {
            service_own_backend(&mut p);
        }
        if ready[..n].iter().any(|e| e.data() == STOP_TOKEN) {
            return p;
        }
        let broken = p.needs_reset.load(Ordering::Relaxed);
        if let Err(e) = backends.update(epoll, &*p.handler, broken, p.events.len()) {
            log::warn!(
                "{}: cannot watch its backend ({e}); the device stops",
                p.name
            );
            return p;
        }
    }
}

/// Handles a ready backend fd.
fn service_backend(p: &mut WorkerParts, index: usize) {
    if p.needs_reset.load(Ordering::Relaxed) {
        return;
    }
    match p.handler.backend_ready(index, &mut p.queues, &p.mem) {
        Ok(used) => {
            for q in used {
                if let Some(&vector) = p.vectors.get(q) {
                    p.msix.trigger(vector);
                }
            }
        }
        Err(e) => broken(p, &format!("backend {index}: {e}")),
    }
}

/// Lets a handler with a backend of its own move data between it and the queues.
fn service_own_backend(p: &mut WorkerParts) {
    if p.needs_reset.load(Ordering::Relaxed) {
        return;
    }
    match p.handler.process_backend(&mut p.queues, &p.mem) {
        Ok(used) => {
            for (index, vector) in p.vectors.iter().enumerate() {
                if index < 64 && used & (1 << index) != 0 {
                    p.msix.trigger(*vector);
                }
            }
        }
        Err(e) => broken(p, &e.to_string()),
    }
}

/// A queue turned out unusable: the device waits for a reset and tells the driver.
fn broken(p: &WorkerParts, what: &str) {
    if !p.needs_reset.swap(true, Ordering::Relaxed) {
        log::warn!("{}: {what}", p.name);
        p.msix.trigger(p.config_vector);
    }
}

/// Handles a notification of queue `index`.
fn service(p: &mut WorkerParts, index: usize) {
    let Some(event) = p.events.get(index) else {
        return;
    };
    // Drain the count; every available chain is processed below anyway.
    let _ = event.read();
    if p.needs_reset.load(Ordering::Relaxed) {
        return;
    }
    let Some(queue) = p.queues.get_mut(index).filter(|q| q.ready()) else {
        return;
    };
    match p.handler.process(index, queue, &p.mem) {
        Ok(true) => p.msix.trigger(p.vectors[index]),
        Ok(false) => {}
        Err(e) => broken(p, &format!("queue {index}: {e}")),
    }
}
