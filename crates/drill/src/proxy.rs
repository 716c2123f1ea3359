//! The drill's TCP proxy between the meter and the provider: a bad network on demand.
//!
//! The provider binds inner ports; the proxy listens on the public ones (its HTTP API, its
//! Lightning node, which it announces there) for the whole campaign and forwards each
//! connection to the inner port, transparently until a fault sets the [`Link`]:
//!
//! - **delay**: every chunk read is forwarded `delay` after it was read. Each direction of a
//!   connection has a reader thread that never waits for the delay (it timestamps chunks and
//!   queues them) and a writer thread that writes them when due, in order.
//! - **loss**: TCP never loses bytes, it retransmits; what an application sees of a lost
//!   segment is a stall. So with probability `loss_pct` a chunk (and, order being kept,
//!   everything behind it) waits an extra retransmission timeout: [`MIN_RTO`] plus the
//!   round trip the delay imposes, doubling on consecutive losses in that direction (TCP's
//!   exponential backoff), at most [`MAX_RTO`].
//! - **cut** (loss 100 %): every open connection is closed at once (shut down both ways,
//!   then reset as its sockets go), chunks in flight are dropped, and every new connection
//!   is reset as soon as it is accepted (refused) until the link is set back. The public
//!   ports stay bound throughout: a port let go on a shared machine is soon another
//!   process's (seen: another `bitmote up` picked the proxy's Lightning port as a free one
//!   during a cut, and the hub then dialled it), and a loopback connect to a port nobody
//!   listens on can even connect to itself.
//!
//! [`Counters`] say what was done (connections cut, chunks delayed, stalls injected), so
//! the drill's report can tell a fault that bit from one that found nothing to bite.
//! Plain std threads and blocking sockets: a few connections, each with four threads.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::rng::Rng;
use crate::DrillError;

/// Linux's least retransmission timeout (`TCP_RTO_MIN`).
pub const MIN_RTO: Duration = Duration::from_millis(200);
/// Linux's largest (`TCP_RTO_MAX`).
pub const MAX_RTO: Duration = Duration::from_secs(120);
/// How long the proxy waits for the inner port to accept a connection.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// The accept loops' poll interval (the listeners are non-blocking).
const POLL: Duration = Duration::from_millis(10);

/// The state of the link the proxy stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Transparent.
    Clear,
    /// Every chunk `delay` late; `loss_pct` % of them a retransmission timeout more.
    Impaired { delay: Duration, loss_pct: u32 },
    /// Disconnected: open connections closed, new ones refused.
    Cut,
}

impl Link {
    /// A fault's parameters: loss 100 % (or more) is a disconnection.
    pub fn from_fault(delay_ms: u32, loss_pct: u32) -> Link {
        match (delay_ms, loss_pct) {
            (_, l) if l >= 100 => Link::Cut,
            (0, 0) => Link::Clear,
            (d, l) => Link::Impaired { delay: Duration::from_millis(d as u64), loss_pct: l },
        }
    }
}

/// What the proxy did since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connections accepted and forwarded.
    pub accepted: u64,
    /// Connections dropped because the inner port did not accept (the provider is down).
    pub upstream_failed: u64,
    /// Open connections closed by a cut.
    pub cut: u64,
    /// New connections refused (reset at once) while the link was cut.
    pub refused: u64,
    /// Chunks read to be forwarded (all are, unless a cut drops them), and their bytes.
    pub chunks: u64,
    pub bytes: u64,
    /// Chunks held back by a delay.
    pub delayed: u64,
    /// Chunks held back a retransmission timeout (a lost segment), and those timeouts' sum.
    pub stalls: u64,
    pub stalled_ms: u64,
}

impl Counters {
    /// What happened between `before` and `self`.
    pub fn since(&self, before: &Counters) -> Counters {
        Counters {
            accepted: self.accepted - before.accepted,
            upstream_failed: self.upstream_failed - before.upstream_failed,
            cut: self.cut - before.cut,
            refused: self.refused - before.refused,
            chunks: self.chunks - before.chunks,
            bytes: self.bytes - before.bytes,
            delayed: self.delayed - before.delayed,
            stalls: self.stalls - before.stalls,
            stalled_ms: self.stalled_ms - before.stalled_ms,
        }
    }
}

