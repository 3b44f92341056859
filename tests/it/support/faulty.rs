//! A TCP proxy that injects network faults between a client and a real server: latency,
//! silence, resets. There is no Toxiproxy or `tc netem` here, so the tests bring their own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// What the proxy does to the traffic. A change applies to open connections too, as a
/// network fault would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forwards both ways.
    Pass,
    /// Forwards each chunk after this delay (a slow network or a slow server).
    Delay(Duration),
    /// Accepts and reads, but forwards nothing and answers nothing: a client hangs until its
    /// own timeout. What is read meanwhile is dropped, as Toxiproxy's `timeout` toxic does, so
    /// a connection that lives through it is out of step with the server; the client has to
    /// notice that and drop it.
    Blackhole,
    /// Resets new connections at once and cuts open ones, with RST on both sides.
    Reset,
}

/// The fault proxy in front of `target`, on a free port; its tasks stop on `Drop`.
pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Fault>,
    accepted: Arc<AtomicUsize>,
    counters: Counters,
    task: JoinHandle<()>,
}

/// What went through, shared with the connection tasks.
#[derive(Debug, Clone, Default)]
struct Counters {
    /// Bytes the clients sent, forwarded or not.
    from_clients: Arc<AtomicUsize>,
}

impl FaultProxy {
    /// Starts forwarding to `target` from a free port on 127.0.0.1, in [`Fault::Pass`] mode.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, _) = watch::channel(Fault::Pass);
        let accepted = Arc::new(AtomicUsize::new(0));
        let counters = Counters::default();
        let task = tokio::spawn(accept_loop(
            listener,
            target,
            mode.subscribe(),
            Arc::clone(&accepted),
            counters.clone(),
        ));
        Self {
            addr,
            mode,
            accepted,
            counters,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A `redis.url` that reaches the target through this proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://{}/0", self.addr())
    }

    /// Switches the fault. Open connections follow too: at once for [`Fault::Reset`], at
    /// their next chunk for the others.
    pub fn set_mode(&self, fault: Fault) {
        self.mode.send_replace(fault);
    }

    /// Connections accepted so far, whatever the mode did with them: proof the client came
    /// through here and not straight to the server.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Bytes the clients sent so far, whatever the mode did with them: whether the client
    /// is still trying the server at all.
    pub fn bytes_from_clients(&self) -> usize {
        self.counters.from_clients.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept loop owns the connection tasks; aborting it drops and aborts them all.
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    mode: watch::Receiver<Fault>,
    accepted: Arc<AtomicUsize>,
    counters: Counters,
) {
    let mut connections = JoinSet::new();
    while let Ok((client, _)) = listener.accept().await {
        accepted.fetch_add(1, Ordering::SeqCst);
        while connections.try_join_next().is_some() {}
        if *mode.borrow() == Fault::Reset {
            reset(&client);
            continue;
        }
        connections.spawn(relay(client, target, mode.clone(), counters.clone()));
    }
}

/// Forwards between `client` and a new connection to `target` until either side closes or
/// the mode turns to [`Fault::Reset`], which cuts both with RST.
async fn relay(
    mut client: TcpStream,
    target: SocketAddr,
    mut mode: watch::Receiver<Fault>,
    counters: Counters,
) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        // Like a real proxy whose backend refuses: the client is reset, not left hanging.
        reset(&client);
        return;
    };
    let cut = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        // Either side closing ends both: Redis's protocol has no use for half-closed streams.
        tokio::select! {
            () = pump(client_read, server_write, mode.clone(), Some(&counters.from_clients)) => false,
            () = pump(server_read, client_write, mode.clone(), None) => false,
            _ = mode.wait_for(|fault| *fault == Fault::Reset) => true,
        }
    };
    if cut {
        reset(&client);
        reset(&server);
    }
}

/// Copies `from` to `to` chunk by chunk, applying the mode to each chunk, until EOF or error.
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mode: watch::Receiver<Fault>,
    counted: Option<&AtomicUsize>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(counted) = counted {
            counted.fetch_add(n, Ordering::SeqCst);
        }
        let fault = *mode.borrow();
        match fault {
            Fault::Pass => {}
            Fault::Delay(delay) => tokio::time::sleep(delay).await,
            // Reset: the relay is cutting the connection; nothing more goes through.
            Fault::Blackhole | Fault::Reset => continue,
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Makes the coming drop of `stream` send RST instead of FIN.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}
