//! A TCP proxy between an agent and PostgreSQL that a test can cut, stall and restore,
//! to take the database away without touching the shared server.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// State of the proxied link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Up,
    /// Open connections are closed and new ones are closed as soon as they are accepted,
    /// as when the server is down.
    Cut,
    /// Connections stay open but no byte passes, as when the network drops packets.
    Stalled,
}

pub struct Proxy {
    pub addr: SocketAddr,
    link: watch::Sender<Link>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (link, watcher) = watch::channel(Link::Up);
        let accept = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                if *watcher.borrow() == Link::Cut {
                    continue;
                }
                tokio::spawn(pipe(socket, target, watcher.clone()));
            }
        });
        Proxy { addr, link, accept }
    }

    pub fn set(&self, state: Link) {
        self.link.send_replace(state);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.set(Link::Cut);
        self.accept.abort();
    }
}

async fn pipe(client: TcpStream, target: SocketAddr, link: watch::Receiver<Link>) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Returning drops both sockets, which closes them.
    tokio::select! {
        _ = forward(client_read, server_write, link.clone()) => {}
        _ = forward(server_read, client_write, link.clone()) => {}
        _ = until_cut(link) => {}
    }
}

async fn forward(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut link: watch::Receiver<Link>) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if !wait_while_stalled(&mut link).await {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            changed = link.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let count = match read {
            Ok(0) | Err(_) => return,
            Ok(count) => count,
        };
        // Bytes read just before a stall are held until the link is up again.
        if !wait_while_stalled(&mut link).await {
            return;
        }
        if to.write_all(&buffer[..count]).await.is_err() {
            return;
        }
    }
}

/// Waits until the link is not stalled; returns false when it is cut.
async fn wait_while_stalled(link: &mut watch::Receiver<Link>) -> bool {
    loop {
        let state = *link.borrow_and_update();
        match state {
            Link::Up => return true,
            Link::Cut => return false,
            Link::Stalled => {
                if link.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}

async fn until_cut(mut link: watch::Receiver<Link>) {
    while *link.borrow_and_update() != Link::Cut {
        if link.changed().await.is_err() {
            return;
        }
    }
}

/// Replaces host and port of a postgres:// URL with `addr`.
pub fn url_through(url: &str, addr: SocketAddr) -> String {
    let at = url.rfind('@').expect("URL has user@host") + 1;
    let path = at + url[at..].find('/').expect("URL has a database path");
    format!("{}{addr}{}", &url[..at], &url[path..])
}

/// Host and port of a postgres:// URL.
pub fn server_addr(url: &str) -> SocketAddr {
    let at = url.rfind('@').expect("URL has user@host") + 1;
    let path = at + url[at..].find('/').expect("URL has a database path");
    let host_port = &url[at..path];
    let host_port = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:5432")
    };
    let host_port = host_port.replace("localhost", "127.0.0.1");
    host_port
        .parse()
        .expect("the test server address is an IP address and port")
}