#[derive(Default)]
struct AtomicCounters {
    accepted: AtomicU64,
    upstream_failed: AtomicU64,
    cut: AtomicU64,
    refused: AtomicU64,
    chunks: AtomicU64,
    bytes: AtomicU64,
    delayed: AtomicU64,
    stalls: AtomicU64,
    stalled_ms: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// One open connection: both sockets (clones), so a cut can shut them down.
struct Open {
    client: TcpStream,
    server: TcpStream,
    dead: Arc<AtomicBool>,
}

impl Open {
    /// Closed at once: no lingering on unsent data (the sockets reset as they go).
    fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        for s in [&self.client, &self.server] {
            no_linger(s);
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// `SO_LINGER` on, zero seconds: closing the socket resets the connection.
fn no_linger(s: &TcpStream) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

struct State {
    link: Link,
    open: HashMap<u64, Open>,
    next_id: u64,
}

struct Shared {
    state: Mutex<State>,
    routes: Vec<(SocketAddr, SocketAddr)>,
    counters: AtomicCounters,
    stop: AtomicBool,
    seed: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn link(&self) -> Link {
        self.lock().link
    }
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// The proxy: one [`Link`] for all its routes. Dropping it closes everything.
pub struct Proxy {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Proxy {
    /// Listen on each route's public address (now, so the ports are taken when this
    /// returns) and forward to its inner address. `seed` drives which chunks are "lost".
    pub fn start(routes: &[(SocketAddr, SocketAddr)], seed: u64) -> Result<Proxy, DrillError> {
        let mut listeners = vec![];
        for (public, _) in routes {
            listeners.push(listen(*public).map_err(|e| DrillError::io(format!("proxy: listening on {public}"), e))?);
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State { link: Link::Clear, open: HashMap::new(), next_id: 0 }),
            routes: routes.to_vec(),
            counters: AtomicCounters::default(),
            stop: AtomicBool::new(false),
            seed,
        });
        let mut threads = vec![];
        for (i, l) in listeners.into_iter().enumerate() {
            let s = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("proxy-accept-{}", routes[i].0.port()))
                .spawn(move || accept_loop(&s, l, i))
                .map_err(|e| DrillError::io("proxy: starting a thread", e))?;
            threads.push(t);
        }
        Ok(Proxy { shared, threads })
    }

    /// Set the link. `Cut` closes every open connection before it returns, and from then
    /// on new ones are refused until the link is set to something else.
    pub fn set(&self, link: Link) {
        let mut st = self.shared.lock();
        st.link = link;
        if link == Link::Cut {
            for (_, o) in st.open.drain() {
                o.kill();
                add(&self.shared.counters.cut, 1);
            }
        }
    }

    pub fn link(&self) -> Link {
        self.shared.link()
    }

    pub fn counters(&self) -> Counters {
        let c = &self.shared.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            accepted: g(&c.accepted),
            upstream_failed: g(&c.upstream_failed),
            cut: g(&c.cut),
            refused: g(&c.refused),
            chunks: g(&c.chunks),
            bytes: g(&c.bytes),
            delayed: g(&c.delayed),
            stalls: g(&c.stalls),
            stalled_ms: g(&c.stalled_ms),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.shared.lock().open.len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for (_, o) in self.shared.lock().open.drain() {
            o.kill();
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: TcpListener, route: usize) {
    let (public, inner) = shared.routes[route];
    while !shared.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                if e.kind() != ErrorKind::WouldBlock {
                    tracing::warn!("proxy: accepting on {public}: {e}");
                }
                std::thread::sleep(POLL);
                continue;
            }
        };
        if shared.link() == Link::Cut {
            // Refused: reset at once (the port stays ours, see the module doc).
            no_linger(&client);
            add(&shared.counters.refused, 1);
            continue;
        }
        let s = shared.clone();
        if let Err(e) = std::thread::Builder::new().name("proxy-conn".into()).spawn(move || connect(&s, client, inner)) {
            tracing::warn!("proxy: {e}");
        }
    }
}

/// Connect a new client to the inner port and start its two directions.
fn connect(shared: &Arc<Shared>, client: TcpStream, inner: SocketAddr) {
    // (A loopback connect to a port nobody listens on can connect to itself: not a provider.)
    let server = match TcpStream::connect_timeout(&inner, UPSTREAM_TIMEOUT).and_then(|s| {
        let own = s.local_addr()? == s.peer_addr()?;
        if own {
            Err(std::io::Error::new(ErrorKind::ConnectionRefused, "connected to itself"))
        } else {
            Ok(s)
        }
    }) {
        Ok(s) => s,
        Err(_) => {
            // What the client would see of a provider that is down: a reset.
            add(&shared.counters.upstream_failed, 1);
            no_linger(&client);
            return;
        }
    };
    let setup = || -> std::io::Result<(Open, [TcpStream; 4])> {
        for s in [&client, &server] {
            s.set_nonblocking(false)?;
            s.set_nodelay(true)?;
        }
        let open = Open { client: client.try_clone()?, server: server.try_clone()?, dead: Arc::new(AtomicBool::new(false)) };
        Ok((open, [client.try_clone()?, server.try_clone()?, client, server]))
    };
    let Ok((open, [c_read, s_read, c_write, s_write])) = setup() else { return };
    let dead = open.dead.clone();
    let id = {
        let mut st = shared.lock();
        let id = st.next_id;
        st.next_id += 1;
        add(&shared.counters.accepted, 1);
        if st.link == Link::Cut {
            // Cut while it was being connected.
            open.kill();
            add(&shared.counters.cut, 1);
            return;
        }
        st.open.insert(id, open);
        id
    };
    let guard = Arc::new(Forget { shared: shared.clone(), id });
    for (dir, from, to) in [(0u64, c_read, s_write), (1, s_read, c_write)] {
        let rng = Rng::new(shared.seed ^ (id << 1 | dir).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let (tx, rx) = mpsc::channel();
        let (s1, g1, g2, d) = (shared.clone(), guard.clone(), guard.clone(), dead.clone());
        let r = std::thread::Builder::new().name("proxy-read".into()).spawn(move || read_side(&s1, from, tx, rng, g1));
        let w = std::thread::Builder::new().name("proxy-write".into()).spawn(move || write_side(rx, to, d, g2));
        if r.is_err() || w.is_err() {
            tracing::warn!("proxy: cannot start a connection's threads");
        }
    }
}

/// Removes a connection from the open ones once all its threads are done.
struct Forget {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Forget {
    fn drop(&mut self) {
        self.shared.lock().open.remove(&self.id);
    }
}

enum Msg {
    Chunk {
        due: Instant,
        data: Vec<u8>,
    },
    /// The sender half-closed its side.
    Eof,
}

/// Read chunks as they come (never waiting for the delay), stamp each with when it is due.
fn read_side(shared: &Shared, mut from: TcpStream, tx: mpsc::Sender<Msg>, mut rng: Rng, _guard: Arc<Forget>) {
    let c = &shared.counters;
    let mut buf = vec![0u8; 16 * 1024];
    let mut last_due = Instant::now();
    let mut losses: u32 = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = tx.send(Msg::Eof);
                return;
            }
            Ok(n) => n,
        };
        add(&c.chunks, 1);
        add(&c.bytes, n as u64);
        let now = Instant::now();
        let mut due = now;
        if let Link::Impaired { delay, loss_pct } = shared.link() {
            due += delay;
            if !delay.is_zero() {
                add(&c.delayed, 1);
            }
            if loss_pct > 0 && rng.chance(loss_pct as u64, 100) {
                // A lost segment: retransmitted after the timeout, longer for each in a row.
                let rto = ((MIN_RTO + 2 * delay) * 2u32.saturating_pow(losses.min(16))).min(MAX_RTO);
                losses += 1;
                due += rto;
                add(&c.stalls, 1);
                add(&c.stalled_ms, rto.as_millis() as u64);
            } else {
                losses = 0;
            }
        } else {
            losses = 0;
        }
        // In order: never before the chunk ahead of it.
        due = due.max(last_due);
        last_due = due;
        if tx.send(Msg::Chunk { due, data: buf[..n].to_vec() }).is_err() {
            return; // the writer gave up (its side is gone)
        }
    }
}

