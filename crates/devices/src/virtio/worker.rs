//! The thread that does one device's work.
//!
//! It sleeps in `epoll_wait` without a timeout on the device's queue eventfds (which KVM
//! signals when the guest writes the notify register: ioeventfd) and a stop eventfd, so an
//! idle device costs nothing and adds no wake-ups. When a queue's eventfd fires it drains the
//! eventfd, lets the [`QueueHandler`] process the queue, and raises the queue's MSI-X vector
//! if anything was used. A device with a backend of its own (vsock's sockets) also gives an
//! fd to wait on ([`QueueHandler::backend_fd`]); the worker then lets the handler move data
//! between backend and queues when that fd is readable and after every notification.
//! vCPU threads never do device work beyond register accesses.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{GuestMemory, QueueHandler};
use crate::pci::msix::MsixVectors;

/// What a worker thread needs.
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
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
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
                run(parts, &epoll);
            })?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            log::warn!("cannot stop a virtio worker thread: {e}");
            return;
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(mut p: WorkerParts, epoll: &Epoll) {
    let mut ready = vec![EpollEvent::default(); p.events.len() + 2];
    loop {
        let n = match epoll.wait(-1, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("{}: epoll_wait failed ({e}); the device stops", p.name);
                return;
            }
        };
        for event in &ready[..n] {
            match event.data() {
                STOP_TOKEN => return,
                BACKEND_TOKEN => {}
                index => service(&mut p, index as usize),
            }
        }
        if p.handler.backend_fd().is_some() {
            service_backend(&mut p);
        }
    }
}

/// Lets a handler with a backend move data between it and the queues.
fn service_backend(p: &mut WorkerParts) {
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
        Err(e) => fail(p, None, &e),
    }
}

/// A queue turned out unusable: the device needs a reset (logged and signalled once).
fn fail(p: &WorkerParts, index: Option<usize>, e: &super::QueueError) {
    if !p.needs_reset.swap(true, Ordering::Relaxed) {
        match index {
            Some(i) => log::warn!("{}: queue {i}: {e}", p.name),
            None => log::warn!("{}: {e}", p.name),
        }
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
        Err(e) => fail(p, Some(index), &e),
    }
}