/// Write chunks when due; pass a half-close on; on a write error close both ways.
fn write_side(rx: mpsc::Receiver<Msg>, mut to: TcpStream, dead: Arc<AtomicBool>, _guard: Arc<Forget>) {
    for msg in rx {
        match msg {
            Msg::Chunk { due, data } => {
                loop {
                    if dead.load(Ordering::SeqCst) {
                        return;
                    }
                    let now = Instant::now();
                    if now >= due {
                        break;
                    }
                    std::thread::sleep((due - now).min(Duration::from_millis(50)));
                }
                if to.write_all(&data).is_err() {
                    // The receiving side is gone: so is the connection.
                    dead.store(true, Ordering::SeqCst);
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
            }
            Msg::Eof => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback; returns its address.
    fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut s);
                    let _ = s.shutdown(Shutdown::Write);
                });
            }
        });
        addr
    }

    fn free() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
    }

    fn proxy_to_echo(seed: u64) -> (Proxy, SocketAddr) {
        let public = free();
        (Proxy::start(&[(public, echo())], seed).unwrap(), public)
    }

    /// A client with a generous read timeout (so a broken proxy fails the test, not hangs it).
    fn client(at: SocketAddr) -> TcpStream {
        let s = TcpStream::connect(at).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    fn round_trip(s: &mut TcpStream, msg: &[u8]) {
        s.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn faults_map_to_links() {
        assert_eq!(Link::from_fault(0, 100), Link::Cut);
        assert_eq!(Link::from_fault(300, 100), Link::Cut);
        assert_eq!(Link::from_fault(0, 0), Link::Clear);
        assert_eq!(Link::from_fault(20, 5), Link::Impaired { delay: Duration::from_millis(20), loss_pct: 5 });
    }

    #[test]
    fn bulk_bytes_arrive_intact_and_in_order_under_delay_and_loss() {
        let (p, at) = proxy_to_echo(1);
        p.set(Link::Impaired { delay: Duration::from_millis(5), loss_pct: 10 });
        let mut s = client(at);
        // 256 KiB of a counting pattern, written in uneven pieces while the echo comes back.
        let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
        let mut w = s.try_clone().unwrap();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            let mut at = 0;
            let mut k = 1;
            while at < sent.len() {
                let n = (k * 997 % 9000 + 1).min(sent.len() - at);
                w.write_all(&sent[at..at + n]).unwrap();
                at += n;
                k += 1;
            }
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut back = vec![];
        s.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "the bytes came back changed or out of order");
        let c = p.counters();
        assert_eq!(c.accepted, 1);
        assert_eq!(c.bytes, 2 * data.len() as u64, "{c:?}");
        assert!(c.delayed >= 2, "{c:?}");
    }

    #[test]
    fn lost_chunks_stall_but_every_message_arrives_in_order() {
        let (p, at) = proxy_to_echo(7);
        p.set(Link::Impaired { delay: Duration::from_millis(10), loss_pct: 25 });
        let mut s = client(at);
        // One chunk each way per message (each waits for its echo): 40 chunks, 25 % lost.
        for i in 0..20u32 {
            round_trip(&mut s, format!("message {i:03} ").repeat(i as usize + 1).as_bytes());
        }
        let c = p.counters();
        assert_eq!(c.chunks, 40, "{c:?}");
        assert_eq!(c.delayed, 40, "{c:?}");
        assert!(c.stalls > 0, "{c:?}");
        assert!(
            c.stalled_ms >= c.stalls * (MIN_RTO.as_millis() as u64 + 20),
            "each stall is at least the least RTO plus the round trip: {c:?}"
        );
        // Transparent again: nothing more is delayed or stalled.
        p.set(Link::Clear);
        round_trip(&mut s, b"clear");
        let after = p.counters().since(&c);
        assert_eq!((after.delayed, after.stalls, after.chunks), (0, 0, 2), "{after:?}");
    }

    #[test]
    fn a_cut_closes_open_connections_refuses_new_ones_and_heals() {
        let (p, at) = proxy_to_echo(3);
        let mut s = client(at);
        round_trip(&mut s, b"before");
        assert_eq!(p.open(), 1);
        p.set(Link::Cut);
        // The open connection is closed: its next read ends (EOF or reset), nothing echoed.
        let _ = s.write_all(b"during");
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("{n} bytes came through a cut link"),
            Err(e) => assert!(matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted), "{e}"),
        }
        // New connections are refused: reset at once, nothing passes.
        let mut s1 = client(at);
        let _ = s1.write_all(b"refused?");
        match s1.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("{n} bytes came through a cut link"),
            Err(e) => assert!(matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted), "{e}"),
        }
        let c = p.counters();
        assert_eq!((c.accepted, c.cut, c.refused), (1, 1, 1), "{c:?}");
        assert_eq!(p.open(), 0);
        // The link is back: a new connection works.
        p.set(Link::Clear);
        let mut s2 = client(at);
        round_trip(&mut s2, b"after");
        assert_eq!(p.counters().accepted, 2);
    }

    #[test]
    fn a_client_of_a_provider_that_is_down_is_dropped_not_hung() {
        let public = free();
        let p = Proxy::start(&[(public, free())], 1).unwrap();
        let mut s = client(public);
        let mut buf = [0u8; 4];
        let r = s.read(&mut buf);
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        assert_eq!(p.counters().upstream_failed, 1);
    }
}
